"""The data layer: readers, integrity check, splits, prepared cache, augmentation and downloads.

Modules: `layouts` (which dataset, where its files are), `check` (integrity), `pairs` (a dataset in memory),
`folder` (raw folders: SegmentationFolder), `cache` (prepared caches), `load` (load_pairs and check_dataset
for either), `splits`, `leaks`, `augment` (Augment: one warp per batch), `download`, `show` (pictures).
Each module's docstring states its conventions.
"""

from __future__ import annotations

from resunetpp.data.augment import Augment
from resunetpp.data.cache import prepare_cache
from resunetpp.data.check import CheckReport, DatasetCheckError, Problem
from resunetpp.data.download import download_dataset
from resunetpp.data.folder import SegmentationFolder
from resunetpp.data.layouts import detect_layout, natural_sorted
from resunetpp.data.load import check_dataset, load_pairs
from resunetpp.data.pairs import Pairs, parse_size
from resunetpp.data.splits import (
    NAMED_SPLITS,
    dataset_part,
    default_split,
    load_split,
    make_split,
    named_split_path,
    official_split_path,
    save_split,
)

__all__ = [
    "NAMED_SPLITS", "Augment", "CheckReport", "DatasetCheckError", "Pairs", "Problem", "SegmentationFolder",
    "check_dataset", "dataset_part", "default_split", "detect_layout", "download_dataset", "load_pairs", "load_split",
    "make_split", "named_split_path", "natural_sorted", "official_split_path", "parse_size", "prepare_cache",
    "save_split",
]
