"""Evaluation sets: versioned files of requests with checks on their answers (``sets``), the
checks themselves (``checks``), and running a set against a model version to get pass rates
that a person reads (`enclave eval run`) or a rollout gates on (``runner.gate``).

Nothing here imports the web layer or reads the settings: the sets' directory, the engines'
addresses and the HTTP client are given by the caller. A report never holds an answer's text,
only a short excerpt in a failing check's reason: answers may carry personal data.
"""
