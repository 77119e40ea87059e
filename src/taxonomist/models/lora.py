"""LoRA adapters on a backbone (Hu et al., ICLR 2022), built with the optional ``peft`` package.

``apply_lora(backbone)`` freezes every weight of the backbone and adds a trainable low-rank
update ``W + (alpha / r) * B @ A`` to selected layers; ``B`` starts at zero, so the adapted
backbone computes exactly the original function until it is trained. ``merge_lora(module)``
folds the updates into the weights and removes the adapter layers: the result is a plain
backbone whose state dict has the original keys, so a bundle exported after merging loads
(and predicts) without ``peft`` installed::

    from taxonomist.models import create_backbone
    from taxonomist.models.lora import apply_lora, merge_lora

    bb = apply_lora(create_backbone("efficientnet_lite0"), r=8, alpha=16)   # needs peft
    print(bb.lora.summary())     # LoRA r=8 alpha=16 dropout=0 on 32 layers: 182,272 trainable of 3,553,280 ...
    ...train (the model around it may add its own trainable neck and head)...
    plain = merge_lora(model, inplace=False)   # a merged copy, for export; ``model`` keeps training

**Default target layers** (``target_modules=None``): every ``nn.Linear`` and every pointwise
``nn.Conv2d`` (1x1 kernel, ``groups=1``) of the backbone, the layers LoRA is defined for
(peft adapts ``nn.Linear`` and ``nn.Conv2d``):

* vision transformers (timm ``vit_*``, ``deit_*``, ``swin_*``, ...): the attention ``qkv`` and
  ``proj`` and the MLP ``fc1``/``fc2`` of every block, the usual LoRA targets. The patch
  embedding (a 16x16 convolution) is left alone.
* EfficientNet / MobileNet-style convnets (the offline ``efficientnet_lite0``): the expansion
  and projection 1x1 convolutions of every inverted-residual block (``_expand_conv``,
  ``_project_conv``) and the final 1x1 ``_conv_head``: the dense "MLP" of each block, which
  holds ~90 % of the weights. Depthwise convolutions (``groups = channels``) are skipped: a
  rank-r update of a depthwise kernel is not a low-rank matrix, and peft cannot merge it. The
  3x3 stem is skipped too (27 inputs per output: nothing to compress).
* ResNet/ConvNeXt-style: their 1x1 convolutions or MLP ``Linear`` layers.

The ``Linear`` layers of ``torch.nn.MultiheadAttention`` are never chosen by default (that module
reads their weights directly and would bypass an adapter). ``target_modules`` may instead be a
list of module names or name suffixes (``["qkv", "proj"]``, ``["_project_conv"]``) or one
regular expression matched against the full name (``r"blocks\\.(9|10|11)\\..*"``); names are
relative to ``backbone.body``; :func:`lora_candidates` lists them.

"Same"-padding convolutions (the lukemelas EfficientNet's ``Conv2dDynamicSamePadding``, timm's
``Conv2dSame``) never pad a 1x1 kernel, so an adapted 1x1 one is first replaced by a plain
``nn.Conv2d`` holding the same weight and bias tensors (same output, same state-dict keys);
peft builds its adapter from the layer's class and cannot build one from these.

**Normalisation layers** stay frozen: by default BatchNorm stays in eval mode while the
backbone trains (ImageNet running statistics kept, each sample's features independent of its
batch), so the only thing training changes is the adapters. ``train_norm=True`` instead trains
the affine weights of every normalisation layer and lets BatchNorm update its statistics.

After :func:`apply_lora` the backbone is a :class:`LoraBackbone` (a :class:`Backbone` with
``trainable=True`` and a ``lora`` attribute, :class:`LoraInfo`): the training loop must feed it
images (features of a backbone being trained cannot be cached). :func:`merge_lora` turns it
back into a plain :class:`Backbone`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, MissingExtraError
from .backbones import Backbone

ADAPTER_NAME = "default"
LORA_PARAM_MARK = "lora_"
"""Every adapter parameter's name contains this (``...lora_A.default.weight``, ``...lora_B...``)."""
_SAME_PADDING_CONVS = ("Conv2dDynamicSamePadding", "Conv2dStaticSamePadding", "Conv2dSame")
_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _import_peft() -> ModuleType:
    try:
        import peft
    except ImportError:
        raise MissingExtraError("peft", "lora", "LoRA adapters") from None
    return peft


@dataclass(frozen=True)
class LoraInfo:
    """What :func:`apply_lora` did: its settings, the adapted layers and the parameter counts
    (after applying, before any neck or head is added)."""

    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    train_norm: bool
    seed: int
    lora_params: int
    trainable_params: int
    total_params: int

    def summary(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (f"LoRA r={self.r} alpha={self.alpha:g} dropout={self.dropout:g} on {len(self.target_modules)} layers: "
                f"{self.trainable_params:,} trainable of {self.total_params:,} backbone parameters ({pct:.2f} %; "
                f"{self.lora_params:,} in adapters{', plus normalisation layers' if self.train_norm else ''})")

    def to_json(self) -> dict[str, Any]:
        """The settings and counts as plain JSON values (for bundle.json / logs)."""
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "train_norm": self.train_norm,
                "seed": self.seed, "target_modules": list(self.target_modules), "lora_params": self.lora_params,
                "trainable_params": self.trainable_params, "total_params": self.total_params}


class LoraBackbone(Backbone):
    """A :class:`Backbone` carrying LoRA adapters (made by :func:`apply_lora`; do not build directly).

    Trains its adapters only; normalisation layers stay in eval mode unless ``lora.train_norm``.
    """

    lora: LoraInfo

    def train(self, mode: bool = True) -> LoraBackbone:
        nn.Module.train(self, mode)
        if mode and not self.lora.train_norm:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.eval()
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lora=r{self.lora.r}/alpha{self.lora.alpha:g}"


# ---------------------------------------------------------------- helpers
def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameter elements (shared parameters counted once)."""
    params = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters of ``module`` by name (empty when it has none)."""
    return {n: p for n, p in module.named_parameters() if LORA_PARAM_MARK in n}


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` (a backbone, a whole model, ...) holds unmerged LoRA adapter layers."""
    return any(_is_lora_layer(m) for m in module.modules())


def _is_lora_layer(m: nn.Module) -> bool:
    # peft's LoraLayer, recognised without importing peft (a model without adapters needs no peft)
    return hasattr(m, "lora_A") and hasattr(m, "get_base_layer") and hasattr(m, "merge")


def _mha_children(module: nn.Module) -> set[str]:
    out = set()
    for name, m in module.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out.update(f"{name}.{c}" if name else c for c, _ in m.named_children())
    return out


def _adaptable(m: nn.Module) -> str | None:
    """Why ``m`` cannot take a LoRA adapter, or None when it can."""
    if isinstance(m, nn.Linear):
        return None
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"a grouped/depthwise convolution (groups={m.groups}) cannot be merged after training"
        if type(m) is nn.Conv2d:
            return None
        if type(m).__name__ in _SAME_PADDING_CONVS:
            if tuple(m.kernel_size) == (1, 1) and tuple(m.dilation) == (1, 1):
                return None
            return f"a {type(m).__name__} with a {tuple(m.kernel_size)} kernel (only 1x1 ones are supported)"
        return f"a {type(m).__name__} (a Conv2d subclass with its own forward; only plain Conv2d is supported)"
    return f"a {type(m).__name__} (LoRA adapts nn.Linear and nn.Conv2d)"


def lora_candidates(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of every layer :func:`apply_lora` can adapt."""
    mha = _mha_children(module)
    return [n for n, m in module.named_modules() if n and n not in mha and _adaptable(m) is None]


def default_target_modules(module: nn.Module) -> list[str]:
    """The default targets in ``module``: every ``nn.Linear`` and every pointwise (1x1, groups=1) ``nn.Conv2d``
    (module docstring)."""
    mods = dict(module.named_modules())
    return [n for n in lora_candidates(module)
            if isinstance(mods[n], nn.Linear) or tuple(mods[n].kernel_size) == (1, 1)]


def _resolve_targets(body: nn.Module, target_modules: str | Sequence[str] | None, where: str) -> list[str]:
    if target_modules is None:
        names = default_target_modules(body)
        if not names:
            raise ConfigError(f"{where}: the backbone has no nn.Linear or 1x1 nn.Conv2d layer to adapt; give "
                              "model.backbone.lora.target_modules explicitly (see taxonomist.models.lora."
                              "lora_candidates)")
        return names
    mods = dict(body.named_modules())
    all_names = [n for n in mods if n]
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ConfigError(f"{where}: target_modules={target_modules!r} is not a regular expression ({exc})") from None
        names = [n for n in all_names if pattern.fullmatch(n)]
    elif isinstance(target_modules, Sequence) and all(isinstance(t, str) and t for t in target_modules):
        wanted = list(target_modules)
        names = [n for n in all_names if any(n == t or n.endswith("." + t) for t in wanted)]
        unused = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if unused and names:
            raise ConfigError(f"{where}: target_modules {unused} match no layer of the backbone; remove them or use "
                              f"names from: {_examples(body)}")
    else:
        raise ConfigError(f"{where}: target_modules must be null (the default layers), a list of layer names or "
                          f"name suffixes, or one regular expression; got {target_modules!r}")
    if not names:
        raise ConfigError(f"{where}: target_modules={target_modules!r} matches no layer of the backbone; layers "
                          f"that can take an adapter: {_examples(body)}")
    mha = _mha_children(body)
    bad = [(n, "a layer of nn.MultiheadAttention, which bypasses its forward") if n in mha else (n, _adaptable(mods[n]))
           for n in names]
    bad = [(n, why) for n, why in bad if why is not None]
    if bad:
        listed = "; ".join(f"{n} is {why}" for n, why in bad[:3])
        raise ConfigError(f"{where}: target_modules={target_modules!r} selects {len(bad)} layer(s) LoRA cannot adapt "
                          f"({listed}{'; ...' if len(bad) > 3 else ''}). Choose from: {_examples(body)}")
    return names


def _examples(body: nn.Module, n: int = 8) -> str:
    cands = lora_candidates(body)
    suffixes = sorted({c.rsplit(".", 1)[-1] for c in cands})
    return (f"{len(cands)} layers, e.g. {', '.join(cands[:n])}{', ...' if len(cands) > n else ''} "
            f"(suffixes: {', '.join(suffixes[:20])})")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _plain_conv(m: nn.Conv2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` sharing ``m``'s weight and bias (for 1x1 "same"-padding convolutions, which never pad)."""
    conv = nn.Conv2d(m.in_channels, m.out_channels, 1, stride=m.stride, padding=0, bias=m.bias is not None,
                     device="meta")
    conv.weight = m.weight
    if m.bias is not None:
        conv.bias = m.bias
    conv.train(m.training)
    return conv


# ---------------------------------------------------------------- apply / merge
def apply_lora(backbone: Backbone, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: str | Sequence[str] | None = None, *, train_norm: bool = False, seed: int = 0,
               log: Callable[[str], None] | None = None) -> LoraBackbone:
    """Add LoRA adapters to ``backbone`` **in place** and return it (now a :class:`LoraBackbone`).

    r: rank of each update; alpha: scale (the update is ``alpha / r * B @ A``); dropout: on the
    adapter's input during training. target_modules: None (the defaults, module docstring), names
    or name suffixes, or a regular expression. train_norm: also train normalisation layers (affine
    weights, BatchNorm statistics). seed: the adapters' random initialisation (``A``; ``B`` is zero)
    is drawn from this seed, independently of the global RNG. log: called with
    ``backbone.lora.summary()`` (trainable vs total parameters).

    Every other backbone parameter is frozen (``requires_grad=False``); ``backbone.trainable``
    becomes True (the loop must run images through it). Needs ``pip install 'taxonomist[lora]'``.
    """
    where = "model.backbone.lora"
    if not isinstance(backbone, Backbone):
        raise ConfigError(f"apply_lora needs a taxonomist Backbone (create_backbone(...)), got {type(backbone).__name__}")
    if isinstance(backbone, LoraBackbone) or has_lora(backbone):
        raise ConfigError(f"{where}: the backbone {backbone.name!r} already has LoRA adapters; apply them once "
                          "(merge_lora first to stack another round)")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"{where}.r={r!r} must be a positive integer (the rank; 4-16 is usual)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"{where}.alpha={alpha!r} must be a positive number (the update is scaled by alpha / r; "
                          "2 * r is usual)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{where}.dropout={dropout!r} must be in [0, 1)")
    peft = _import_peft()
    body = backbone.body
    was_training = body.training  # a frozen backbone's body is in eval mode: keep it so until .train()
    names = _resolve_targets(body, target_modules, where)
    for name in names:  # 1x1 "same"-padding convolutions -> plain Conv2d (same tensors, same keys)
        m = body.get_submodule(name)
        if isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d:
            _set_submodule(body, name, _plain_conv(m))
    body.requires_grad_(False)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=list(names),
                             bias="none", init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, body, adapter_name=ADAPTER_NAME)
    lora = lora_parameters(body)
    if not lora:  # pragma: no cover - peft changed how it names adapters
        raise RuntimeError("peft added no parameters named '*lora_*'; this peft version is not supported")
    for n, p in body.named_parameters():
        p.requires_grad_(LORA_PARAM_MARK in n)
    if train_norm:
        for m in body.modules():
            if isinstance(m, _NORMS):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
    if backbone.channels_last:
        body.to(memory_format=torch.channels_last)
    trainable, total = count_parameters(backbone)
    info = LoraInfo(r=r, alpha=float(alpha), dropout=float(dropout), target_modules=tuple(names),
                    train_norm=bool(train_norm), seed=int(seed), lora_params=sum(p.numel() for p in lora.values()),
                    trainable_params=trainable, total_params=total)
    backbone.__class__ = LoraBackbone
    assert isinstance(backbone, LoraBackbone)
    backbone.lora = info
    backbone.trainable = True
    backbone.weights_id = f"{backbone.weights_id}-lora-r{r}-a{alpha:g}-s{seed}"
    backbone.train(was_training)
    if log is not None:
        log(info.summary())
    return backbone


def merge_lora(module: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Fold every LoRA update in ``module`` into its layer's weight and remove the adapter layers.

    ``module`` is a :class:`LoraBackbone` or anything that contains one (the whole model). The
    result holds only plain torch layers: its state dict has the keys of the backbone before
    :func:`apply_lora`, so it saves and loads without peft. Each :class:`LoraBackbone` inside
    becomes a plain :class:`Backbone` (``trainable=True``, its ``lora`` info kept as
    ``merged_lora``). ``inplace=False`` merges a deep copy and leaves ``module`` as it was
    (export during training). A module without adapters is returned unchanged (or copied).
    Raises ValueError when a merged weight is not finite (a diverged adapter).
    """
    target = module if inplace else copy.deepcopy(module)
    layers = [(n, m) for n, m in target.named_modules() if _is_lora_layer(m)]
    for name, layer in layers:
        layer.merge(safe_merge=True)
        base = layer.get_base_layer()
        if not name:  # pragma: no cover - apply_lora never adapts the root module
            raise ValueError("cannot merge a LoRA layer that is the module itself; merge its parent")
        _set_submodule(target, name, base)
    for m in target.modules():
        if isinstance(m, LoraBackbone):
            info = m.lora
            m.__class__ = Backbone
            del m.lora
            m.merged_lora = replace(info)
    return target


__all__ = ["LoraInfo", "LoraBackbone", "apply_lora", "merge_lora", "has_lora", "lora_parameters",
           "lora_candidates", "default_target_modules", "count_parameters"]
