"""Enclave: vLLM engines behind one authenticated gateway.

Layers, imports flowing one way: ``routes`` → ``services`` → ``storage``. Only ``app.create_app``
wires them together, and nothing imports it but the command-line tool.
"""

__version__ = "0.1.0"
