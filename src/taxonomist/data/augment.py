"""Training augmentation pipelines selectable by name, around the model's :class:`Preprocess`.

An :class:`AugmentTransform` maps a PIL RGB image to a normalised float tensor
``[3, S, S]`` in five stages; stages 2 and 4 are exactly the evaluation
transform (:func:`~taxonomist.data.transforms.build_transform` with
``train=False``), so a model sees the same geometry and scale in training and at
inference:

1. *random resized crop* (optional; torchvision ``RandomResizedCrop.get_params``):
   cut a region of ``crop_scale`` of the original area with aspect ratio in
   ``crop_ratio`` from the original image (Szegedy et al., "Going deeper with
   convolutions", CVPR 2015, the "Inception" crop);
2. the **Preprocess resize** to ``S x S`` (``pad`` / ``squash`` / ``center_crop``,
   unchanged);
3. on the uint8 tensor: random horizontal flip, random rotation by k·90°,
   vertical flip, colour jitter, then RandAugment (Cubuk et al., "RandAugment",
   CVPR-W 2020) or AutoAugment (Cubuk et al., "AutoAugment", CVPR 2019), both
   torchvision's, filling uncovered pixels with ``preprocess.pad_fill``;
4. the **Preprocess normalisation** ``(pixel / 255 - mean) / std`` (unchanged);
5. random erasing (optional; Zhong et al., "Random Erasing Data Augmentation",
   AAAI 2020; torchvision ``RandomErasing`` on the normalised tensor, so a value
   of 0 is the mean colour).

Presets (``AugmentSpec(name=...)``; any field can be overridden):

==============  =============================================================
``none``        stages 2 + 4 only: identical to the evaluation transform
``flips``       horizontal flip + k·90° rotation: the 8 symmetries of the
                square, exact on pixels; for specimens with no canonical
                orientation (plankton, microscopy). The default.
``standard``    random resized crop (scale 0.35–1) + horizontal flip; colour
                jitter off by default (grayscale data)
``randaugment`` ``standard`` + RandAugment(``num_ops``, ``magnitude``)
``autoaugment`` ``standard`` + AutoAugment(``policy``)
==============  =============================================================

Every random draw uses torch's global generator, so ``torch.manual_seed`` makes a
pipeline reproducible and DataLoader workers (seeded by torch per worker) draw
different augmentations. This module also holds :class:`ProbabilitySchedule`,
the constant / linear / cosine probability ramp shared by mixup
(:mod:`taxonomist.data.mixup`) and metadata masking
(:mod:`taxonomist.data.metadata`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from .transforms import Preprocess, resize_image

AUGMENT_PRESETS: tuple[str, ...] = ("none", "flips", "standard", "randaugment", "autoaugment")
AUTOAUGMENT_POLICIES: tuple[str, ...] = ("imagenet", "cifar10", "svhn")
ERASING_VALUES: tuple[str, ...] = ("zero", "random")
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "cosine")

# preset -> (crop_scale, hflip, rot90)
_PRESET_DEFAULTS: dict[str, tuple[tuple[float, float] | None, bool, bool]] = {
    "none": (None, False, False),
    "flips": (None, True, True),
    "standard": ((0.35, 1.0), True, False),
    "randaugment": ((0.35, 1.0), True, False),
    "autoaugment": ((0.35, 1.0), True, False),
}


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class ProbabilitySchedule:
    """A probability that moves from ``start`` to ``end`` over ``total_steps`` steps.

    ``kind``: ``"constant"`` (always ``start``), ``"linear"``
    (``start + (end - start) * t``), ``"cosine"``
    (``end + (start - end) * (1 + cos(pi t)) / 2``, the half-cosine of SGDR,
    Loshchilov & Hutter, ICLR 2017), with ``t = min(step / total_steps, 1)``;
    after ``total_steps`` the value stays at ``end``. "Step" is whatever unit the
    caller counts (optimiser steps or epochs).
    """

    start: float = 1.0
    end: float | None = None
    kind: str = "constant"
    total_steps: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"schedule kind {self.kind!r}; choose one of: {', '.join(SCHEDULE_KINDS)}")
        end = self.start if self.end is None else self.end
        for key, v in (("start", self.start), ("end", end)):
            if not (isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0):
                raise ConfigError(f"schedule {key}={v!r} is not a probability in [0, 1]")
        object.__setattr__(self, "end", float(end))
        object.__setattr__(self, "start", float(self.start))
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, (int, np.integer)) \
                or self.total_steps < 1:
            raise ConfigError(f"schedule total_steps={self.total_steps!r} is not a positive integer")

    @classmethod
    def of(cls, value: float | ProbabilitySchedule | dict[str, Any]) -> ProbabilitySchedule:
        """A schedule from a number (constant), a dict of the fields, or a schedule."""
        if isinstance(value, ProbabilitySchedule):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ConfigError(f"schedule: unknown key(s) {unknown}; known: start, end, kind, total_steps")
            return cls(**value)
        return cls(start=float(value))

    def __call__(self, step: int | float = 0) -> float:
        t = min(max(float(step), 0.0) / self.total_steps, 1.0)
        assert self.end is not None
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- spec
def _pair(value: Any, key: str, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"augment.{key}: {value!r} is not two numbers (min, max)") from None
    if not (lo <= a <= b <= hi):
        raise ConfigError(f"augment.{key}: {value!r} must satisfy {lo} <= min <= max <= {hi}")
    return a, b


@dataclass(frozen=True)
class AugmentSpec:
    """Every parameter of a training augmentation pipeline (see the module docstring).

    ``crop_scale``, ``hflip`` and ``rot90`` default (None) to the preset's choice;
    ``color_jitter`` is the strength of brightness, contrast and saturation jitter
    (0 = off); ``erasing`` is the probability of random erasing (0 = off).
    """

    name: str = "flips"
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool | None = None
    vflip: bool = False
    rot90: bool | None = None
    color_jitter: float = 0.0
    num_ops: int = 2
    magnitude: int = 9
    policy: str = "imagenet"
    erasing: float = 0.0
    erasing_scale: tuple[float, float] = (0.02, 0.33)
    erasing_value: str = "zero"

    def __post_init__(self) -> None:
        if self.name not in AUGMENT_PRESETS:
            raise ConfigError(f"augment.name={self.name!r}; choose one of: {', '.join(AUGMENT_PRESETS)}")
        if self.crop_scale is not None:
            object.__setattr__(self, "crop_scale", _pair(self.crop_scale, "crop_scale", 1e-6, 1.0))
            if self.crop_scale[1] <= 0:  # type: ignore[index]
                raise ConfigError("augment.crop_scale: the largest area fraction must be > 0")
        object.__setattr__(self, "crop_ratio", _pair(self.crop_ratio, "crop_ratio", 1e-3, 1e3))
        object.__setattr__(self, "erasing_scale", _pair(self.erasing_scale, "erasing_scale", 0.0, 1.0))
        if not 0.0 <= float(self.color_jitter) <= 1.0:
            raise ConfigError(f"augment.color_jitter={self.color_jitter!r} must be in [0, 1]")
        if not 0.0 <= float(self.erasing) <= 1.0:
            raise ConfigError(f"augment.erasing={self.erasing!r} is a probability in [0, 1]")
        if not (isinstance(self.num_ops, int) and self.num_ops >= 1):
            raise ConfigError(f"augment.num_ops={self.num_ops!r} must be an integer >= 1")
        if not (isinstance(self.magnitude, int) and 0 <= self.magnitude <= 30):
            raise ConfigError(f"augment.magnitude={self.magnitude!r} must be an integer in 0..30 "
                              "(torchvision's 31 magnitude bins)")
        if self.policy not in AUTOAUGMENT_POLICIES:
            raise ConfigError(f"augment.policy={self.policy!r}; choose one of: {', '.join(AUTOAUGMENT_POLICIES)}")
        if self.erasing_value not in ERASING_VALUES:
            raise ConfigError(f"augment.erasing_value={self.erasing_value!r}; choose one of: "
                              f"{', '.join(ERASING_VALUES)}")

    @classmethod
    def of(cls, value: str | dict[str, Any] | AugmentSpec | None) -> AugmentSpec:
        """From a preset name, a dict of fields (``{"name": "standard", "erasing": 0.25}``) or a spec."""
        if value is None:
            return cls()
        if isinstance(value, AugmentSpec):
            return value
        if isinstance(value, str):
            if value not in AUGMENT_PRESETS:
                raise ConfigError(f"augment={value!r}; choose one of: {', '.join(AUGMENT_PRESETS)}")
            return cls(name=value)
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ConfigError(f"augment: unknown key(s) {unknown}; known: {[f.name for f in fields(cls)]}")
            data = dict(value)
            for key in ("crop_scale", "crop_ratio", "erasing_scale"):
                if data.get(key) is not None:
                    data[key] = tuple(data[key])
            return cls(**data)
        raise ConfigError(f"augment: expected a preset name or a mapping, got {type(value).__name__}")

    def resolved(self) -> dict[str, Any]:
        """The concrete values of the preset-dependent fields (crop_scale, hflip, rot90)."""
        scale, hflip, rot90 = _PRESET_DEFAULTS[self.name]
        return {"crop_scale": self.crop_scale if self.crop_scale is not None else scale,
                "hflip": self.hflip if self.hflip is not None else hflip,
                "rot90": self.rot90 if self.rot90 is not None else rot90}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("crop_scale", "crop_ratio", "erasing_scale"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d


# ----------------------------------------------------------------------------- transform
class AugmentTransform:
    """PIL RGB image -> augmented, normalised float tensor ``[3, S, S]`` (picklable)."""

    def __init__(self, preprocess: Preprocess, spec: AugmentSpec | str | dict[str, Any] | None = None) -> None:
        import torchvision.transforms as T
        from torchvision.transforms import InterpolationMode

        self.preprocess = preprocess
        self.spec = AugmentSpec.of(spec)
        r = self.spec.resolved()
        self.crop_scale: tuple[float, float] | None = r["crop_scale"]
        self.hflip: bool = r["hflip"]
        self.rot90: bool = r["rot90"]
        fill = [float(preprocess.pad_fill)] * 3
        s = self.spec
        self.jitter = (T.ColorJitter(brightness=s.color_jitter, contrast=s.color_jitter, saturation=s.color_jitter)
                       if s.color_jitter > 0 else None)
        self.policy: Any = None
        if s.name == "randaugment":
            self.policy = T.RandAugment(num_ops=s.num_ops, magnitude=s.magnitude,
                                        interpolation=InterpolationMode.BILINEAR, fill=fill)
        elif s.name == "autoaugment":
            self.policy = T.AutoAugment(policy=T.AutoAugmentPolicy(s.policy),
                                        interpolation=InterpolationMode.BILINEAR, fill=fill)
        self.erase = (T.RandomErasing(p=s.erasing, scale=s.erasing_scale,
                                      value="random" if s.erasing_value == "random" else 0)
                      if s.erasing > 0 else None)
        self.mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1)

    def _crop(self, img: Image.Image) -> Image.Image:
        """Random resized crop in the original pixel grid (resizing is left to the Preprocess)."""
        from torchvision.transforms import RandomResizedCrop

        assert self.crop_scale is not None
        # get_params only reads the size (torchvision's get_dimensions accepts PIL images)
        top, left, ch, cw = RandomResizedCrop.get_params(img, list(self.crop_scale),  # type: ignore[arg-type]
                                                         list(self.spec.crop_ratio))
        return img.crop((left, top, left + cw, top + ch))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.crop_scale is not None:
            img = self._crop(img)
        img = resize_image(img, self.preprocess)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        if self.hflip and bool(torch.randint(0, 2, (1,)).item()):
            x = x.flip(-1)
        if self.spec.vflip and bool(torch.randint(0, 2, (1,)).item()):
            x = x.flip(-2)
        if self.rot90:
            k = int(torch.randint(0, 4, (1,)).item())
            if k:
                x = torch.rot90(x, k=k, dims=(-2, -1))
        if self.jitter is not None:
            x = self.jitter(x)
        if self.policy is not None:
            x = self.policy(x)
        x = (x.float().div_(255.0) - self.mean) / self.std
        if self.erase is not None:
            x = self.erase(x)
        return x

    def __repr__(self) -> str:
        return f"AugmentTransform({self.preprocess}, {self.spec})"


def build_augment(preprocess: Preprocess, augment: AugmentSpec | str | dict[str, Any] | None = None,
                  train: bool = True) -> Any:
    """The training transform for ``augment`` (a preset name, dict or :class:`AugmentSpec`).

    ``train=False`` returns the evaluation transform of
    :func:`~taxonomist.data.transforms.build_transform` whatever ``augment`` says (it is
    still validated), so one config value can serve the training and the evaluation loaders.
    """
    spec = AugmentSpec.of(augment)
    if not train:
        from .transforms import build_transform

        return build_transform(preprocess, train=False)
    return AugmentTransform(preprocess, spec)
