"""Reading images for a model: crop box, RGB conversion, and the torch Dataset.

Every image becomes 8-bit RGB: grayscale (``L``, ``1``), palette, CMYK and
YCbCr images are converted; an alpha channel is composited on white; 16-bit
and float images (``I;16``, ``I``, ``F``) are scaled to 0..255 (16-bit / 257,
float assumed in [0, 1] when its maximum is <= 1). EXIF orientation tags are
not applied (as in torchvision's ImageFolder), so crop boxes refer to the
stored pixel grid.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .table import SampleTable


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def crop_box_pixels(box: np.ndarray | tuple[float, float, float, float], width: int,
                    height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) integer pixel bounds covering the float box, clipped to the image."""
    x, y, w, h = (float(v) for v in box)
    left = min(max(math.floor(x), 0), width - 1)
    top = min(max(math.floor(y), 0), height - 1)
    right = max(min(math.ceil(x + w), width), left + 1)
    bottom = max(min(math.ceil(y + h), height), top + 1)
    return left, top, right, bottom


def load_rgb(path: str, box: np.ndarray | None = None) -> Image.Image:
    """Open an image, crop ``box`` (x, y, w, h; None/NaN = whole image) and convert to RGB.

    Raises DataError naming the file (and box) when it cannot be read. A ``pack:<file>::<row>``
    path reads the stored (already cropped) image of a packed file.
    """
    if path.startswith("pack:"):
        from .sources.packed import read_packed_image

        return read_packed_image(path)
    try:
        with Image.open(path) as im:
            if box is not None and not np.isnan(np.asarray(box, dtype=np.float64)).any():
                im = im.crop(crop_box_pixels(box, *im.size))
            else:
                im.load()
            return _to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found (was it moved after the table was loaded?)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        where = f" (box {list(np.asarray(box).tolist())})" if box is not None else ""
        raise DataError(f"{path}{where}: cannot read the image: {type(exc).__name__}: {exc}. Load the data with "
                        "verify_images='decode' to find every such file, and on_error='skip' to leave them out"
                        ) from None


def _identity_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


class ImageDataset(torch.utils.data.Dataset):
    """``dataset[i] -> (image [3, H, W] float tensor, node id (int), row index i)``.

    Holds plain arrays (not the DataFrame) so it pickles cheaply into DataLoader
    workers. ``transform`` maps a PIL RGB image to a tensor (see
    :func:`~taxonomist.data.transforms.build_transform`); without one the image
    is returned unresized on the [0, 1] scale.
    """

    def __init__(self, table: SampleTable, transform: Any = None) -> None:
        self.paths = np.array([str(p) for p in table.df["path"]], dtype=str)
        boxes = table.boxes()
        self.boxes = boxes if np.isfinite(boxes).any() else None
        self.nodes = table.nodes()
        self.transform = transform if transform is not None else _identity_to_tensor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path = str(self.paths[index])
        box = None if self.boxes is None else self.boxes[index]
        img = load_rgb(path, box)
        try:
            x = self.transform(img)
        except Exception as exc:  # name the file: a transform error deep in a worker is otherwise anonymous
            raise DataError(f"{path}: the transform failed: {type(exc).__name__}: {exc}") from exc
        return x, int(self.nodes[index]), int(index)
