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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from resunetpp.data.check import CheckReport, choose_ids, fail_or_warn, scan
from resunetpp.data.layouts import Source, locate
from resunetpp.data.leaks import phash
from resunetpp.data.pairs import Pairs, Size, parse_size, stack_pairs
from resunetpp.inference.transforms import resize_image, resize_mask  # noqa: F401  (also the data layer's names)
from resunetpp.io import ImageReadError, read_image, read_mask
from resunetpp.progress import progress_bar


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
        fail_or_warn(self.report, skip_bad)
        chosen = choose_ids(self.report, ids, skip_bad)
        self.pairs: dict[str, tuple[Path, Path]] = {i: self.report.pairs[i] for i in chosen}
        self.ids: list[str] = list(self.pairs)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = read_pair(*self.pairs[self.ids[index]], size=self.size)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)[None]

    def __repr__(self) -> str:
        return f"SegmentationFolder({str(self.root)!r}, name={self.name!r}, pairs={len(self)}, size={self.size})"


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


def load_folder(source: Source, ids: Sequence[str] | None = None, size: tuple[int, int] | None = (256, 256),
                skip_bad: bool = False, progress: bool = True) -> Pairs:
    """A raw dataset folder (or the given ids) as uint8 tensors resized to `size`; `load_pairs` in
    `resunetpp.data.load` dispatches here or to the cache reader. Every file is decoded, so the check is
    the full one: a failing dataset raises DatasetCheckError unless ``skip_bad``. ``size=None`` keeps
    the native size, which must then be the same for every pair."""
    report = scan(source, deep=False)
    chosen = choose_ids(report, ids, skip_bad=True)  # bad ones are reported below, after decoding
    todo = {i: report.pairs[i] for i in chosen if i not in report.bad_ids}
    decoded = decode_pairs(todo, size, report, progress, desc=f"loading {source.name}")
    report.deep = ids is None
    fail_or_warn(report, skip_bad)
    keep = [i for i in chosen if i in decoded]
    if size is None and keep:
        shapes = {decoded[i][1].shape for i in keep}
        if len(shapes) > 1:
            a, b = sorted(shapes)[:2]
            raise ValueError(f"{source.root}: images have different sizes (e.g. {a[1]}x{a[0]} and {b[1]}x{b[0]}); "
                             "pass size= to resize them")
    return stack_pairs([decoded[i] for i in keep], keep, source.name)


def hash_folder(root: str | os.PathLike, ids: Sequence[str] | None = None, layout: str | None = None,
                progress: bool = False) -> dict[str, int]:
    """{id: `leaks.phash`} of a dataset's images (decoded at their native size; a cache's resized images)."""
    ds = SegmentationFolder(root, layout=layout, ids=ids, skip_bad=True)
    paths = [ds.pairs[i][0] for i in ds.ids]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        it = pool.map(lambda p: phash(read_image(p)), paths)
        if progress:
            it = progress_bar(it, total=len(paths), desc=f"hashing {ds.name}", unit="img")
        return dict(zip(ds.ids, it))
