"""Dataset integrity check: what `resunetpp data check` prints and what training refuses.

Unusable (the check fails, `ok` is False; the pair is dropped under ``skip_bad``):
  image without mask, mask without image, duplicate id (``a.jpg`` and ``a.png`` in one folder: which one
  is meant is unknowable), empty (0-byte) or unreadable image or mask, image and mask of different sizes.
  A dataset with no pairs at all (empty images/ and masks/) fails too, and so does a broken symbolic link.
Warnings (reported, the data is still used):
  a non-image file (Thumbs.db, README, .DS_Store) or a subfolder inside images/ or masks/ (ignored),
  an all-empty mask (a frame without a polyp is legal data, but often a broken export; a mask whose
  largest grey level is 2..127 is named as such), 0/1 label masks (largest value 1: read as labels
  under ``mask_values="auto"``, all background under "255"), and soft masks (more than
  `SOFT_FRACTION` of the pixels neither near 0 nor near 255: thresholded at 127 all the same).

The quick check (``deep=False``, used when a dataset is opened) lists the folders and reads only file
headers; the full check (``deep=True``, `check_dataset`'s default) decodes every file, so truncated
files and all-empty masks are found too. Every problem names its file.

Split leaks (warnings, full check only; ``split=`` a split file, or "auto" for the committed split of a
known dataset whose ids are the dataset's): a near-duplicate group (`resunetpp.data.leaks`, perceptual hash of
every image, computed while decoding) with images in two parts, and, for a dataset with committed video
sequences (CVC-ClinicDB), sequences with frames in two parts.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError
from rich import box
from rich.console import Console
from rich.table import Table

from resunetpp.data import leaks
from resunetpp.data.layouts import KNOWN_DATASETS, Source, natural_sorted
from resunetpp.data.leaks import phash
from resunetpp.data.splits import default_split, load_split
from resunetpp.io import (
    IMAGE_EXTENSIONS,
    MASK_VALUES,
    NOT_AN_IMAGE,
    ImageReadError,
    decode_error,
    mask_from_grey,
    mask_grey,
    read_image,
)
from resunetpp.progress import progress_bar

# summary rows, in print order
COUNTS = ("pairs found", "images without masks", "masks without images", "duplicate ids", "unreadable or empty files",
          "size mismatches", "all-empty masks", "0/1 label masks", "soft masks", "non-image files", "split leaks")
WARNING_KINDS = ("all-empty masks", "0/1 label masks", "soft masks", "non-image files", "split leaks")
SOFT_FRACTION = 0.05  # a mask with more pixels than this between NEAR and 255 - NEAR is "soft"
NEAR = 32


class Problem(NamedTuple):
    path: Path
    what: str


@dataclass
class CheckReport:
    """The result of a check. `problems` make pairs unusable; `warnings` do not."""

    root: Path
    name: str
    layout: str
    pairs: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # every id with one image and one mask
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    bad_ids: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    deep: bool = False
    hashes: dict[str, int] = field(default_factory=dict)  # perceptual hash of each image (full check)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def good_ids(self) -> list[str]:
        return natural_sorted(i for i in self.pairs if i not in self.bad_ids)

    def add(self, kind: str, path: Path, what: str, *, warning: bool = False, bad_id: str | None = None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        (self.warnings if warning else self.problems).append(Problem(Path(path), what))
        if bad_id is not None:
            self.bad_ids.add(bad_id)

    def headline(self) -> str:
        status = "OK" if self.ok else "FAILED"
        return f"{self.root} ({self.name}, layout {self.layout}): {len(self.good_ids):,} usable pairs, {status}"

    def table(self):
        """The summary as a rich Table."""
        table = Table(box=box.SIMPLE)
        table.add_column("check")
        table.add_column("count", justify="right")
        table.add_column("severity")
        for kind in COUNTS:
            n = self.counts.get(kind, 0)
            sev = "" if kind == "pairs found" else ("warning" if kind in WARNING_KINDS else "unusable")
            if kind in ("all-empty masks", "0/1 label masks", "soft masks", "split leaks") and not self.deep:
                table.add_row(kind, "not checked", "warning")
                continue
            table.add_row(kind, f"{n:,}", sev if n else "")
        return table

    def format(self, limit: int = 20) -> str:
        """A short plain-text table plus the files at fault (at most `limit` of each kind)."""
        buf = io.StringIO()
        Console(file=buf, width=110, color_system=None, force_terminal=False).print(self.table())
        lines = [self.headline(), buf.getvalue().rstrip("\n")]
        for title, items in (("unusable", self.problems), ("warnings", self.warnings)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {p.path}: {p.what}" for p in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        if self.problems:
            lines.append("Fix or remove these files, or set skip_bad to use only the good pairs.")
        return "\n".join(lines)


class DatasetCheckError(ValueError):
    """A dataset that failed its check; the message is the report, `report` the CheckReport."""

    def __init__(self, report: CheckReport):
        self.report = report
        super().__init__("dataset check failed:\n" + report.format())


def header_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header only; ImageReadError when the file is empty or not an image."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
        except Exception as e:
            raise ImageReadError(path, f"unreadable TIFF ({e})") from None
        if len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4):
            shape = shape[1:]  # planar (C, H, W)
        return int(shape[0]), int(shape[1])
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except UnidentifiedImageError:
        raise ImageReadError(path, NOT_AN_IMAGE) from None
    except Exception as e:
        raise decode_error(path, e) from None


def _list_folder(folder: Path, report: CheckReport) -> dict[str, Path]:
    """{stem: path} of the image files in `folder`; strays, subfolders and duplicate stems go to the report."""
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_symlink() and not p.exists():
            report.add("unreadable or empty files", p, f"broken symbolic link (points to {os.readlink(p)}); "
                       "fix or remove it", bad_id=p.stem)
        elif p.is_dir():
            report.add("non-image files", p, "subfolder ignored", warning=True)
        elif p.suffix.lower() not in IMAGE_EXTENSIONS:
            report.add("non-image files", p, "not an image file (ignored)", warning=True)
        else:
            by_stem.setdefault(p.stem, []).append(p)
    files = {}
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            names = ", ".join(q.name for q in paths)
            report.add("duplicate ids", paths[0], f"duplicate id {stem!r}: {names} (keep one)", bad_id=stem)
        files[stem] = paths[0]
    return files


def _deep_read(pair: tuple[Path, Path], mask_values: str = "auto"):
    """(image (H, W), mask (H, W), mask not empty, (largest grey level, soft fraction, perceptual hash))."""
    image = read_image(pair[0])
    grey = mask_grey(pair[1])
    mask = mask_from_grey(grey, mask_values)
    soft = float(np.count_nonzero((grey > NEAR) & (grey < 255 - NEAR))) / max(1, grey.size)
    return image.shape[:2], mask.shape, bool(mask.any()), (float(grey.max()) if grey.size else 0.0, soft,
                                                           phash(image))


def scan(source: Source, deep: bool = True, progress: bool = False, workers: int | None = None,
         mask_values: str = "auto") -> CheckReport:
    """Check the dataset at `source` (see the module docstring)."""
    if mask_values not in MASK_VALUES:
        raise ValueError(f"unknown mask values {mask_values!r}; choose one of {', '.join(MASK_VALUES)}")
    report = CheckReport(source.root, source.name, source.layout, deep=deep)
    _pair_files(source, report)
    todo = [i for i in report.pairs if i not in report.bad_ids]
    read = (lambda pair: _deep_read(pair, mask_values)) if deep else \
        (lambda pair: (header_size(pair[0]), header_size(pair[1]), True, None))

    def one(i):
        try:
            return i, read(report.pairs[i]), None
        except ImageReadError as e:
            return i, None, e
        except OSError as e:  # name the file at fault, which may be the mask
            return i, None, ImageReadError(e.filename or report.pairs[i][0], str(e))

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(one, todo)
        if progress:
            results = progress_bar(results, total=len(todo), desc=f"checking {source.name}", unit="pair")
        for i, got, err in results:
            if err is not None:
                report.add("unreadable or empty files", err.path, err.reason, bad_id=i)
            else:
                _judge_pair(report, i, got, mask_values)
    return report


def _pair_files(source: Source, report: CheckReport) -> None:
    """List the image and mask folders into `report.pairs`; an unmatched file, or no files at all, is a problem."""
    images = _list_folder(source.image_dir, report)
    masks = _list_folder(source.mask_dir, report)
    mask_dir = source.mask_dir.name
    image_dir = source.image_dir.name
    for stem in natural_sorted(set(images) - set(masks)):
        report.add("images without masks", images[stem], f"no mask {stem}.* in {mask_dir}/", bad_id=stem)
    for stem in natural_sorted(set(masks) - set(images)):
        report.add("masks without images", masks[stem], f"no image {stem}.* in {image_dir}/", bad_id=stem)
    report.pairs = {i: (images[i], masks[i]) for i in natural_sorted(set(images) & set(masks))}
    report.counts["pairs found"] = len(report.pairs)
    if not images and not masks:
        report.problems.append(Problem(source.root, f"no images in {image_dir}/ and no masks in {mask_dir}/: "
                                       "nothing to train or evaluate on; put the image and mask files there"))


def _judge_pair(report: CheckReport, i: str, got: tuple, mask_values: str) -> None:
    """Add to `report` what the read of pair `i` shows: a size mismatch, and (full check) its mask's warnings."""
    (ih, iw), (mh, mw), nonempty, stats = got
    mask_path = report.pairs[i][1]
    if (ih, iw) != (mh, mw):
        report.add("size mismatches", mask_path,
                   f"mask is {mw}x{mh} but its image {report.pairs[i][0].name} is {iw}x{ih} (WxH)", bad_id=i)
        return
    top, soft, report.hashes[i] = stats if stats is not None else (None, 0.0, None)
    if report.hashes[i] is None:
        del report.hashes[i]
    if top == 1 and mask_values == "auto":
        report.add("0/1 label masks", mask_path, "mask values are 0/1 (largest 1): read as labels, polyp = 1 "
                   "(mask values 01); choose mask values 255 if 1 means background noise", warning=True)
    elif not nonempty:
        if top is not None and 0 < top <= 127:
            hint = ("a 0/1 label mask? choose mask values 01 (or auto)" if top == 1 else
                    "if it is a label image, rescale it to 0/255")
            what = f"mask is all background: its largest grey level is {top:g} (< 128); {hint}"
        else:
            what = "mask is all background (no pixel > 127)"
        report.add("all-empty masks", mask_path, what, warning=True)
    if soft > SOFT_FRACTION:
        report.add("soft masks", mask_path, f"soft mask: {100 * soft:.1f}% of its pixels are neither near 0 "
                   f"nor near 255 (grey {NEAR + 1}..{254 - NEAR}); thresholded at 127", warning=True)


def check_folder(source: Source, deep: bool = True, progress: bool = False, mask_values: str = "auto",
                 split: str | os.PathLike | None = None) -> CheckReport:
    """Check a located raw dataset folder (`resunetpp.data.check_dataset` is the entry point for any
    dataset); `scan` plus, with `split`, the leak audit."""
    report = scan(source, deep=deep, progress=progress, mask_values=mask_values)
    if deep and split is not None:
        audit_split(report, split)
    return report


def audit_split(report: CheckReport, split: str | os.PathLike) -> None:
    """Add "split leaks" warnings to a full check's report (module docstring)."""
    if str(split) == "auto":
        if report.name not in KNOWN_DATASETS:
            return
        split = default_split(report.name)
        parts = load_split(split)
        if {i for p in leaks.PARTS for i in parts[p]} != set(report.good_ids):
            return  # a subset or another version of the dataset: the committed split does not describe it
    else:
        parts = load_split(split)
    where = {i: p for p in leaks.PARTS for i in parts[p]}
    for group in leaks.near_duplicate_groups(report.hashes):
        inside = [i for i in group if i in where]
        if len({where[i] for i in inside}) > 1:
            names = ", ".join(f"{report.pairs[i][0].name} ({where[i]})" for i in inside)
            report.add("split leaks", report.pairs[inside[0]][0], f"near-duplicate images in different parts of "
                       f"{split}: {names}", warning=True)
    path = leaks.sequences_path(report.name)
    if path.is_file():
        seqs = leaks.load_sequences(path)
        cut = leaks.split_leaks(parts, seqs)
        if cut:
            one, both = leaks.neighbour_leaks(parts, seqs)
            report.add("split leaks", Path(split), f"{len(cut)} of {len(seqs)} video sequences ({path.name}) have "
                       f"frames in more than one part; {one} of {len(parts['test'])} test frames have a "
                       f"neighbouring frame in train ({both} both neighbours). For leak-free scores use a split "
                       "that keeps every sequence in one part (grouped by sequences)", warning=True)


def choose_ids(report: CheckReport, ids: Sequence[str] | None, skip_bad: bool) -> list[str]:
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


def fail_or_warn(report: CheckReport, skip_bad: bool) -> None:
    if report.ok:
        return
    if not skip_bad:
        raise DatasetCheckError(report)
    _skip_warning(report, sorted(report.bad_ids))


def _skip_warning(report: CheckReport, skipped: Sequence[str]) -> None:
    lines = [f"  {p.path}: {p.what}" for p in report.problems[:50]]
    more = f"\n  ... and {len(report.problems) - 50} more" if len(report.problems) > 50 else ""
    warnings.warn(f"{report.root}: skipping {len(skipped)} unusable pair(s) "
                  f"({', '.join(skipped[:20])}{', ...' if len(skipped) > 20 else ''}):\n" + "\n".join(lines) + more,
                  UserWarning, stacklevel=4)
