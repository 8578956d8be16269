"""Predicted polyps as COCO instance annotations: pre-annotations for labelling tools (`predict --coco FILE`).

One `images` entry per segmented input (id from 1, `file_name` relative to the inputs' deepest common folder,
as `predict` names its outputs, `width`, `height`), whether or not a polyp was found; one `annotations`
entry per 8-connected component of the post-processed mask (the mask `predict` writes): category 1
"polyp", `segmentation` a compressed COCO RLE ({"size": [h, w], "counts": str}, column-major, as pycocotools
writes it), `area` in pixels, `bbox` [x, y, width, height], `iscrowd` 0 (one instance each, as in
COCO-Stuff's RLE annotations) and `score` (the mean probability inside). Inputs that could not be read are
not listed (predictions.csv names them).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from resunetpp.utils import write_json
from resunetpp.version import __version__

CATEGORY = {"id": 1, "name": "polyp", "supercategory": "lesion"}


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """The compressed COCO RLE of an (H, W) bool mask: {"size": [H, W], "counts": str}, identical to
    `pycocotools.mask.encode(np.asfortranarray(mask.astype(np.uint8)))` with counts decoded to str."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # where a run starts
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]  # counts start with a run of zeros
    if not flat.size:
        counts = []
    out = []
    for i, count in enumerate(counts):  # pycocotools' rleToString: LEB128-like, 5 bits a character
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return {"size": [int(h), int(w)], "counts": "".join(out)}


def instances(mask: np.ndarray, prob: np.ndarray) -> list[dict[str, Any]]:
    """The annotations (without ids) of one post-processed mask: one per 8-connected component, largest first."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, np.uint8), connectivity=8)
    out = []
    for i in sorted(range(1, n), key=lambda k: -int(stats[k, cv2.CC_STAT_AREA])):
        x, y, w, h, area = (int(v) for v in stats[i])
        component = labels == i
        out.append({"category_id": CATEGORY["id"], "segmentation": rle_encode(component), "area": area,
                    "bbox": [x, y, w, h], "iscrowd": 0, "score": round(float(prob[component].mean()), 4)})
    return out


class CocoWriter:
    """Collects images and their predicted instances; `write(path)` saves the COCO file atomically."""

    def __init__(self, description: str = "resunetpp predictions"):
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.description = description

    def add(self, file_name: str, mask: np.ndarray, prob: np.ndarray) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "height": int(mask.shape[0]),
                            "width": int(mask.shape[1])})
        for ann in instances(mask, prob):
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, **ann})
        return image_id

    def document(self) -> dict[str, Any]:
        return {"info": {"description": self.description, "version": __version__,
                         "date_created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                         "contributor": f"resunetpp {__version__} (model predictions: check before use)"},
                "licenses": [], "categories": [dict(CATEGORY)], "images": self.images,
                "annotations": self.annotations}

    def write(self, path: str | os.PathLike) -> Path:
        write_json(path, self.document())
        return Path(path)
