"""Image/mask pairs as tensors: a per-item `SegmentationFolder` and the whole-dataset `load_pairs`.

Conventions:
- images are uint8 (3, H, W) RGB; masks uint8 (1, H, W) with values {0, 1}: the mask file's grey level
  (mean of its colour channels) > 127, via `resunetpp.io.read_mask`, so JPEG noise and CVC-ClinicDB's
  faint 1..20 values fall on the right side.
- `size` is an int (square) or (h, w). Images are resized with cv2.INTER_AREA when shrinking and
  bilinear when enlarging; masks with nearest neighbour (cv2.INTER_NEAREST_EXACT, pixel-centre aligned
  like the image resize), so they stay binary.
- ids are the file stems, sorted naturally ("2" before "10").
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import ImageReadError, read_image, read_mask
from .check import CheckReport, DatasetCheckError, scan
from .layouts import locate

Size = int | tuple[int, int] | Sequence[int] | str | None


def parse_size(size: Size) -> tuple[int, int] | None:
    """None, 256, "256", (288, 384) or "288x384" (HxW) -> (h, w) or None."""
    if size is None:
        return None
    if isinstance(size, str):
        parts = size.lower().replace("*", "x").split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"size {size!r}: expected an integer or HxW such as 288x384") from None
        size = vals[0] if len(vals) == 1 else vals
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        vals = list(size)
        if len(vals) != 2:
            raise ValueError(f"size {size!r}: expected an integer or (height, width)")
        h, w = (int(v) for v in vals)
    if h < 1 or w < 1:
        raise ValueError(f"size {size!r}: must be positive")
    return h, w


def resize_image(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3): area when shrinking (no aliasing), bilinear when enlarging."""
    if size is None or image.shape[:2] == tuple(size):
        return image
    h, w = size
    shrink = h <= image.shape[0] and w <= image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W) bool/uint8 -> (h, w) uint8 {0, 1} by nearest neighbour."""
    mask = mask.astype(np.uint8)
    if size is None or mask.shape == tuple(size):
        return mask
    h, w = size
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)


def read_pair(image_path: Path, mask_path: Path, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, mask (H, W) uint8 {0, 1}) at `size`; ImageReadError naming the file at fault."""
    image = read_image(image_path)
    mask = read_mask(mask_path)
    if image.shape[:2] != mask.shape:
        (ih, iw), (mh, mw) = image.shape[:2], mask.shape
        raise ImageReadError(mask_path, f"mask is {mw}x{mh} but its image {Path(image_path).name} is {iw}x{ih} (WxH)")
    image, mask = resize_image(image, size), resize_mask(mask, size)
    # PIL hands out read-only arrays; torch wants writable ones
    return (image if image.flags.writeable else image.copy()), (mask if mask.flags.writeable else mask.copy())


def _skip_warning(report: CheckReport, skipped: Sequence[str]) -> None:
    lines = [f"  {p.path}: {p.what}" for p in report.problems[:50]]
    more = f"\n  ... and {len(report.problems) - 50} more" if len(report.problems) > 50 else ""
    warnings.warn(f"{report.root}: skipping {len(skipped)} unusable pair(s) "
                  f"({', '.join(skipped[:20])}{', ...' if len(skipped) > 20 else ''}):\n" + "\n".join(lines) + more,
                  UserWarning, stacklevel=4)


def _choose_ids(report: CheckReport, ids: Sequence[str] | None, skip_bad: bool) -> list[str]:
    """The ids to use: all good ones, or `ids` (in the order given) minus skipped bad ones."""
    if ids is None:
        return report.good_ids
    ids = [str(i) for i in ids]
    missing = [i for i in ids if i not in report.pairs and i not in report.bad_ids]
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise KeyError(f"{report.root}: {len(missing)} requested id(s) not in the dataset: {shown}")
    if skip_bad:
        return [i for i in ids if i not in report.bad_ids]
    return ids


def _fail_or_warn(report: CheckReport, skip_bad: bool) -> None:
    if report.ok:
        return
    if not skip_bad:
        raise DatasetCheckError(report)
    _skip_warning(report, sorted(report.bad_ids))


class SegmentationFolder(Dataset):
    """A torch Dataset over a folder of image/mask pairs matched by file stem.

    ``[i] -> (image uint8 (3, H, W), mask uint8 (1, H, W) in {0, 1})``. Opening it runs the quick check
    (listing and file headers); a failing dataset raises DatasetCheckError unless ``skip_bad=True``,
    which keeps the good pairs and warns with the skipped ones. A file that turns out unreadable when
    decoded raises ImageReadError naming it.
    """

    def __init__(self, root: str | os.PathLike, layout: str | None = None, ids: Sequence[str] | None = None,
                 size: Size = None, skip_bad: bool = False):
        self.source = locate(root, layout)
        self.root = self.source.root
        self.layout = self.source.layout
        self.name = self.source.name
        self.size = parse_size(size)
        self.report = scan(self.source, deep=False)
        _fail_or_warn(self.report, skip_bad)
        chosen = _choose_ids(self.report, ids, skip_bad)
        self.pairs: dict[str, tuple[Path, Path]] = {i: self.report.pairs[i] for i in chosen}
        self.ids: list[str] = list(self.pairs)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = read_pair(*self.pairs[self.ids[index]], size=self.size)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)[None]

    def __repr__(self) -> str:
        return f"SegmentationFolder({str(self.root)!r}, name={self.name!r}, pairs={len(self)}, size={self.size})"


@dataclass
class Pairs:
    """A whole dataset in memory: images uint8 (N, 3, H, W), masks uint8 (N, 1, H, W) in {0, 1}."""

    images: torch.Tensor
    masks: torch.Tensor
    ids: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def select(self, ids: Sequence[str]) -> Pairs:
        """The pairs with these ids, in this order (e.g. a split's "train" list)."""
        index = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise KeyError(f"{self.name}: {len(missing)} id(s) not loaded: {shown}")
        k = torch.as_tensor([index[i] for i in ids], dtype=torch.long, device=self.images.device)
        return Pairs(self.images.index_select(0, k), self.masks.index_select(0, k), list(ids), self.name)

    def to(self, device: str | torch.device) -> Pairs:
        return Pairs(self.images.to(device), self.masks.to(device), self.ids, self.name)

    def batches(self, batch_size: int, shuffle: bool = True, augment: torch.nn.Module | None = None,
                drop_last: bool = False, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images float [0, 1], masks float {0, 1}) batches on the tensors' device, augmented if given.

        Indexing and augmentation happen on that device, so a GPU never waits on a CPU loader. The
        order is drawn from `generator` (or torch's global CPU RNG).
        """
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.images.device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            k = order[start:start + batch_size]
            images = self.images.index_select(0, k).float().div_(255.0)
            masks = self.masks.index_select(0, k).float()
            if augment is not None:
                images, masks = augment(images, masks)
            yield images, masks


def _stack(items: list[tuple[np.ndarray, np.ndarray]], ids: list[str], name: str) -> Pairs:
    n = len(items)
    if n == 0:
        return Pairs(torch.zeros(0, 3, 0, 0, dtype=torch.uint8), torch.zeros(0, 1, 0, 0, dtype=torch.uint8), ids, name)
    h, w = items[0][1].shape
    images = np.empty((n, 3, h, w), dtype=np.uint8)  # numpy's strided copy is much faster than torch's here
    masks = np.empty((n, 1, h, w), dtype=np.uint8)
    for k, (image, mask) in enumerate(items):
        images[k] = image.transpose(2, 0, 1)
        masks[k, 0] = mask
    return Pairs(torch.from_numpy(images), torch.from_numpy(masks), ids, name)


def decode_pairs(pairs: dict[str, tuple[Path, Path]], size: tuple[int, int] | None, report: CheckReport | None,
                 progress: bool, desc: str, reader=read_pair) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode pairs in threads (the codecs release the GIL); failures go to `report` (or raise without one)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    workers = min(8, os.cpu_count() or 1)

    def one(i):
        try:
            return i, reader(*pairs[i], size=size), None
        except ImageReadError as e:
            if report is None:
                raise
            return i, None, e

    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(one, list(pairs))
        if progress:
            from ..progress import progress_bar

            results = progress_bar(results, total=len(pairs), desc=desc, unit="pair")
        for i, got, err in results:
            if err is not None:
                kind = "size mismatches" if "mask is" in err.reason else "unreadable or empty files"
                report.add(kind, err.path, err.reason, bad_id=i)
            else:
                out[i] = got
                if report is not None and not got[1].any():
                    report.add("all-empty masks", pairs[i][1], "mask is all background (no pixel > 127)",
                               warning=True)
    return out


def load_pairs(data: str | os.PathLike, ids: Sequence[str] | None = None, size: Size = 256, skip_bad: bool = False,
               progress: bool = True, layout: str | None = None) -> Pairs:
    """Load a whole dataset (or the given ids) as uint8 tensors resized to `size`.

    `data` is a raw dataset folder or a cache made by `prepare_cache` (the fast path: no resizing,
    only JPEG/PNG decoding). Every file is decoded, so the check is the full one: a failing dataset
    raises DatasetCheckError (its message is the `resunetpp data check` report) unless ``skip_bad``.
    ``size=None`` keeps the native size, which must then be the same for every pair.
    """
    source = locate(data, layout)
    size = parse_size(size)
    if source.layout == "cache":
        from .cache import load_cache

        return load_cache(source, ids=ids, size=size, skip_bad=skip_bad, progress=progress)
    report = scan(source, deep=False)
    chosen = _choose_ids(report, ids, skip_bad=True)  # bad ones are reported below, after decoding
    todo = {i: report.pairs[i] for i in chosen if i not in report.bad_ids}
    decoded = decode_pairs(todo, size, report, progress, desc=f"loading {source.name}")
    report.deep = ids is None
    _fail_or_warn(report, skip_bad)
    keep = [i for i in chosen if i in decoded]
    if size is None and keep:
        shapes = {decoded[i][1].shape for i in keep}
        if len(shapes) > 1:
            a, b = sorted(shapes)[:2]
            raise ValueError(f"{source.root}: images have different sizes (e.g. {a[1]}x{a[0]} and {b[1]}x{b[0]}); "
                             "pass size= to resize them")
    return _stack([decoded[i] for i in keep], keep, source.name)
