"""Heads: features -> outputs by task name, read as a distribution over label nodes.

Built-in heads register themselves on import: ``flat`` (softmax over label nodes)
and ``per_rank`` (one softmax per rank, combined as a product of experts).
"""

from .base import HEADS, Head, create_head, head_options, list_heads, register_head
from .flat import FlatHead
from .per_rank import PerRankHead, level_codes

__all__ = ["HEADS", "Head", "create_head", "head_options", "list_heads", "register_head", "FlatHead",
           "PerRankHead", "level_codes"]
