"""ensembles package."""
