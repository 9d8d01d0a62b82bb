"""Running it: the CLI, the worker app factory, the server protocol."""
