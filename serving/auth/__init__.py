"""Who is calling: API keys (hashed, cached, with a budget for unknown ids), the OAuth token
issuer and verifier (ours and an external identity provider's), and the client registry.
May import ``domain``, ``storage`` and the other service packages; never the web layer."""
