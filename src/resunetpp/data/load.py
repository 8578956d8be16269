"""One entry point for either kind of dataset: a raw folder (`folder`) or a prepared cache (`cache`).

`load_pairs` and `check_dataset` look at the layout and call the reader that owns it, so neither
reader imports the other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from resunetpp.data.cache import check_cache, load_cache
from resunetpp.data.check import CheckReport, check_folder
from resunetpp.data.folder import load_folder
from resunetpp.data.layouts import locate
from resunetpp.data.pairs import Pairs, Size, parse_size


def load_pairs(data: str | os.PathLike, ids: Sequence[str] | None = None, size: Size = 256, skip_bad: bool = False,
               progress: bool = True, layout: str | None = None) -> Pairs:
    """Load a whole dataset (or the given ids) as uint8 tensors resized to `size`.

    Every file is decoded, so the check is the full one (`resunetpp.data.check`).

    Args:
        data: a raw dataset folder or a cache made by `prepare_cache` (the fast path: no resizing, only
            decoding).
        ids: the pairs to load, in this order; None: every good pair.
        size: the size to resize to (an int, or (height, width)); None keeps the native size, which must
            then be the same for every pair.
        skip_bad: leave out the pairs that fail the check (with a warning) instead of refusing the dataset.
        progress: show a progress bar.
        layout: the folder layout; None detects it.

    Returns:
        The `Pairs`: uint8 images (N, 3, H, W), masks (N, 1, H, W) and their ids.

    Raises:
        DatasetCheckError: the dataset fails its check (the message is the `resunetpp data check` report)
            and `skip_bad` is not set.
        KeyError: an id of `ids` is not in the dataset.
        ValueError: native sizes that differ while `size` is None.
    """
    source = locate(data, layout)
    size = parse_size(size)
    if source.layout == "cache":
        return load_cache(source, ids=ids, size=size, skip_bad=skip_bad, progress=progress)
    return load_folder(source, ids=ids, size=size, skip_bad=skip_bad, progress=progress)


def check_dataset(root: str | os.PathLike, layout: str | None = None, deep: bool = True,
                  progress: bool = False, mask_values: str = "auto",
                  split: str | os.PathLike | None = None) -> CheckReport:
    """Check a dataset folder or a prepared cache; see `resunetpp.data.check` for what counts as unusable.
    `mask_values`: how masks encode the polyp, "auto" | "255" | "01" (`resunetpp.io.mask_from_grey`).
    `split`: a split file to audit for leaks, "auto" (the committed split of a known dataset) or None."""
    source = locate(root, layout)
    if source.layout == "cache":
        return check_cache(source, deep=deep, progress=progress)
    return check_folder(source, deep=deep, progress=progress, mask_values=mask_values, split=split)
