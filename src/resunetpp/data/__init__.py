"""The data layer: readers, integrity check, splits, prepared cache, augmentation and downloads.

Modules: `layouts` (which dataset, where its files are), `check` (integrity), `pairs` (a dataset in memory),
`folder` (raw folders: SegmentationFolder), `cache` (prepared caches), `load` (load_pairs and check_dataset
for either), `splits`, `leaks`, `augment` (Augment: one warp per batch), `download`, `show` (pictures).
Each module's docstring states its conventions.
"""

from __future__ import annotations

from .augment import Augment
from .cache import prepare_cache
from .check import CheckReport, DatasetCheckError, Problem
from .download import download_dataset
from .folder import SegmentationFolder
from .layouts import detect_layout, natural_sorted
from .load import check_dataset, load_pairs
from .pairs import Pairs, parse_size
from .splits import default_split, load_split, make_split, save_split

__all__ = [
    "Augment", "CheckReport", "DatasetCheckError", "Pairs", "Problem", "SegmentationFolder", "check_dataset",
    "default_split", "detect_layout", "download_dataset", "load_pairs", "load_split", "make_split", "natural_sorted",
    "parse_size", "prepare_cache", "save_split",
]
