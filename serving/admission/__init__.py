"""Whether a request may go ahead now: the live policy set, a request's cost bound, rate limits
and concurrency (Redis or in-process), token budgets (reservation, settlement) and the gate that
takes all three at once. May import ``domain``, ``storage`` and the other service packages."""
