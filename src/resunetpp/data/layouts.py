"""Where a dataset's images and masks live, and which dataset it is.

Layouts (`layout=` / `--layout`):

- ``kvasir-seg``: ``images/<id>.jpg`` + ``masks/<id>.jpg`` (the official ``kvasir-seg.zip``).
- ``cvc-clinicdb``: ``Original/`` + ``Ground Truth/``; given the folder that holds ``PNG/`` and ``TIF/``
  (the Kaggle-style copy) the PNG pair is used, and ``CVC-ClinicDB/TIF`` works directly. ``images/`` +
  ``masks/`` is accepted too.
- ``folder``: any ``images/`` + ``masks/`` pair with jpg, jpeg, png, tif, tiff or bmp files.
- ``cache``: a folder written by `prepare_cache` (it has ``manifest.json``).

Subfolder names match case-insensitively. Images and masks are paired by file stem: the stem is the
pair's id. Ids sort naturally ("2" before "10"), everywhere in this package.

When no layout fits but exactly one subfolder holds a dataset (e.g. the ``Kvasir-SEG/`` that the
download unpacks into ``--to``), that subfolder is used.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

LAYOUTS = ("kvasir-seg", "cvc-clinicdb", "folder", "cache")
KNOWN_DATASETS = ("kvasir-seg", "cvc-clinicdb")
CACHE_MANIFEST = "manifest.json"
CACHE_FORMAT = "resunetpp-cache"

_IMAGES = ("images", "image", "imgs")
_MASKS = ("masks", "mask", "labels")
_ORIGINAL = ("original",)
_GROUND_TRUTH = ("ground truth", "groundtruth", "ground_truth", "ground-truth")


def natural_key(s: str) -> tuple:
    """Sort key: digit runs compare as numbers ("2" < "10"); the raw string breaks ties ("1" vs "01")."""
    parts = re.split(r"(\d+)", s)
    return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), s)


def natural_sorted(ids) -> list[str]:
    return sorted(ids, key=natural_key)


@dataclass(frozen=True)
class Source:
    """A located dataset: its root, layout, name and the image / mask folders."""

    root: Path
    layout: str
    name: str
    image_dir: Path
    mask_dir: Path


def _child(folder: Path, names: tuple[str, ...]) -> Path | None:
    try:
        children = [p for p in folder.iterdir() if p.is_dir()]
    except OSError:
        return None
    for want in names:
        for p in children:
            if p.name.lower() == want:
                return p
    return None


def _pair_dirs(folder: Path, layout: str) -> tuple[Path, Path] | None:
    """The (image_dir, mask_dir) of `folder` under `layout`, or None."""
    if layout == "cvc-clinicdb":
        for sub in ("png", "tif", "tiff"):  # lossless PNG copy first, then the original TIFFs
            inner = _child(folder, (sub,))
            if inner is not None:
                found = _pair_dirs(inner, layout)
                if found:
                    return found
        o, g = _child(folder, _ORIGINAL), _child(folder, _GROUND_TRUTH)
        if o and g:
            return o, g
    i, m = _child(folder, _IMAGES), _child(folder, _MASKS)
    if i and m:
        return i, m
    return None


def _name_from_folder(folder: Path) -> str:
    """kvasir-seg / cvc-clinicdb when the folder (or its parent, for CVC-ClinicDB/PNG) says so, else a slug."""
    for p in (folder, folder.parent):
        low = p.name.lower()
        if "kvasir" in low and "sessile" not in low:
            return "kvasir-seg"
        if "clinic" in low:
            return "cvc-clinicdb"
    slug = re.sub(r"[^a-z0-9]+", "-", folder.name.lower()).strip("-")
    return slug or "dataset"


def _read_manifest(folder: Path) -> dict | None:
    path = folder / CACHE_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataLayoutError(f"{path}: unreadable cache manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        return None
    return manifest


def _detect_here(folder: Path) -> str | None:
    if _read_manifest(folder) is not None:
        return "cache"
    if _pair_dirs(folder, "cvc-clinicdb") and (_child(folder, _ORIGINAL) or _child(folder, ("png", "tif", "tiff"))):
        return "cvc-clinicdb"
    if _pair_dirs(folder, "folder"):
        name = _name_from_folder(folder)
        return name if name in KNOWN_DATASETS else "folder"
    return None


class DataLayoutError(ValueError):
    """A dataset path that is not a usable dataset (no layout, not a folder, several datasets, a bad cache):
    bad input, `resunetpp` exits 3."""


def _no_layout_error(root: Path) -> ValueError:
    try:
        subs = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())
    except OSError:
        subs = []
    found = ", ".join(subs[:12]) if subs else "no subfolders"
    return DataLayoutError(
        f"{root}: no dataset layout found (found {found}). Expected images/ + masks/ (Kvasir-SEG or any folder), "
        "Original/ + Ground Truth/ (CVC-ClinicDB, also under PNG/ or TIF/), or a cache made by "
        "`resunetpp data prepare` (manifest.json)."
    )


def _resolve(root: str | os.PathLike) -> tuple[Path, str]:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: folder not found")
    if not root.is_dir():
        raise DataLayoutError(f"{root}: not a folder (a dataset is a folder with images/ and masks/)")
    layout = _detect_here(root)
    if layout:
        return root, layout
    # a download folder holding one dataset folder (Kvasir-SEG/ inside --to)
    hits = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = _detect_here(child)
        if found:
            hits.append((child, found))
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        names = ", ".join(p.name + "/" for p, _ in hits)
        raise DataLayoutError(f"{root}: holds several datasets ({names}); point at one of them")
    raise _no_layout_error(root)


def detect_layout(root: str | os.PathLike) -> str:
    """"kvasir-seg" | "cvc-clinicdb" | "folder" | "cache" for the dataset at `root`.

    Raises FileNotFoundError / ValueError naming the folder when nothing fits.
    """
    return _resolve(root)[1]


def locate(root: str | os.PathLike, layout: str | None = None) -> Source:
    """Find the image and mask folders of the dataset at `root`; `layout` overrides detection."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    root = Path(root)
    if layout is None:
        folder, layout = _resolve(root)
    else:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: folder not found")
        folder = root
        if layout == "cache" and _read_manifest(root) is None:
            raise DataLayoutError(f"{root}: not a prepared cache (no valid {CACHE_MANIFEST})")
        if _pair_dirs(root, layout) is None and layout != "cache":
            # allow pointing at the download folder with an explicit layout
            kids = [c for c in sorted(root.iterdir()) if c.is_dir() and _pair_dirs(c, layout)]
            if len(kids) != 1:
                raise _no_layout_error(root)
            folder = kids[0]
    if layout == "cache":
        manifest = _read_manifest(folder)
        return Source(folder, "cache", str(manifest.get("dataset", folder.name)), folder / "images", folder / "masks")
    dirs = _pair_dirs(folder, layout)
    if dirs is None:
        raise _no_layout_error(folder)
    name = layout if layout in KNOWN_DATASETS else _name_from_folder(folder)
    return Source(folder, layout, name, dirs[0], dirs[1])


def dataset_name(data: str | os.PathLike) -> str:
    """"kvasir-seg", "cvc-clinicdb" (also for a prepared cache of them) or the folder's own name."""
    return locate(data).name
