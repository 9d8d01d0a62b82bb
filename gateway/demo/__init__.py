"""`gateway demo`: the embedded store, a mock upstream and demo keys."""
