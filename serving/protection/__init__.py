"""Data protection on every text the engine reads or writes: PII detection and redaction (input
and streamed output), the injection and tool-call guards, and the protector that applies a
client's policy to a parsed request and to the answer. Pure computation; no I/O."""
