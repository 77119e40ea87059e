"""taxonomist: hierarchical (taxonomic) image classification with PyTorch."""

from .taxonomy import Taxonomy, TaxonomyError

__version__ = "0.1.0"
__all__ = ["Taxonomy", "TaxonomyError", "__version__"]
