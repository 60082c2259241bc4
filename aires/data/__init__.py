"""Graph loading: one :class:`Graph` type from Planetoid, OGB, synthetic RMAT or on-disk graphs.

``load_graph(name)`` takes any of them; ``evaluate(graph, pred, split)`` scores predictions
(OGB's ``Evaluator`` for OGB graphs). Large graphs live on disk (``save_graph``/``open_graph``)
and are memory-mapped.
"""

from aires.data.edgelist import convert_edge_list
from aires.data.evaluation import evaluate
from aires.data.generator import PRESETS, Preset, default_cache_dir, synthetic
from aires.data.graph import SPLITS, Graph
from aires.data.loader import load_graph
from aires.data.ogb import OGB_NODE_DATASETS, default_ogb_root, load_ogb
from aires.data.planetoid import PLANETOID_NAMES, default_planetoid_root, load_planetoid
from aires.data.storage import GraphWriter, is_graph_dir, open_graph, save_graph

__all__ = [
    "Graph",
    "SPLITS",
    "load_graph",
    "load_planetoid",
    "load_ogb",
    "synthetic",
    "convert_edge_list",
    "evaluate",
    "save_graph",
    "open_graph",
    "is_graph_dir",
    "GraphWriter",
    "Preset",
    "PRESETS",
    "PLANETOID_NAMES",
    "OGB_NODE_DATASETS",
    "default_cache_dir",
    "default_planetoid_root",
    "default_ogb_root",
]
