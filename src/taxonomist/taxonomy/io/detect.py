"""``load(path)`` / ``save(taxonomy, path)``: pick the format by extension and content.

Detection (``format=None``):

* ``.nwk .newick .tre .tree .nhx`` -> newick;
* ``.json`` -> taxonomist's own JSON when it has ``"format": "taxonomist-taxonomy"``,
  else nested JSON;
* tables (``.csv .tsv .tab``, or text with a delimited header): a ``wnid`` column ->
  wordnet; id + parent columns -> edges; ``class<TAB>path`` or ``A > B`` cells -> paths;
  otherwise two or more columns -> lineage;
* other text: starts with ``(`` -> newick, ``{``/``[`` -> nested JSON, lines with
  ``>`` -> paths, else an indented outline.

Anything else is an error listing the formats and the ``format=`` option.
"""

from __future__ import annotations

import csv
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core import Taxonomy
from ..errors import TaxonomyError
from ._common import PathLike, head_lines, sniff_delimiter, suffix
from .edges import looks_like_edge_table, read_edge_table, write_edge_table
from .lineage import read_lineage_table, write_lineage_table
from .native import is_native, read_taxonomy_json, write_taxonomy_json
from .nested_json import parse_json, read_nested_json, write_nested_json
from .newick import read_newick, write_newick
from .outline import read_outline, write_outline
from .paths import _is_header as _is_paths_header
from .paths import read_path_strings, write_path_strings
from .report import LoadReport
from .wordnet import read_wordnet


@dataclass(frozen=True)
class Format:
    name: str
    reader: Callable[..., object]
    writer: Callable[..., object] | None
    extensions: tuple[str, ...]
    description: str
    carries: str  # what a written file keeps (docs and CLI)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("taxonomist-json", read_taxonomy_json, write_taxonomy_json, (".json",),
           "taxonomist's own columnar JSON", "everything (exact round trip, fingerprint checked)"),
    Format("nested-json", read_nested_json, write_nested_json, (".json",),
           "nested {name, rank, children} objects or a dict of dicts", "everything (names, ranks, keys, labels, "
           "rank order)"),
    Format("newick", read_newick, write_newick, (".nwk", ".newick", ".tre", ".tree", ".nhx"),
           "Newick tree (quoted names, branch lengths, NHX tags)", "structure, names; ranks, internal labels and "
           "rank order through NHX tags; not keys"),
    Format("edges", read_edge_table, write_edge_table, (".tsv", ".csv"),
           "parent/child edge table (NCBI, iNaturalist, Darwin Core)", "everything but the rank order "
           "(re-derived: canonical Linnaean order, else mean depth)"),
    Format("lineage", read_lineage_table, write_lineage_table, (".csv", ".tsv"),
           "one row per label, one column per rank", "ranked trees whose unranked nodes are label leaves; "
           "not keys"),
    Format("paths", read_path_strings, write_path_strings, (".tsv", ".txt"),
           "class<TAB>A > B > C path strings (EcoTaxa)", "structure, names, labels; not ranks or keys"),
    Format("outline", read_outline, write_outline, (".txt", ".outline"),
           "indented outline", "structure and names; not ranks, keys or internal labels"),
    Format("wordnet", read_wordnet, None, (),
           "WordNet ids (wnids), hypernym DAG -> tree (needs nltk)", "(read only)"),
)}

ALIASES = {"json": "taxonomist-json", "native": "taxonomist-json", "taxonomist": "taxonomist-json",
           "nested": "nested-json", "nwk": "newick", "tree": "newick", "edge": "edges", "ncbi": "edges",
           "inat": "edges", "inaturalist": "edges", "dwc": "edges", "darwin-core": "edges", "gbif": "edges",
           "edge-table": "edges", "lineage-table": "lineage", "ranks": "lineage", "path": "paths",
           "ecotaxa": "paths", "path-strings": "paths", "indent": "outline", "indented": "outline",
           "txt": "outline", "wnid": "wordnet", "wn": "wordnet"}

SAVE_BY_EXTENSION = {".json": "taxonomist-json", ".nwk": "newick", ".newick": "newick", ".tre": "newick",
                     ".tree": "newick", ".tsv": "edges", ".csv": "edges", ".txt": "outline",
                     ".outline": "outline"}


def _formats_help() -> str:
    return "; ".join(f"{name} ({f.description})" for name, f in FORMATS.items())


def resolve_format(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise TaxonomyError(f"unknown taxonomy format {name!r}; formats: {', '.join(FORMATS)}")
    return key


class AmbiguousFormatError(TaxonomyError):
    """The format of a file cannot be told from its name and content."""


def _ambiguous(path: PathLike, why: str) -> AmbiguousFormatError:
    return AmbiguousFormatError(f"cannot tell the taxonomy format of {path}: {why}. Pass format=... "
                                f"(CLI: --format) with one of: {_formats_help()}")


def detect_format(path: PathLike) -> str:
    """The format name of a file (see the module docstring)."""
    ext = suffix(path)
    if ext in FORMATS["newick"].extensions:
        return "newick"
    if ext == ".json":
        return "taxonomist-json" if is_native(parse_json(path)) else "nested-json"
    lines = [ln for ln in head_lines(path, 50) if ln.strip()]
    if not lines:
        raise TaxonomyError(f"{path}: the file is empty")
    first = lines[0].lstrip()
    if ext not in (".csv", ".tsv", ".tab"):
        if first.startswith("("):
            return "newick"
        if first.startswith(("{", "[")):
            return "nested-json"
    tabular = ext in (".csv", ".tsv", ".tab") or ("\t" in lines[0]) or ("," in lines[0] and ext != ".txt")
    if tabular:
        sep = sniff_delimiter(path, lines[0])
        header = next(csv.reader([lines[0]], delimiter=sep))
        low = [h.strip().lower() for h in header]
        if "wnid" in low:
            return "wordnet"
        if looks_like_edge_table(header):
            return "edges"
        if sep == "\t" and len(header) <= 2 and (_is_paths_header(header, ">")
                                                 or any(">" in ln.split("\t")[-1] for ln in lines)):
            return "paths"
        if len(header) >= 2:
            return "lineage"
        if any(">" in ln for ln in lines):
            return "paths"
        raise _ambiguous(path, f"a one-column table ({header[0]!r}) is neither an edge table nor a lineage table")
    if sum(">" in ln for ln in lines) >= max(1, len(lines) // 2):
        return "paths"
    if any(ln[:1] in (" ", "\t") for ln in lines) or ext in (".txt", ".outline", ""):
        return "outline"
    raise _ambiguous(path, f"unknown extension {ext!r}")


def _check_options(fmt: str, reader: Callable[..., object], options: dict[str, object]) -> None:
    params = inspect.signature(reader).parameters
    allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY and p != "return_report"]
    bad = [k for k in options if k not in allowed]
    if bad:
        raise TaxonomyError(f"the {fmt} reader has no option(s) {bad}; its options: {', '.join(allowed) or 'none'}")


def load(path: PathLike, format: str | None = None, *, return_report: bool = False,
         **options: object) -> Taxonomy | tuple[Taxonomy, LoadReport]:
    """Load a taxonomy file in any supported format (auto-detected unless ``format`` is given).

    ``options`` go to the format's reader (e.g. ``on_conflict="split"`` for lineage tables,
    ``orphans="attach_to_root"`` for edge tables, ``labels=[...]`` for most formats).
    ``return_report=True`` returns ``(taxonomy, LoadReport)``.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"taxonomy file not found: {path}")
    fmt = resolve_format(format) if format else detect_format(path)
    reader = FORMATS[fmt].reader
    _check_options(fmt, reader, options)
    tax, report = reader(path, return_report=True, **options)  # type: ignore[misc]
    return (tax, report) if return_report else tax


def save(taxonomy: Taxonomy, path: PathLike, format: str | None = None, **options: object) -> Path:
    """Write a taxonomy; the format comes from the extension (``.json`` own JSON, ``.nwk`` Newick,
    ``.tsv``/``.csv`` edge table, ``.txt`` outline) unless ``format`` is given. Returns the path."""
    if format:
        fmt = resolve_format(format)
    else:
        ext = suffix(path)
        if ext not in SAVE_BY_EXTENSION:
            raise TaxonomyError(f"cannot tell which format to write from the extension {ext!r} of {path}; pass "
                                f"format=... (one of {', '.join(n for n, f in FORMATS.items() if f.writer)})")
        fmt = SAVE_BY_EXTENSION[ext]
    writer = FORMATS[fmt].writer
    if writer is None:
        raise TaxonomyError(f"the {fmt} format is read-only; write another format")
    return writer(taxonomy, path, **options)  # type: ignore[return-value]
