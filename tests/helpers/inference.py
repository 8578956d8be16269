"""Synthetic fixtures for the inference, export and video tests (no dataset file is ever copied).

A "disc image" is a noisy textured background with one brighter, reddish disc: a stand-in polyp.
`disc_model()` is a tiny ResUNet++ trained on such images for a few seconds, so that masks are
real predictions (confident inside and outside the disc) rather than noise around 0.5.

It is trained as `Segmenter` will use it: half of its images are drawn at other sizes and aspect
ratios (24..128 px a side) and resized to 32x32 with the data layer's own resize, so it has seen
the squashed discs that a 100x37 input becomes. (Trained on square 32x32 images only, it got
Dice 0.78-0.80 on a 100x37 image, on either side of the tests' 0.8 depending on the float
summation order of the machine and thread count.) Training runs on one thread whatever the suite
uses, so the weights are the same on every machine.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import cv2
import numpy as np
import torch

import resunetpp
from resunetpp.data.folder import resize_image, resize_mask

TINY = {"filters": [8, 8, 8, 8, 8]}
SIZE = 32
STEPS = 16


def disc_image(rng: np.random.Generator, h: int = SIZE, w: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB image and its (H, W) bool disc mask."""
    yy, xx = np.mgrid[:h, :w]
    r = rng.uniform(0.15, 0.3) * min(h, w)
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = rng.normal(70, 12, (h, w, 3))
    img[mask] = rng.normal((200, 110, 90), 12, (int(mask.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _training_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 32x32 disc image, or one of another size and aspect ratio resized to 32x32 as inference does."""
    if rng.random() < 0.5:
        return disc_image(rng)
    h, w = (int(v) for v in rng.integers(24, 129, 2))
    image, mask = disc_image(rng, h, w)
    return resize_image(image, (SIZE, SIZE)), resize_mask(mask, (SIZE, SIZE)).astype(bool)


@functools.lru_cache(maxsize=1)
def _trained_state() -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: the same weights whatever threads the suite uses
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        model = resunetpp.create_model("resunetpp", **TINY)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        pairs = [_training_pair(rng) for _ in range(64)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None].float()
        model.train()
        _train(model, opt, x, y)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(model, opt, x, y) -> None:
    for step in range(STEPS):
        idx = torch.arange(16) + (step % 4) * 16
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def disc_model() -> torch.nn.Module:
    """A fresh copy of the tiny trained disc segmenter, in eval mode."""
    model = resunetpp.create_model("resunetpp", **TINY)
    model.load_state_dict(copy.deepcopy(_trained_state()))
    return model.eval()


def save_disc_checkpoint(directory: Path, **config) -> Path:
    cfg = {"model": "resunetpp", "model_kwargs": TINY, "input_size": [SIZE, SIZE], **config}
    return resunetpp.save_pretrained(disc_model(), directory, cfg)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """Write RGB frames as an mp4v video with OpenCV."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path

