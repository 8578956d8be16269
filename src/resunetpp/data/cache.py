"""Prepared cache: a compact resized copy of a dataset that `load_pairs` reads fast.

Layout of a cache folder::

    manifest.json    {"format": "resunetpp-cache", "version": 2, "dataset", "size": [h, w], "ids", "image_ext", ...}
    split.json       the committed split for a known dataset with the same ids, else make_split(ids, seed=0)
    images/<id>.webp lossless WebP of the resized uint8 RGB array (cv2.INTER_AREA, bilinear when enlarging):
                     decoding gives back exactly the array that loading the source at this size gives
    masks/<id>.png   1-bit PNG (0 / 255), resized by nearest neighbour

Exact by default: `load_pairs(cache)` returns tensors bit-identical to `load_pairs(source, size=...)`, so
training on the cache sees what evaluation on the source files sees. Measured at 256x256: Kvasir-SEG 62 MB,
CVC-ClinicDB 26 MB (lossless WebP; PNG would be 90 + 35 MB). ``quality=N`` writes JPEG quality N images
instead (`images/<id>.jpg`, 4:2:0 chroma, lossy: 24 + 11 MB at q95), for when size matters more than exactness.
Version-1 caches (JPEG) are still read.

The manifest is written last, so a half-written cache is never mistaken for a finished one; the
cache is built in a temporary folder beside `out` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from resunetpp.data.check import CheckReport, choose_ids, fail_or_warn, scan
from resunetpp.data.folder import decode_pairs
from resunetpp.data.layouts import CACHE_FORMAT, CACHE_MANIFEST, KNOWN_DATASETS, Source, locate
from resunetpp.data.pairs import Pairs, Size, parse_size, stack_pairs
from resunetpp.data.splits import default_split, load_split, make_split, save_split
from resunetpp.io import ImageReadError
from resunetpp.utils import write_json

CACHE_VERSION = 2
JPEG_QUALITY = 95
LOSSLESS = [cv2.IMWRITE_WEBP_QUALITY, 101]  # > 100: WebP lossless


def _write_bytes(path: Path, ext: str, array: np.ndarray, params: list[int]) -> None:
    ok, buf = cv2.imencode(ext, array, params)
    if not ok:
        raise OSError(f"{path}: could not encode {ext}")
    path.write_bytes(buf.tobytes())


def prepare_cache(root: str | os.PathLike, out: str | os.PathLike, size: Size = 256, layout: str | None = None,
                  skip_bad: bool = False, progress: bool = True, quality: int | None = None) -> Path:
    """Write a resized copy of the dataset at `root` to `out` (see the module docstring); returns `out`.

    The dataset is checked fully on the way (every file is decoded); a failing one raises
    DatasetCheckError unless ``skip_bad``, and the skipped ids are recorded in the manifest. ``quality=None``
    (the default) stores the images losslessly (WebP), an int stores JPEG at that quality.
    """
    if quality is not None and not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality {quality}: must be 1..100 (or None for lossless images)")
    source = locate(root, layout)
    if source.layout == "cache":
        raise ValueError(f"{source.root}: is already a prepared cache")
    hw = parse_size(size)
    if hw is None:
        raise ValueError("prepare_cache needs a size")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / CACHE_MANIFEST).is_file():
        raise FileExistsError(f"{out}: exists and is not a cache; choose an empty or new folder")

    report = scan(source, deep=False)
    todo = {i: report.pairs[i] for i in report.good_ids}
    decoded = decode_pairs(todo, hw, report, progress, desc=f"preparing {source.name} at {hw[0]}x{hw[1]}")
    report.deep = True
    fail_or_warn(report, skip_bad)
    ids = [i for i in report.good_ids if i in decoded]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        ext, params = (".webp", LOSSLESS) if quality is None else (".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        png = [cv2.IMWRITE_PNG_COMPRESSION, 9, cv2.IMWRITE_PNG_BILEVEL, 1]

        def write(i):
            image, mask = decoded[i]
            _write_bytes(tmp / "images" / f"{i}{ext}", ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
            _write_bytes(tmp / "masks" / f"{i}.png", ".png", mask * np.uint8(255), png)

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # the encoders release the GIL
            list(pool.map(write, ids))
        split_note = _write_split(tmp / "split.json", source.name, ids)
        write_json(tmp / CACHE_MANIFEST, {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "dataset": source.name, "size": list(hw),
            "ids": ids, "source": str(source.root), "layout": source.layout, "image_ext": ext,
            "images": ("lossless WebP (exact)" if quality is None else f"JPEG quality {quality} (lossy)")
            + ", cv2.INTER_AREA (bilinear when enlarging)",
            "masks": "PNG 0/255, nearest neighbour; read back as > 127",
            "split": split_note, "skipped": sorted(report.bad_ids),
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_split(path: Path, name: str, ids: list[str]) -> str:
    if name in KNOWN_DATASETS:
        committed = load_split(default_split(name))
        if {i for p in ("train", "val", "test") for i in committed[p]} == set(ids):
            shutil.copyfile(default_split(name), path)
            return f"committed default split for {name}"
    save_split(make_split(ids, seed=0), path, dataset=name, seed=0)
    return "make_split(ids, seed=0)"


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / CACHE_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable cache manifest ({e})") from None
    for key in ("dataset", "size", "ids"):
        if key not in manifest:
            raise ValueError(f"{path}: cache manifest lacks {key!r}")
    if manifest.get("version", 0) > CACHE_VERSION:
        raise ValueError(f"{path}: cache version {manifest['version']} is newer than this resunetpp reads "
                         f"({CACHE_VERSION}); upgrade resunetpp or prepare the cache again")
    return manifest


def _read_cached(image_path: Path, mask_path: Path, size=None) -> tuple[np.ndarray, np.ndarray]:
    """Fast decode of one cached pair with OpenCV (sizes already match)."""
    out = []
    for path, flag in ((image_path, cv2.IMREAD_COLOR), (mask_path, cv2.IMREAD_GRAYSCALE)):
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            raise ImageReadError(path, f"cannot read cached file ({e})") from None
        a = cv2.imdecode(data, flag) if data.size else None
        if a is None:
            raise ImageReadError(path, "corrupt cached file (not decodable); prepare the cache again")
        out.append(a)
    image, mask = out
    if image.shape[:2] != mask.shape:
        raise ImageReadError(mask_path, f"mask size {mask.shape} differs from its image's {image.shape[:2]}")
    if size is not None and image.shape[:2] != tuple(size):
        raise ImageReadError(image_path, f"cached image is {image.shape[1]}x{image.shape[0]}, "
                                         f"expected {size[1]}x{size[0]} (WxH)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (mask > 127).astype(np.uint8)


def _cache_report(source: Source, manifest: dict) -> CheckReport:
    report = CheckReport(source.root, source.name, "cache")
    ext = manifest.get("image_ext", ".jpg")  # version 1: JPEG
    for i in manifest["ids"]:
        image, mask = source.image_dir / f"{i}{ext}", source.mask_dir / f"{i}.png"
        if not image.is_file():
            report.add("images without masks" if mask.is_file() else "unreadable or empty files", image,
                       "listed in manifest.json but missing", bad_id=i)
        elif not mask.is_file():
            report.add("images without masks", image, f"no mask {mask.name} in masks/", bad_id=i)
        report.pairs[i] = (image, mask)
    report.counts["pairs found"] = len(report.pairs)
    return report


def check_cache(source: Source, deep: bool = True, progress: bool = False) -> CheckReport:
    """Check a cache: every manifest id has its files, and (deep) they decode at the manifest's size."""
    manifest = read_manifest(source.root)
    report = _cache_report(source, manifest)
    report.deep = deep
    if deep:
        todo = {i: report.pairs[i] for i in report.good_ids}
        decode_pairs(todo, tuple(manifest["size"]), report, progress, desc=f"checking {source.name}",
                     reader=_read_cached)
    return report


def load_cache(source: Source, ids: Sequence[str] | None = None, size: tuple[int, int] | None = None,
               skip_bad: bool = False, progress: bool = True) -> Pairs:
    manifest = read_manifest(source.root)
    cached = tuple(manifest["size"])
    if size is not None and tuple(size) != cached:
        raise ValueError(f"{source.root}: the cache holds {cached[0]}x{cached[1]} (HxW) pairs, not "
                         f"{size[0]}x{size[1]}; pass size=None (or the cache's size) or prepare another cache")
    report = _cache_report(source, manifest)
    chosen = choose_ids(report, ids, skip_bad=True)
    todo = {i: report.pairs[i] for i in chosen if i not in report.bad_ids}
    decoded = decode_pairs(todo, cached, report, progress, desc=f"loading {source.name} cache", reader=_read_cached)
    fail_or_warn(report, skip_bad)
    keep = [i for i in chosen if i in decoded]
    return stack_pairs([decoded[i] for i in keep], keep, source.name)
