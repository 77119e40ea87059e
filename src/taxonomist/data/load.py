"""``load_samples``: any data source -> SampleTable, dispatching on its kind.

=========  ==========================================================
kind       source
=========  ==========================================================
folder     ``root/<label>/*.jpg`` (labelled image folder)
images     ``root/*.jpg`` (unlabelled images, e.g. for prediction)
table      CSV/TSV sample table (``.csv``, ``.tsv``, ``.tab``, ``.txt``)
coco       COCO JSON with bounding boxes (``.json``)
pack       a packed HDF5 file from ``taxonomist pack`` (``.h5``/``.hdf5``, or the
           name of a sharded pack: ``train.h5`` for ``train-0000k-of-0000n.h5``)
auto       by the path: a folder with sub-folders is ``folder``, a folder
           of images is ``images``, else by extension
=========  ==========================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, DataError
from ..taxonomy import Taxonomy
from .report import LoadReport, check_on_error
from .sources import load_coco, load_image_files, load_image_folder, load_table_file
from .sources.folder import has_label_folders, is_image_name
from .sources.packed import PACK_SUFFIXES, load_packed
from .sources.tabular import TAB_SUFFIXES
from .table import SampleTable
from .verify import VERIFY_CHOICES

SourceKind = Literal["auto", "folder", "images", "table", "csv", "coco", "pack"]
KINDS: tuple[str, ...] = ("auto", "folder", "images", "table", "csv", "coco", "pack")


def detect_kind(source: str | Path) -> str:
    """The kind ``auto`` resolves to for this path (see the module docstring)."""
    path = Path(source)
    if path.is_dir():
        return "folder" if has_label_folders(path) else "images"
    suffix = path.suffix.lower()
    if suffix in TAB_SUFFIXES or suffix == ".csv":
        return "table"
    if suffix == ".json":
        return "coco"
    if suffix in PACK_SUFFIXES:
        return "pack"
    if not path.exists():
        raise DataError(f"data source not found: {path}")
    raise DataError(f"{path}: unknown data source kind (expected an image folder, a .csv/.tsv table or a COCO "
                    f".json); pass kind= one of {', '.join(KINDS[1:])}")


def load_samples(source: str | Path, taxonomy: Taxonomy | None, *, kind: str = "auto",
                 image_root: str | Path | None = None, on_error: str = "raise", verify_images: str = "header",
                 label_column: str | None = None, rank_columns: Sequence[str] | None = None,
                 metadata_columns: Sequence[str] = (), attribute_columns: Sequence[str] = (),
                 path_column: str | None = None, lenient_labels: bool = False,
                 return_report: bool = False, **options: Any) -> SampleTable | tuple[SampleTable, LoadReport]:
    """Read an image folder, CSV/TSV table or COCO JSON into a :class:`SampleTable`.

    on_error: ``"raise"`` (default): any problem (missing/corrupt image, unknown or
        ambiguous label, empty class folder, duplicate row, bad box or value)
        raises a DataError whose message is the full report; ``"skip"``: bad rows
        are dropped, a :class:`~taxonomist.data.report.DataWarning` carries the
        report, and ``table.report`` keeps it.
    verify_images: ``"header"`` (open every image header, fast), ``"decode"``
        (decode every image) or ``"none"`` (existence only).
    lenient_labels: labels not in the taxonomy give unlabelled rows (node -1, noted)
        instead of problems; for prediction inputs.
    image_root: where relative image paths of a table or COCO file start (default:
        the file's folder); not used for image folders.
    return_report: also return the LoadReport.
    options: passed to the format's reader (e.g. ``sep=``, ``split_column=`` for
        tables, ``category_field=`` for COCO, ``labelled=`` for folders).
    """
    check_on_error(on_error)
    if verify_images not in VERIFY_CHOICES:
        raise ConfigError(f"verify_images={verify_images!r}; choose one of: {', '.join(VERIFY_CHOICES)}")
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r}; choose one of: {', '.join(KINDS)}")
    source = Path(os.path.abspath(os.fspath(source)))
    if not source.exists() and source.suffix.lower() not in PACK_SUFFIXES:  # a sharded pack has no file of its name
        raise DataError(f"data source not found: {source}")
    if kind == "auto":
        kind = detect_kind(source)
    common = {"on_error": on_error, "verify_images": verify_images}
    if kind in ("folder", "images"):
        _no_table_options(kind, label_column=label_column, rank_columns=rank_columns,
                          metadata_columns=metadata_columns, attribute_columns=attribute_columns,
                          path_column=path_column)
        options.setdefault("labelled", kind == "folder")
        table, report = load_image_folder(source, taxonomy, lenient_labels=lenient_labels, **common, **options)
    elif kind in ("table", "csv"):
        table, report = load_table_file(source, taxonomy, image_root=image_root, label_column=label_column,
                                        rank_columns=rank_columns, metadata_columns=metadata_columns,
                                        attribute_columns=attribute_columns, path_column=path_column,
                                        lenient_labels=lenient_labels, **common, **options)
    elif kind == "pack":
        _no_table_options(kind, label_column=label_column, rank_columns=rank_columns,
                          metadata_columns=metadata_columns, attribute_columns=attribute_columns,
                          path_column=path_column)
        table, report = load_packed(source, taxonomy, on_error=on_error, lenient_labels=lenient_labels)
    else:
        _no_table_options(kind, label_column=label_column, rank_columns=rank_columns,
                          metadata_columns=metadata_columns, attribute_columns=attribute_columns,
                          path_column=path_column)
        if taxonomy is None:
            raise DataError(f"{source}: reading COCO annotations needs a taxonomy")
        table, report = load_coco(source, taxonomy, image_root=image_root, lenient_labels=lenient_labels,
                                  **common, **options)
    return (table, report) if return_report else table


def _no_table_options(kind: str, **given: Any) -> None:
    used = [k for k, v in given.items() if v not in (None, (), [])]
    if used:
        raise ConfigError(f"option(s) {used} apply to CSV/TSV tables, not to a {kind} source")


def load_images(inputs: str | Path | Sequence[str | Path], taxonomy: Taxonomy | None, *,
                on_error: str = "raise", verify_images: str = "header",
                image_root: str | Path | None = None) -> SampleTable:
    """Images to predict: any mix of image files, image folders and sample tables.

    Labels found along the way (label folders, label columns) are kept as the
    truth when the taxonomy knows them; otherwise the row is unlabelled (node -1)
    and the report notes it. Rows keep the order of ``inputs``.
    """
    check_on_error(on_error)
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise DataError("no images given to predict")
    tables: list[SampleTable] = []
    reports: list[LoadReport] = []
    files: list[str] = []

    def flush_files() -> None:
        if files:
            t, r = load_image_files(list(files), on_error=on_error, verify_images=verify_images)
            tables.append(t)
            reports.append(r)
            files.clear()

    for item in items:
        path = Path(os.path.abspath(os.fspath(item)))
        if path.is_file() and is_image_name(path.name):
            files.append(str(path))
            continue
        flush_files()
        t, r = load_samples(path, taxonomy, image_root=image_root, on_error=on_error,
                            verify_images=verify_images, lenient_labels=True, return_report=True)
        tables.append(t)
        reports.append(r)
    flush_files()
    table = SampleTable.concat(tables) if len(tables) > 1 else tables[0]
    table.report = reports[0] if len(reports) == 1 else _merge_reports(reports)
    return table


def _merge_reports(reports: list[LoadReport]) -> LoadReport:
    out = LoadReport(source=", ".join(r.source for r in reports), kind="several sources")
    for r in reports:
        out.n_read += r.n_read
        out.n_kept += r.n_kept
        for kind, n in r.counts.items():
            out.counts[kind] = out.counts.get(kind, 0) + n
            out.examples.setdefault(kind, []).extend(r.examples.get(kind, []))
        out.notes.extend(r.notes)
    return out
