"""The model: backbone (optional) -> neck -> head (+ attribute heads).

``forward(images=...)`` runs the whole chain; ``forward(features=...)`` starts
after the backbone, which is how a frozen backbone's cached features are
trained on (the model is then built with ``backbone=None`` and the backbone may
be attached later, e.g. by the bundle loader, with ``model.backbone = bb``).
``forward(..., targets=...)`` hands the target node ids to heads that use them
(``head.uses_targets``: the ArcFace margin); other heads ignore them.
Optional :class:`~taxonomist.models.heads.AttributeHeads` share the neck's output and
add ``"attr/<name>"`` logits to the outputs.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError
from ..taxonomy import Taxonomy
from .backbones import Backbone, create_backbone
from .heads import ATTRIBUTE_PREFIX, AttributeHeads, Head, create_head
from .neck import Neck, create_neck


BACKBONE_OPTIONS = {"name", "pretrained", "trainable", "image_size", "seed"}


class TaxonomistModel(nn.Module):
    """``backbone -> neck -> head`` (+ ``attributes``); outputs are the head's ``dict[str, Tensor]``
    merged with the attribute heads' ``"attr/<name>"`` logits."""

    def __init__(self, backbone: Backbone | None, neck: nn.Module, head: Head,
                 attributes: AttributeHeads | None = None, metadata: nn.Module | None = None) -> None:
        super().__init__()
        self.register_module("backbone", backbone)
        self.register_module("metadata", metadata)  # MetadataFusion between the backbone and the neck
        self.neck = neck
        self.head = head
        clash = [t for t in head.tasks if t.startswith(ATTRIBUTE_PREFIX)]
        if attributes is not None and clash:
            raise ConfigError(f"head outputs {clash} use the attribute prefix {ATTRIBUTE_PREFIX!r}; rename them")
        self.register_module("attributes", attributes)

    @property
    def taxonomy(self) -> Taxonomy:
        return self.head.taxonomy

    @property
    def tasks(self) -> tuple[str, ...]:
        """Output keys: the head's tasks, then ``attr/<name>`` for each attribute."""
        return self.head.tasks + (self.attributes.tasks if self.attributes is not None else ())

    def embed(self, images: Tensor | None = None, features: Tensor | None = None, metadata: Tensor | None = None,
              metadata_mask: Tensor | None = None) -> Tensor:
        """The neck's output (the vector the head sees). With a metadata fusion module, ``metadata``
        [B, D] and ``metadata_mask`` [B, K] are fused with the backbone features first (None: no
        metadata, the same as a fully masked input)."""
        if features is None:
            if images is None:
                raise ValueError("give images=... or features=...")
            if self.backbone is None:
                raise ConfigError("this model has no backbone (it was built to train on cached features); "
                                  "pass features=..., or attach one: model.backbone = create_backbone(...)")
            features = self.backbone(images)
        elif images is not None:
            raise ValueError("give images=... or features=..., not both")
        if self.metadata is not None:
            features = self.metadata(features, metadata, metadata_mask)
        elif metadata is not None:
            raise ConfigError("metadata was given but this model has no metadata fusion (data.metadata was not set "
                              "when it was trained)")
        return self.neck(features)

    def forward(self, images: Tensor | None = None, features: Tensor | None = None,
                targets: Tensor | None = None, metadata: Tensor | None = None,
                metadata_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Outputs by task. ``targets`` (node ids, ``-1`` = unlabelled) reach heads with
        ``uses_targets`` (a training-time margin); every other head ignores them."""
        h = self.embed(images, features, metadata, metadata_mask)
        out = self.head(h, targets=targets) if self.head.uses_targets else self.head(h)
        if self.attributes is not None:
            out = {**out, **self.attributes(h)}
        return out

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the last layer shared by every task (GradNorm measures task gradients there).

        That is the last module of the neck with trainable parameters (its last ``Linear``, or its
        input norm when it has no hidden layer); without one, the last such module of a trainable
        backbone. Raises ConfigError when nothing before the heads is trainable (a frozen backbone
        and an identity neck): then the tasks share no parameters.
        """
        parts: list[nn.Module] = [self.neck] + ([self.backbone] if self.backbone is not None else [])
        for part in parts:
            last: list[nn.Parameter] = []
            for module in part.modules():
                own = [p for p in module.parameters(recurse=False) if p.requires_grad]
                if own:
                    last = own
            if last:
                return last
        raise ConfigError("the tasks share no trainable layer (frozen backbone, neck without parameters), so "
                          "GradNorm has nothing to measure: give the neck a hidden layer (model.neck.hidden=[512]) "
                          "or norm=layer, or use static task weights")

    def label_log_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        return self.head.label_log_probs(outputs)

    def label_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        return self.head.label_probs(outputs)

    def node_probs(self, outputs: dict[str, Tensor]) -> Tensor:
        return self.head.node_probs(outputs)


def _as_config(value: Any, key: str, name_key: str = "name") -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {name_key: value}
    if isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"model.{key} must be a name or a mapping of options, got {type(value).__name__}")


def create_model(taxonomy: Taxonomy, backbone: Backbone | dict[str, Any] | str | None = None,
                 head: dict[str, Any] | str = "flat", neck: dict[str, Any] | None = None,
                 in_features: int | None = None, attributes: dict[str, int] | None = None,
                 attribute_dropout: float = 0.0, metadata: dict[str, Any] | None = None) -> TaxonomistModel:
    """A :class:`TaxonomistModel` from plain config dicts.

    backbone: a :class:`Backbone`, its config (``{"name", "pretrained", "trainable", "image_size"}``,
        passed to :func:`create_backbone`), a name, or None (train on features; then
        ``in_features`` is required).
    head: ``{"name": "flat", **options}`` or a head name.
    neck: ``{"hidden": [...], "dropout": ..., "norm": ...}``; None = identity.
    attributes: ``{name: n_classes}`` adds an :class:`AttributeHeads` (outputs ``"attr/<name>"``)
        on the neck's output; None or ``{}`` = none. ``attribute_dropout``: dropout before them.
    metadata: ``{"component_index": [...], "hidden", "embed_dim", "mode", "dropout"}`` adds a
        :class:`~taxonomist.data.metadata.MetadataFusion` between the backbone features and the neck.
    """
    if isinstance(backbone, (dict, str)):
        cfg = _as_config(backbone, "backbone")
        unknown = sorted(set(cfg) - BACKBONE_OPTIONS)
        if unknown:
            raise ConfigError(f"model.backbone has no option(s) {', '.join(map(repr, unknown))}; "
                              f"its options are: {', '.join(sorted(BACKBONE_OPTIONS))}")
        backbone = create_backbone(**cfg)
    if backbone is not None and not isinstance(backbone, Backbone):
        raise ConfigError(f"backbone must be a Backbone, a config dict or None, got {type(backbone).__name__}")
    if backbone is not None:
        if in_features is not None and int(in_features) != backbone.num_features:
            raise ConfigError(f"in_features={in_features} but the backbone {backbone.name!r} gives "
                              f"{backbone.num_features} features")
        in_features = backbone.num_features
    if in_features is None:
        raise ConfigError("create_model needs in_features when there is no backbone")
    meta_mod = None
    if metadata:
        from ..data.metadata import MetadataFusion

        opts = dict(metadata)
        meta_mod = MetadataFusion(int(in_features), opts.pop("component_index"), **opts)
        in_features = meta_mod.out_features
    neck_mod = create_neck(int(in_features), neck)
    head_cfg = _as_config(head, "head")
    head_name = head_cfg.pop("name", "flat")
    head_mod = create_head(head_name, taxonomy, neck_mod.out_features, **head_cfg)
    attr_mod = (AttributeHeads(neck_mod.out_features, attributes, dropout=attribute_dropout)
                if attributes else None)
    return TaxonomistModel(backbone, neck_mod, head_mod, attr_mod, meta_mod)


__all__ = ["TaxonomistModel", "create_model", "Neck"]
