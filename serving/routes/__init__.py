"""The web layer, and the only package (with ``app`` and ``server``) that imports the web
framework: the request middleware (observes), the inference router (pure ASGI), the relay that
streams the engine's answer, the admin, OAuth and operations routes, and the error mapping."""
