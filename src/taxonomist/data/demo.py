"""The bundled demo sample: a small real subset of the NDSB plankton data set.

``demo_root()/`` holds ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (all
121 classes), the official hierarchy (``taxonomy.txt`` indented tree and
``class_paths.tsv``) and ``MANIFEST.tsv``. It is generated from the shared NDSB
PlanktonSet 1.0 copy by ``scripts/make_demo_sample.py`` (seeded selection).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import DataError


def demo_root() -> Path:
    """Folder of the packaged demo data (``.../taxonomist/demo_data/plankton``)."""
    root = resources.files("taxonomist") / "demo_data" / "plankton"
    if not isinstance(root, Path):
        raise DataError("the taxonomist package is installed as a zip archive; the demo data needs a regular "
                        "(unzipped) installation: pip install taxonomist (not a zipapp)")
    if not (root / "train").is_dir() or not (root / "class_paths.tsv").is_file():
        raise DataError(f"the demo data is missing from {root}; from a source checkout, run "
                        "`python scripts/make_demo_sample.py` to build it")
    return root
