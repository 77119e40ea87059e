"""Heads: features -> outputs by task name, read as a distribution over label nodes.

Built-in heads register themselves on import: ``flat`` (softmax over label nodes),
``per_rank`` (one softmax per rank, combined as a product of experts), ``hsoftmax``
(path-product hierarchical softmax), ``refined`` and ``conditional`` (per-level heads
refined top down by the level above), ``arcface`` and ``arcface_per_rank`` (additive
angular margin), ``multilabel`` (hyperspherical sigmoids over all nodes, coherent by
C-HMCNN's max constraint). :class:`AttributeHeads` adds classifiers for categorical
attributes next to any of them.
"""

from .arcface import ArcFaceHead, ArcFacePerRankHead, arc_margin
from .attributes import ATTRIBUTE_PREFIX, AttributeHeads, attribute_key
from .base import HEADS, Head, create_head, head_options, list_heads, register_head
from .flat import FlatHead
from .hsoftmax import HierarchicalSoftmaxHead, branch_structure
from .multilabel import MultiLabelHead
from .per_rank import PerRankHead, level_codes
from .refined import ConditionalHead, RefinedHead, level_edges

__all__ = ["HEADS", "Head", "create_head", "head_options", "list_heads", "register_head", "FlatHead",
           "PerRankHead", "level_codes", "HierarchicalSoftmaxHead", "branch_structure", "RefinedHead",
           "ConditionalHead", "level_edges", "ArcFaceHead", "ArcFacePerRankHead", "arc_margin", "MultiLabelHead",
           "AttributeHeads", "ATTRIBUTE_PREFIX", "attribute_key"]
