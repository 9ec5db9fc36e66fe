"""The engine processes: vLLM's own environment (never imported by the gateway), the supervisor
that starts, checks, drains and restarts them, and the demo model the project builds."""
