"""COCO-style JSON with bounding boxes (FathomNet style): one sample per annotation.

Reads ``images[] {id, file_name, width, height}``, ``annotations[] {id,
image_id, category_id, bbox: [x, y, w, h]}`` and ``categories[] {id, name}``.
The crop of each box is read on the fly by :class:`~taxonomist.data.ImageDataset`.
``file_name`` is relative to ``image_root`` if given, else to the JSON file's
folder. Category names are resolved in the taxonomy like folder names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError
from ...taxonomy import Taxonomy
from ..labels import resolve_labels
from ..report import LoadReport, check_on_error
from ..table import SampleTable
from ._assemble import assemble, report_rows


def _entries(data: dict[str, Any], key: str, path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    items = data.get(key)
    if not isinstance(items, list):
        raise DataError(f"{path}: a COCO file needs a list {key!r} (found {type(items).__name__}); "
                        "expected keys: images, annotations, categories")
    for i, item in enumerate(items):
        missing = [k for k in required if not isinstance(item, dict) or k not in item]
        if missing:
            raise DataError(f"{path}: {key}[{i}] lacks {missing} (each entry needs {list(required)})")
    return items


def _index(items: list[dict[str, Any]], key: str, path: Path) -> dict[Any, int]:
    index: dict[Any, int] = {}
    for i, item in enumerate(items):
        if item["id"] in index:
            raise DataError(f"{path}: {key}[{i}] repeats id {item['id']!r} of {key}[{index[item['id']]}]; "
                            "ids must be unique")
        index[item["id"]] = i
    return index


def _box(value: Any) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def load_coco(path: str | Path, taxonomy: Taxonomy, *, image_root: str | Path | None = None,
              on_error: str = "raise", verify_images: str = "header", category_field: str = "name",
              lenient_labels: bool = False) -> tuple[SampleTable, LoadReport]:
    """Read a COCO JSON file: one row per annotation with its box and category."""
    check_on_error(on_error)
    path = Path(os.path.abspath(os.fspath(path)))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO object with images, annotations and categories")
    images = _entries(data, "images", path, ("id", "file_name"))
    anns = _entries(data, "annotations", path, ("image_id", "category_id", "bbox"))
    cats = _entries(data, "categories", path, ("id", category_field))
    image_of = _index(images, "images", path)
    cat_of = _index(cats, "categories", path)

    base = os.path.abspath(os.fspath(image_root)) if image_root is not None else str(path.parent)
    report = LoadReport(source=str(path), kind="COCO annotations")
    n = len(anns)

    def locate(rows: np.ndarray) -> str:
        rows = np.asarray(rows)
        shown = ", ".join(f"annotations[{int(i)}]" + (f" (id {anns[int(i)]['id']})" if "id" in anns[int(i)] else "")
                          for i in rows[:3])
        return f"{path.name} {shown}" + (f" (+{len(rows) - 3} more)" if len(rows) > 3 else "")

    paths = np.full(n, "", dtype=object)
    labels = np.full(n, "", dtype=object)
    boxes = np.full((n, 4), np.nan)
    sizes = np.full((n, 2), -1, dtype=np.int64)
    no_image, no_cat, bad_box = [], [], []
    used_images = np.zeros(len(images), dtype=bool)
    for i, a in enumerate(anns):
        im = image_of.get(a["image_id"])
        cat = cat_of.get(a["category_id"])
        box = _box(a["bbox"])
        if im is None:
            no_image.append(i)
        else:
            used_images[im] = True
            entry = images[im]
            paths[i] = os.path.normpath(os.path.join(base, str(entry["file_name"])))
            sizes[i] = [int(entry.get("width") or -1), int(entry.get("height") or -1)]
        if cat is None:
            no_cat.append(i)
        else:
            labels[i] = str(cats[cat][category_field]).strip()
        if box is None:
            bad_box.append(i)
        else:
            boxes[i] = box
    bad = np.zeros(n, dtype=bool)
    report_rows(report, "bad_reference", np.array(no_image, dtype=np.int64), locate,
                lambda i: f"image_id {anns[i]['image_id']!r} is not in images[]")
    report_rows(report, "bad_reference", np.array(no_cat, dtype=np.int64), locate,
                lambda i: f"category_id {anns[i]['category_id']!r} is not in categories[]")
    report_rows(report, "bad_box", np.array(bad_box, dtype=np.int64), locate,
                lambda i: f"bbox {anns[i]['bbox']!r} is not [x, y, width, height]")
    bad[no_image + no_cat + bad_box] = True
    nodes = np.full(n, -1, dtype=np.int64)
    has_cat = ~np.isin(np.arange(n), no_cat)
    if has_cat.any():
        idx = np.flatnonzero(has_cat)
        sub_nodes, sub_bad = resolve_labels(taxonomy, labels[idx], lambda r: locate(idx[np.asarray(r)]), report,
                                            lenient=lenient_labels)
        nodes[idx] = sub_nodes
        bad[idx] |= sub_bad
    if (~used_images).any():
        report.note(f"{int((~used_images).sum())} image(s) have no annotation and are not used "
                    f"(e.g. {images[int(np.flatnonzero(~used_images)[0])]['file_name']})")
    if n == 0:
        raise DataError(f"{path}: no annotations (one sample is made per annotation)")
    return assemble(report, paths=paths, locate=locate, verify_images=verify_images, on_error=on_error,
                    labels=labels, nodes=nodes, bad=bad, boxes=boxes, sizes=sizes)
