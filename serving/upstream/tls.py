"""TLS to engines on other hosts: a private CA, and the gateway's client certificate.

Prompts cross the network between the gateway and a remote engine, so ``https://`` endpoints
are verified against the operator's private CA (``ENCLAVE_ENGINE_CA_FILE``; the system's trust
store when unset) with the certificate's name checked (the endpoint's name, also for each
address it resolves to), and the gateway presents its own certificate where the operator gives
one (``ENCLAVE_ENGINE_CERT_FILE`` and ``ENCLAVE_ENGINE_KEY_FILE``: mutual TLS). TLS 1.2 at
least.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(ca_file: Path | None, cert_file: Path | None,
                   key_file: Path | None) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(
            cafile=str(ca_file) if ca_file is not None else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None and key_file is not None:
            context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the engine TLS files: {exc}") from None
    return context
