"""Scale-out on Ray Serve: a gateway deployment routes each request to an engine replica that runs the
unchanged app, preferring the replica that already holds the request's adapter. The only package
that imports Ray (installed by the `loraserve[ray]` extra); `routing.py` is pure and needs no Ray."""
