"""Services: plain code (no FastAPI imports), each with one job, unit-tested on its own."""
