"""Pure logic, no I/O: request bounds, usage reading, SSE framing, keys, time."""
