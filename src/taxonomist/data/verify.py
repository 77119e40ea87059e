"""Check image files before training: in parallel, with PIL.

* ``"header"`` (default): open the file and parse its header (format, size).
  Catches missing files, non-images and files cut inside the header; costs a
  small read per file.
* ``"decode"``: also decode every pixel, which catches truncated or corrupt
  image data (slower: a full decode per file).
* ``"none"``: only check that each file exists (one ``stat``).

PIL releases the GIL while it reads and decodes, so a thread pool scales; work
is handed out in chunks of files to keep the per-task overhead small.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

VerifyMode = Literal["header", "decode", "none"]
VERIFY_CHOICES: tuple[str, ...] = ("header", "decode", "none")

OK, MISSING, UNREADABLE = 0, 1, 2


@dataclass
class ImageCheck:
    """Per path: ``status`` (0 ok, 1 missing, 2 unreadable), ``width``/``height`` (-1 if unknown), ``error``."""

    status: np.ndarray
    width: np.ndarray
    height: np.ndarray
    error: list[str]

    @property
    def ok(self) -> np.ndarray:
        return self.status == OK


def _check_one(path: str, mode: str) -> tuple[int, int, int, str]:
    if mode == "none":
        return (OK, -1, -1, "") if os.path.isfile(path) else (MISSING, -1, -1, "file not found")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            if mode == "decode":
                im.load()
        return OK, int(w), int(h), ""
    except FileNotFoundError:
        return MISSING, -1, -1, "file not found"
    except IsADirectoryError:
        return MISSING, -1, -1, "is a folder, not a file"
    except UnidentifiedImageError:
        return UNREADABLE, -1, -1, "not an image PIL can read (unknown format or corrupt header)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return UNREADABLE, -1, -1, f"{type(exc).__name__}: {exc}"


def _check_chunk(paths: Sequence[str], mode: str) -> list[tuple[int, int, int, str]]:
    return [_check_one(p, mode) for p in paths]


def check_images(paths: Sequence[str], mode: str = "header", workers: int | None = None,
                 chunk: int = 128) -> ImageCheck:
    """Check every path (see the module docstring for the modes), in a thread pool."""
    if mode not in VERIFY_CHOICES:
        from ..errors import ConfigError

        raise ConfigError(f"verify_images={mode!r}; choose one of: {', '.join(VERIFY_CHOICES)}")
    paths = list(paths)
    n = len(paths)
    if workers is None:
        workers = min(16, 4 * (os.cpu_count() or 1))
    chunks = [paths[i:i + chunk] for i in range(0, n, chunk)]
    if workers <= 1 or len(chunks) <= 1:
        results = [r for c in chunks for r in _check_chunk(c, mode)]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
            results = [r for part in pool.map(_check_chunk, chunks, [mode] * len(chunks)) for r in part]
    status = np.fromiter((r[0] for r in results), dtype=np.int8, count=n)
    width = np.fromiter((r[1] for r in results), dtype=np.int64, count=n)
    height = np.fromiter((r[2] for r in results), dtype=np.int64, count=n)
    return ImageCheck(status, width, height, [r[3] for r in results])
