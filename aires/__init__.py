"""AIRES: out-of-core GCN training with row-block aligned tiles and a three-phase scheduler."""

__all__: list[str] = []
