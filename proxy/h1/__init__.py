"""A lean HTTP/1.1 client for the proxy's upstreams: pooled keep-alive connections, strict
response parsing (llhttp through httptools), streaming both ways with flow control.

It exists because the general-purpose client (aiohttp's ClientSession) cost about two thirds of
the proxy's CPU per request (bench/RESULTS.md); this one does only what a reverse proxy needs.
"""
