"""Mask preprocessing, pinned on hand-made mask files through `load_pairs` (what training and evaluation read):
the grey level is the mean of the colour channels, foreground is grey > 127, 0/1 label files are labels, masks
come out as {0, 1}, and resizing is nearest neighbour sampled at pixel centres (cv2.INTER_NEAREST_EXACT).
Every expected mask below is written out by hand. Fast: 8x8 files, no model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from resunetpp.data import load_pairs
from resunetpp.data.cache import prepare_cache

GREY = np.array([  # grey-level mask: 127 and below is background, 128 and above is polyp
    [0, 0, 127, 128, 255, 255, 20, 240],
    [0, 126, 127, 128, 129, 255, 3, 252],
] * 4, np.uint8)
GREY_TRUTH = GREY > 127

# colour mask: the mean of the three channels decides (red alone is mean 85: background, yellow 170: polyp;
# (126, 127, 128) is mean 127: background, (127, 127, 128) is 127.33: polyp)
COLOURS = {(255, 0, 0): False, (255, 255, 0): True, (200, 100, 90): True, (130, 130, 120): False,
           (126, 127, 128): False, (255, 255, 255): True, (128, 128, 128): True, (127, 127, 128): True}


def _colour_mask() -> tuple[np.ndarray, np.ndarray]:
    rgb = np.zeros((8, 8, 3), np.uint8)
    truth = np.zeros((8, 8), bool)
    for k, (colour, fg) in enumerate(COLOURS.items()):
        rgb[k, :] = colour
        truth[k, :] = fg
    truth[:, ::2] = False
    rgb[:, ::2] = 0
    return rgb, truth


def _write(root: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    cv2.imwrite(str(root / "images" / f"{name}.png"), image[:, :, ::-1])
    cv2.imwrite(str(root / "masks" / f"{name}.png"), mask[:, :, ::-1] if mask.ndim == 3 else mask)


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "masks-by-hand"
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    colour, colour_truth = _colour_mask()
    labels = np.zeros((8, 8), np.uint8)
    labels[2:5, 1:7] = 1  # a 0/1 label file: its largest value is 1, so 1 is polyp
    odd = np.zeros((8, 8), np.uint8)
    odd[1::2, 1::2] = 255  # polyp on odd rows and odd columns only
    truths = {"grey": GREY_TRUTH, "colour": colour_truth, "labels": labels == 1, "odd": odd > 0}
    for name, mask in (("grey", GREY), ("colour", colour), ("labels", labels), ("odd", odd)):
        _write(root, name, image, mask)
    return root, truths


def test_masks_are_the_grey_level_above_127_as_zero_one(dataset):
    root, truths = dataset
    pairs = load_pairs(root, size=8, progress=False)
    assert pairs.masks.dtype.is_floating_point is False and pairs.masks.shape == (4, 1, 8, 8)
    assert set(pairs.masks.unique().tolist()) == {0, 1}
    for i, name in enumerate(pairs.ids):
        assert pairs.masks[i, 0].numpy().astype(bool).tolist() == truths[name].tolist(), name


def test_mask_resize_is_nearest_at_pixel_centres(dataset):
    """8 -> 4: output pixel i samples input pixel floor((i + 0.5) * 2) = 2i + 1, so the odd-rows-and-columns
    mask becomes all polyp (sampling at 2i would make it empty; any interpolation would blur it)."""
    root, truths = dataset
    pairs = load_pairs(root, size=4, progress=False)
    by_name = {name: pairs.masks[i, 0].numpy() for i, name in enumerate(pairs.ids)}
    assert by_name["odd"].tolist() == [[1] * 4] * 4
    for name in ("grey", "colour", "labels"):
        assert by_name[name].astype(bool).tolist() == truths[name][1::2, 1::2].tolist(), name
    # 8 -> 16: every input pixel becomes a 2x2 block
    big = load_pairs(root, size=16, progress=False)
    for i, name in enumerate(big.ids):
        assert big.masks[i, 0].numpy().astype(bool).tolist() == np.kron(truths[name], np.ones((2, 2), bool)).tolist()


def test_a_prepared_cache_keeps_the_same_masks(dataset, tmp_path):
    root, truths = dataset
    cache = prepare_cache(root, tmp_path / "cache", size=4, progress=False)
    pairs = load_pairs(cache, size=4, progress=False)
    for i, name in enumerate(pairs.ids):
        assert pairs.masks[i, 0].numpy().astype(bool).tolist() == truths[name][1::2, 1::2].tolist(), name
