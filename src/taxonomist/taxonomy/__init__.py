"""The taxonomy engine: one tree model (node ids, root first) for every hierarchy."""

from .core import DISTANCE_METRICS, Taxonomy
from .errors import AmbiguousNameError, TaxonomyError, UnknownNameError

__all__ = ["Taxonomy", "TaxonomyError", "AmbiguousNameError", "UnknownNameError", "DISTANCE_METRICS"]
