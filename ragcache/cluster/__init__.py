"""Scale-out: a local Redis for the shared chunk tier, Ray Serve deployments and the
cache-aware request router. Nothing here is needed by a single server."""
