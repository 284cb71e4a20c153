"""The service's door: the FastAPI app factory, its guards, bodies, replies and routers."""
