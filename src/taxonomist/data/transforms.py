"""Preprocessing (resize + normalise) and training augmentation.

:class:`Preprocess` is the part of a model that must travel with it: the
bundle stores it as ``preprocess.json`` and the feature cache hashes it. The
transform built from it maps a PIL RGB image to a float tensor ``[3, S, S]``:

* ``resize="pad"`` (default): scale the longer side to ``S`` keeping the aspect
  ratio, centre on an ``S x S`` canvas filled with ``pad_fill`` (255 = white,
  the background of plankton and most specimen photos; 0 for dark-field).
* ``resize="squash"``: scale both sides to ``S`` (aspect ratio changes).
* ``resize="center_crop"``: scale the shorter side to ``S``, cut the centre square.

then ``x = (pixel / 255 - mean) / std`` per channel (mean/std on the [0, 1]
scale, as torchvision and timm give them).

Training augmentation (``augment``): ``"flip_rot90"`` (alias ``"light"``, the
default when ``train=True``) applies a random horizontal flip and a random
rotation by a multiple of 90 degrees — the eight symmetries of the square, exact
on pixels, and label-preserving for specimens with no canonical orientation
such as plankton; ``"none"`` disables it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError

ResizeMode = Literal["pad", "squash", "center_crop"]
RESIZE_MODES: tuple[str, ...] = ("pad", "squash", "center_crop")
INTERPOLATIONS: dict[str, int] = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                                  "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs (see the module docstring)."""

    image_size: int = 224
    resize: str = "pad"
    pad_fill: int = 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"preprocess.{key}: {msg}")

        if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)) \
                or self.image_size < 1:
            raise bad("image_size", f"{self.image_size!r} is not a positive integer")
        object.__setattr__(self, "image_size", int(self.image_size))
        if self.resize not in RESIZE_MODES:
            raise bad("resize", f"{self.resize!r}; choose one of: {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise bad("interpolation", f"{self.interpolation!r}; choose one of: {', '.join(INTERPOLATIONS)}")
        if isinstance(self.pad_fill, bool) or not isinstance(self.pad_fill, (int, np.integer)) \
                or not 0 <= self.pad_fill <= 255:
            raise bad("pad_fill", f"{self.pad_fill!r} is not an integer in 0..255")
        object.__setattr__(self, "pad_fill", int(self.pad_fill))
        for key in ("mean", "std"):
            value = getattr(self, key)
            try:
                t = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise bad(key, f"{value!r} is not 3 numbers") from None
            if len(t) != 3 or not all(np.isfinite(t)):
                raise bad(key, f"{value!r} is not 3 finite numbers (one per RGB channel, [0, 1] scale)")
            if key == "std" and min(t) <= 0:
                raise bad(key, f"{value!r}: every std must be > 0")
            object.__setattr__(self, key, t)

    def to_json(self) -> dict[str, Any]:
        """A plain dict (what ``preprocess.json`` holds)."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> Preprocess:
        """From :meth:`to_json`'s dict (or its JSON text); unknown keys are errors."""
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, dict):
            raise ConfigError(f"preprocess: expected an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"preprocess: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def cache_token(self) -> str:
        """Canonical JSON text (sorted keys): part of every feature-cache key."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))


def resize_image(img: Image.Image, p: Preprocess) -> Image.Image:
    """Resize an RGB PIL image to ``p.image_size`` square with ``p.resize`` (module docstring)."""
    s = p.image_size
    resample = INTERPOLATIONS[p.interpolation]
    w, h = img.size
    if p.resize == "squash":
        return img.resize((s, s), resample)
    if p.resize == "pad":
        scale = s / max(w, h)
        nw, nh = max(1, min(s, round(w * scale))), max(1, min(s, round(h * scale)))
        canvas = Image.new("RGB", (s, s), (p.pad_fill,) * 3)
        canvas.paste(img.resize((nw, nh), resample), ((s - nw) // 2, (s - nh) // 2))
        return canvas
    scale = s / min(w, h)
    nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
    left, top = (nw - s) // 2, (nh - s) // 2
    return img.resize((nw, nh), resample).crop((left, top, left + s, top + s))


class FlipRot90:
    """Random horizontal flip and random rotation by k*90 degrees of a [C, S, S] tensor (torch RNG)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.randint(0, 8, (1,)).item()
        if r & 4:
            x = x.flip(-1)
        return torch.rot90(x, k=r & 3, dims=(-2, -1)) if r & 3 else x

    def __repr__(self) -> str:
        return "FlipRot90()"


AUGMENTATIONS: dict[str, type | None] = {"none": None, "flip_rot90": FlipRot90, "light": FlipRot90}


class ImageTransform:
    """PIL RGB image -> normalised float tensor [3, S, S]; picklable for DataLoader workers."""

    def __init__(self, preprocess: Preprocess, augment: str = "none") -> None:
        self.preprocess = preprocess
        self.augment_name = augment
        factory = AUGMENTATIONS[augment]
        self.augment = factory() if factory is not None else None
        self.mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = resize_image(img, self.preprocess)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        if self.augment is not None:
            x = self.augment(x)
        return (x.float().div_(255.0) - self.mean) / self.std

    def __repr__(self) -> str:
        return f"ImageTransform({self.preprocess}, augment={self.augment_name!r})"


def build_transform(preprocess: Preprocess, train: bool = False, augment: str | None = None) -> ImageTransform:
    """Eval: deterministic resize + normalise. Train: the same plus ``augment`` (default ``"flip_rot90"``)."""
    if augment is not None and augment not in AUGMENTATIONS:
        raise ConfigError(f"augment={augment!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    if not train:
        if augment not in (None, "none"):
            raise ConfigError(f"augment={augment!r} given for an evaluation transform (train=False); "
                              "augmentation only applies to training")
        return ImageTransform(preprocess, "none")
    return ImageTransform(preprocess, augment or "flip_rot90")
