"""Synthetic dataset builders shared by the tests/data/test_*.py files (no tests here).

Every fixture is generated: no dataset file is ever copied into the repository.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def blob_mask(h: int, w: int, k: int) -> np.ndarray:
    """A deterministic, asymmetric (H, W) bool mask: an ellipse that moves with k, plus a corner block."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx = h * (0.3 + 0.05 * (k % 5)), w * (0.35 + 0.04 * (k % 7))
    m = ((yy - cy) / (0.2 * h)) ** 2 + ((xx - cx) / (0.15 * w)) ** 2 < 1
    m[: h // 6, w - w // 4:] = True
    return m


def blob_image(mask: np.ndarray, k: int) -> np.ndarray:
    """An RGB uint8 image whose colour follows the mask, with some texture."""
    h, w = mask.shape
    rng = np.random.default_rng(k)
    img = rng.integers(40, 90, size=(h, w, 3), dtype=np.uint8)
    img[mask] = (200, 80, 60)
    return img


def write_rgb(path: Path, rgb: np.ndarray, quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    if ext in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, rgb)
        return path
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb, params)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def write_mask(path: Path, mask: np.ndarray) -> Path:
    return write_rgb(path, mask.astype(np.uint8) * 255)


def make_dataset(root: Path, n: int = 6, size: tuple[int, int] = (40, 48), image_dir: str = "images",
                 mask_dir: str = "masks", image_ext: str = ".png", mask_ext: str = ".png",
                 vary_size: bool = False) -> Path:
    """n pairs named 1..n (natural sort matters) under root/image_dir and root/mask_dir."""
    for k in range(1, n + 1):
        h, w = size
        if vary_size:
            h, w = h + 4 * k, w + 2 * k
        m = blob_mask(h, w, k)
        write_rgb(root / image_dir / f"{k}{image_ext}", blob_image(m, k))
        write_mask(root / mask_dir / f"{k}{mask_ext}", m)
    return root
