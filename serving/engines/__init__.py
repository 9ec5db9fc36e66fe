"""Engines: the separate vLLM environment, the demo model builder and the engine supervisor."""
