"""A learnable synthetic dataset of discs and the tiny training settings the training tests share."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from resunetpp.training import TrainConfig

TINY = {"filters": [8, 8, 8, 8, 8]}


def write_discs(root: Path, n: int = 24, size: int = 32, seed: int = 0, corrupt: int | None = None) -> Path:
    """A learnable synthetic dataset: images/<i>.png with a bright noisy disc, masks/<i>.png of the disc."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        r = rng.uniform(size * 0.12, size * 0.3)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = rng.normal(50, 12, (size, size, 3))
        img[disc] += 140
        cv2.imwrite(str(root / "images" / f"{i}.png"), np.clip(img, 0, 255).astype(np.uint8))
        cv2.imwrite(str(root / "masks" / f"{i}.png"), disc.astype(np.uint8) * 255)
    if corrupt is not None:
        (root / "images" / f"{corrupt}.png").write_bytes(b"")
    return root


def tiny(data, out, **kw) -> TrainConfig:
    base = dict(model="resunetpp", model_kwargs=TINY, data=str(data), out=str(out), size=32, epochs=3, batch_size=4,
                lr=3e-3, augment="light", progress=False)
    return TrainConfig(**{**base, **kw})
