"""The HTTP layer: the Litestar app, routing of forwarded requests, admin views and access control."""
