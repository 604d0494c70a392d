"""Where poolguard plugs into other frameworks: the ASGI middleware and the pytest plugin."""
