"""The taxonomy engine: one tree model (node ids, root first) for every hierarchy."""

from .core import DISTANCE_METRICS, Taxonomy
from .errors import AmbiguousNameError, TaxonomyError, UnknownNameError

__all__ = ["Taxonomy", "TaxonomyError", "AmbiguousNameError", "UnknownNameError", "DISTANCE_METRICS"]

# --- importers / exporters (taxonomy/io) and DAG -> tree ---------------------------------
from .dag import DAG_RULES, DagTree, dag_to_tree  # noqa: E402
from .io import (FORMATS, LoadReport, MissingDependencyError, detect_format, load, read_edge_table,  # noqa: E402
                 read_lineage_table, read_nested_json, read_newick, read_outline, read_path_strings,
                 read_taxonomy_json, read_wordnet, save, validate_taxonomy)

Taxonomy.load = staticmethod(load)  # type: ignore[attr-defined]
Taxonomy.save = save  # type: ignore[attr-defined]

__all__ += ["load", "save", "detect_format", "FORMATS", "LoadReport", "MissingDependencyError", "read_edge_table",
            "read_lineage_table", "read_nested_json", "read_newick", "read_outline", "read_path_strings",
            "read_taxonomy_json", "read_wordnet", "validate_taxonomy", "dag_to_tree", "DagTree", "DAG_RULES"]
