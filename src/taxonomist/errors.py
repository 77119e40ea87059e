"""User-facing error types. The CLI prints these without a traceback; each message
names the file, row or key at fault and says how to fix it."""

from __future__ import annotations

from .taxonomy.errors import TaxonomyError
from .taxonomy.io import MissingDependencyError


class TaxonomistError(ValueError):
    """Base class of errors caused by the user's input."""


class ConfigError(TaxonomistError):
    """A config file or override is invalid (names the key and the allowed values)."""


class DataError(TaxonomistError):
    """A data source is invalid (names the file and rows at fault)."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message gives the pip command."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(f"{feature} needs the optional package {package!r}: "
                         f"pip install 'taxonomist[{extra}]'  (or: pip install {package})")


USER_ERRORS = (TaxonomistError, TaxonomyError, MissingExtraError, MissingDependencyError, FileNotFoundError)
