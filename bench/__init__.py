"""``aires-bench``: full-graph GCN training with AIRES against the baselines users would run."""

__all__: list[str] = []
