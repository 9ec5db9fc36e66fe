"""Model rollouts: a new version from its weights to all of the traffic, or back.

``service`` starts a rollout and passes operators' commands (the CLI and the admin API);
``controller`` moves it (one gateway at a time, by a lease): weights verified, engines
started, evaluation gate, canary steps, promotion or rollback; ``recorder`` counts each
version's requests in analysis windows in every gateway; ``analysis`` judges a window;
``follower`` keeps every gateway's routing on the rollout's weights.
"""
