"""The neck: between the backbone's features and the head.

``norm(x)`` then ``hidden`` blocks of ``Linear -> ReLU -> Dropout`` (the
embedding block of the plankton thesis, FIELD_NOTES.md). With ``hidden=[]`` and
``norm="none"`` it is the identity. Normalising the input features (LayerNorm or
BatchNorm1d) helps when training on frozen, cached backbone features, whose
scales differ a lot between channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn

from ..errors import ConfigError

NORMS = ("none", "layer", "batch")


class Neck(nn.Module):
    """``[B, in_features] -> [B, out_features]``; ``out_features`` is the last hidden width (or the input width)."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (), dropout: float = 0.0,
                 norm: Literal["none", "layer", "batch"] = "none") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"model.neck.norm={norm!r} is not one of {', '.join(NORMS)}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.neck.dropout={dropout} must be in [0, 1)")
        widths = [int(w) for w in hidden]
        if any(w < 1 for w in widths):
            raise ConfigError(f"model.neck.hidden={list(hidden)}: every width must be a positive integer")
        self.in_features = int(in_features)
        self.out_features = widths[-1] if widths else self.in_features
        layers: list[nn.Module] = []
        if norm == "layer":
            layers.append(nn.LayerNorm(self.in_features))
        elif norm == "batch":
            layers.append(nn.BatchNorm1d(self.in_features))
        width = self.in_features
        for w in widths:
            layers += [nn.Linear(width, w), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = w
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


def create_neck(in_features: int, cfg: dict[str, Any] | None = None) -> Neck:
    """A neck from a plain config dict (keys ``hidden``, ``dropout``, ``norm``); None = identity."""
    cfg = dict(cfg or {})
    allowed = {"hidden", "dropout", "norm"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(f"model.neck has no option(s) {', '.join(map(repr, unknown))}; "
                          f"its options are: {', '.join(sorted(allowed))}")
    return Neck(in_features, **cfg)
