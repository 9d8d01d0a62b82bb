"""The upstream side of `gateway serve`: its HTTP/1.1 client and the proxy app."""
