"""HTTP layer: middleware, routes and the error handlers. Calls services; holds no state."""
