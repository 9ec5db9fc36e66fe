"""The audit trail: one record per audited request, built from its outcome, encrypted where the
policy keeps content, written to the hash-chained log in ``storage.audit_chain`` by one writer."""
