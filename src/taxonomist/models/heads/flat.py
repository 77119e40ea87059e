"""The flat head: one linear layer, a softmax over the label nodes.

``z = W h + b`` with one logit per label node (``taxonomy.label_ids`` order);
``log p(label) = log_softmax(z)``. Internal label nodes are ordinary classes
("this node, not further resolved"); the tree enters through the node
probabilities (``p(v) = sum of p(label) under v``) and through the losses.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...taxonomy import Taxonomy
from .base import Head, register_head


@register_head("flat")
class FlatHead(Head):
    """Linear layer -> logits over label nodes (output key ``"labels"``).

    Options: ``bias`` (default True), ``dropout`` applied to the features before
    the layer (default 0).
    """

    def __init__(self, taxonomy: Taxonomy, in_features: int, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__(taxonomy, in_features)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(self.in_features, self.n_labels, bias=bias)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("labels",)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return {"labels": self.linear(self.dropout(features))}

    def label_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        return outputs["labels"].float().log_softmax(dim=-1)
