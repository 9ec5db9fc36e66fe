"""The inference request's domain steps, in order: ``intake`` (contract, model, policy fields and
caps, every text inspected) run inline or in a worker thread (``offload``). The web layer calls
these, then admission, then hands the prepared request to the relay."""
