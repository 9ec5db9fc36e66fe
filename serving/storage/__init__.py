"""Storage: the model manifests on disk and the state database. Imports nothing from services."""
