"""Taxonomy importers and exporters: one module per format, ``load``/``save`` auto-detect.

See docs/taxonomy.md for the formats, their options and examples.
"""

from ._common import MissingDependencyError
from .detect import FORMATS, AmbiguousFormatError, detect_format, load, resolve_format, save
from .edges import read_edge_table, write_edge_table
from .lineage import read_lineage_table, write_lineage_table
from .native import read_taxonomy_json, write_taxonomy_json
from .nested_json import read_nested_json, write_nested_json
from .newick import read_newick, write_newick
from .outline import read_outline, write_outline
from .paths import read_path_strings, write_path_strings
from .ranks import CANONICAL_RANKS, STANDARD_RANKS, rank_violations
from .report import LoadReport
from .validate import Validation, validate_taxonomy
from .wordnet import read_wordnet

__all__ = [
    "load", "save", "detect_format", "resolve_format", "FORMATS", "LoadReport", "AmbiguousFormatError",
    "MissingDependencyError", "read_edge_table", "write_edge_table", "read_lineage_table", "write_lineage_table",
    "read_taxonomy_json", "write_taxonomy_json", "read_nested_json", "write_nested_json", "read_newick",
    "write_newick", "read_outline", "write_outline", "read_path_strings", "write_path_strings", "read_wordnet",
    "CANONICAL_RANKS", "STANDARD_RANKS", "rank_violations", "Validation", "validate_taxonomy",
]
