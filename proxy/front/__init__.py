"""The data-plane HTTP/1.1 server (DESIGN §1 "front") and what it hands the request path."""
