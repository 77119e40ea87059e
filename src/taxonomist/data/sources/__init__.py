"""Readers that turn a data source into a SampleTable and a LoadReport.

One module per format: image folders (:mod:`.folder`), CSV/TSV tables
(:mod:`.tabular`), COCO JSON (:mod:`.coco`). All share the checks in
:mod:`._assemble` (duplicates, image files, crop boxes, the raise/skip policy).
"""

from .coco import load_coco
from .folder import IMAGE_EXTENSIONS, load_image_files, load_image_folder
from .tabular import load_table_file

__all__ = ["load_image_folder", "load_image_files", "load_table_file", "load_coco", "IMAGE_EXTENSIONS"]
