"""The domain's vocabulary: plain schemas and constants that every layer may read and that
import nothing of the gateway but ``serving.errors``: the endpoints the gateway serves, a
client's policy, a model manifest, a caller's identity (``Principal``) and a request's outcome.
No I/O here."""
