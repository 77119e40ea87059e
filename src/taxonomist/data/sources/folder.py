"""Image folders: ``root/<label>/*.jpg`` (labelled) or ``root/*.jpg`` (unlabelled).

The label of an image is the name of its top-level folder under ``root``
(images in deeper sub-folders belong to that same label), resolved with
``Taxonomy.find`` (a taxon name or a node key). Hidden files and folders are
skipped; other non-image files are ignored and noted in the report.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import DataError
from ...taxonomy import Taxonomy
from ..labels import resolve_labels
from ..report import LoadReport, check_on_error
from ..table import SampleTable
from ._assemble import assemble, report_rows

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan(folder: str, recursive: bool) -> tuple[list[str], list[str], list[str]]:
    """(image files, other files, sub-folders) under ``folder``, sorted, hidden entries skipped."""
    images: list[str] = []
    others: list[str] = []
    subdirs: list[str] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        with os.scandir(current) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    (stack.append if recursive else subdirs.append)(entry.path)
                elif is_image_name(entry.name):
                    images.append(entry.path)
                else:
                    others.append(entry.path)
    return sorted(images), sorted(others), sorted(subdirs)


def _note_others(report: LoadReport, others: list[str], root: str) -> None:
    if others:
        shown = ", ".join(os.path.relpath(p, root) for p in others[:3])
        report.note(f"{len(others)} non-image file(s) ignored (e.g. {shown}); image extensions: "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}")


def has_label_folders(root: str | Path) -> bool:
    """True if ``root`` has at least one (non-hidden) sub-folder."""
    with os.scandir(root) as it:
        return any(e.is_dir() and not e.name.startswith(".") for e in it)


def load_image_folder(root: str | Path, taxonomy: Taxonomy | None, *, labelled: bool | None = None,
                      on_error: str = "raise", verify_images: str = "header",
                      lenient_labels: bool = False) -> tuple[SampleTable, LoadReport]:
    """Read an image folder into a SampleTable.

    labelled: ``True`` = ``root/<label>/...``; ``False`` = the images directly in
        ``root`` are unlabelled (node -1); ``None`` (default) = labelled when
        ``root`` has sub-folders.
    lenient_labels: folder names that are not in the taxonomy, and images directly in
        ``root``, give unlabelled rows (noted) instead of problems; empty label
        folders are noted — for prediction, where labels are optional.
    """
    check_on_error(on_error)
    root_s = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root_s):
        raise DataError(f"{root_s}: not a folder")
    images, others, subdirs = _scan(root_s, recursive=False)
    if labelled is None:
        labelled = bool(subdirs)
    report = LoadReport(source=root_s, kind="image folder" if labelled else "unlabelled image folder")
    if not labelled:
        if subdirs:
            report.note(f"{len(subdirs)} sub-folder(s) ignored (unlabelled folder: only images directly in it)")
        _note_others(report, others, root_s)
        if not images:
            raise DataError(f"{root_s}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        locate = _folder_locator(root_s, images)
        return assemble(report, paths=images, locate=locate, verify_images=verify_images, on_error=on_error,
                        labels=np.full(len(images), "", dtype=object), nodes=np.full(len(images), -1))
    if taxonomy is None:
        raise DataError(f"{root_s}: a labelled image folder needs a taxonomy to map folder names to nodes")
    if not subdirs:
        raise DataError(f"{root_s}: no label sub-folders (expected {root_s}/<label>/<image>); "
                        "for a folder of unlabelled images use labelled=False")
    paths: list[str] = []
    labels: list[str] = []
    empty: list[str] = []
    for sub in subdirs:
        imgs, other, _ = _scan(sub, recursive=True)
        others.extend(other)
        if not imgs:
            empty.append(os.path.basename(sub))
        paths.extend(imgs)
        labels.extend([os.path.basename(sub)] * len(imgs))
    for name in empty:
        if lenient_labels:
            report.note(f"label folder {name}/ has no images")
        else:
            report.add("empty_class", f"{name}/", "no image files in this label folder")
    stray = images
    all_paths = np.array(paths + stray, dtype=object)
    all_labels = np.array(labels + [""] * len(stray), dtype=object)
    locate = _folder_locator(root_s, list(all_paths))
    nodes = np.full(len(all_paths), -1, dtype=np.int64)
    bad = np.zeros(len(all_paths), dtype=bool)
    n_lab = len(paths)
    if n_lab:
        nodes[:n_lab], bad[:n_lab] = resolve_labels(taxonomy, all_labels[:n_lab], locate, report,
                                                    lenient=lenient_labels)
    if stray and lenient_labels:
        report.note(f"{len(stray)} image(s) directly in the root folder are unlabelled (node -1)")
    elif stray:
        report_rows(report, "stray_file", np.arange(n_lab, len(all_paths)), locate,
                    "directly in the root folder, so it has no label")
        bad[n_lab:] = True
    _note_others(report, others, root_s)
    return assemble(report, paths=all_paths, locate=locate, verify_images=verify_images, on_error=on_error,
                    labels=all_labels, nodes=nodes, bad=bad)


def _folder_locator(root: str, paths: list[str]):
    """Rows -> ``label/file.jpg`` (one) or ``label/ (N images: a.jpg, b.jpg, ...)`` (a group)."""
    def rel(i: int) -> str:
        return os.path.relpath(paths[i], root)

    def locate(rows: np.ndarray) -> str:
        rows = np.asarray(rows)
        if len(rows) == 1:
            return rel(int(rows[0]))
        folders = {os.path.dirname(rel(int(i))) for i in rows[:50]}
        head = f"{folders.pop()}/ " if len(folders) == 1 else ""
        shown = ", ".join(os.path.basename(paths[int(i)]) for i in rows[:3])
        return f"{head}({len(rows)} images: {shown}{', ...' if len(rows) > 3 else ''})"
    return locate


def load_image_files(files: list[str | Path], *, on_error: str = "raise",
                     verify_images: str = "header") -> tuple[SampleTable, LoadReport]:
    """Individual image files (unlabelled), e.g. from the command line."""
    check_on_error(on_error)
    paths = [os.path.abspath(os.fspath(f)) for f in files]
    report = LoadReport(source=f"{len(paths)} image file(s)", kind="image files")
    return assemble(report, paths=paths, locate=lambda rows: ", ".join(paths[int(i)] for i in rows[:3]),
                    verify_images=verify_images, on_error=on_error,
                    labels=np.full(len(paths), "", dtype=object), nodes=np.full(len(paths), -1))
