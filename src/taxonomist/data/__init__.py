"""Data: the SampleTable model, sources (folder, CSV/TSV, COCO), splits, image
datasets and transforms, and the on-disk feature cache. See docs/data.md."""

from .feature_cache import CacheStats, cache_info, clear_feature_cache, extract_features
from .images import ImageDataset, load_rgb
from .load import detect_kind, load_images, load_samples
from .report import DataWarning, LoadReport, Problem
from .sources import load_coco, load_image_files, load_image_folder, load_table_file
from .splits import split_samples
from .table import SampleTable
from .transforms import Preprocess, build_transform
from .verify import check_images

__all__ = [
    "SampleTable", "LoadReport", "Problem", "DataWarning",
    "load_samples", "load_images", "detect_kind",
    "load_image_folder", "load_image_files", "load_table_file", "load_coco",
    "check_images", "split_samples",
    "Preprocess", "build_transform", "ImageDataset", "load_rgb",
    "extract_features", "clear_feature_cache", "cache_info", "CacheStats",
]
