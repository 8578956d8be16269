"""Figures (matplotlib, Agg backend: no display needed): training curves and the paper's Fig. 3.

- `plot_curves(history, path)`: train/val loss and val Dice/IoU per epoch from `metrics.csv` rows,
  the best epoch marked.
- `plot_fig3(images, masks, predictions, path)`: one row per image: the image, its ground truth, then
  each model's predicted mask, with column titles (Jha et al. 2019, Fig. 3).
- `plot_polyp_dice(detection, path)`: the per-polyp Dice histogram of an evaluation, with its detection
  figures in the title.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

from resunetpp.utils import atomic_path


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no display). Imported on first use: pyplot takes a
    second to load, and a command that draws nothing should not pay it."""
    matplotlib.use("Agg", force=False)  # before pyplot is first imported
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    finally:
        pyplot().close(fig)  # also when saving fails: pyplot keeps every open figure alive
    return path


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Loss (train, val) and val Dice / IoU against the epoch."""
    plt = pyplot()
    epochs = [int(r["epoch"]) for r in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [float(r["train_loss"]) for r in history], label="train")
    ax_loss.plot(epochs, [float(r["val_loss"]) for r in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    dice = [float(r["val_dice"]) for r in history]
    ax_dice.plot(epochs, dice, label="val Dice")
    ax_dice.plot(epochs, [float(r["val_iou"]) for r in history], label="val IoU")
    best = int(np.argmax(dice))
    ax_dice.axvline(epochs[best], color="grey", ls=":", lw=1)
    ax_dice.scatter([epochs[best]], [dice[best]], color="C0", zorder=3,
                    label=f"best {dice[best]:.4f} (epoch {epochs[best]})")
    ax_dice.set(xlabel="epoch", ylabel="score", title="validation (mean over images)", ylim=(0, 1))
    ax_dice.legend(loc="lower right")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_polyp_dice(detection: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Bars of `detection["polyp_dice_histogram"]` (from `metrics.summarize_detection`): how many ground-truth
    polyps got each per-polyp Dice; the IoU 0.5 line (Dice 2/3) marks where a polyp counts as found."""
    plt = pyplot()
    h = detection["polyp_dice_histogram"]
    edges, counts = np.asarray(h["edges"], dtype=float), h["counts"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="C2", edgecolor="white")
    ax.axvline(2 / 3, color="grey", ls=":", lw=1, label="IoU 0.5 (Dice 2/3)")
    ax.set(xlabel="per-polyp Dice", ylabel="polyps", xlim=(0, 1),
           title=f"{detection['polyps']} polyps: found {detection['sensitivity_iou50']:.1%} at IoU >= 0.5, "
                 f"{detection['sensitivity_any']:.1%} at any overlap")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


def _hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)
    return a.squeeze(-1) if a.ndim == 3 and a.shape[-1] == 1 else a


def plot_fig3(images: torch.Tensor, masks: torch.Tensor, predictions: Mapping[str, torch.Tensor],
              path: str | os.PathLike, row_labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Rows: image, ground truth, then one predicted mask per entry of `predictions` (title -> masks).

    `images` uint8 (K, 3, H, W); `masks` and each prediction (K, 1, H, W) binary.
    """
    plt = pyplot()
    k = len(images)
    cols = ["Image", "Ground truth", *predictions]
    fig, axes = plt.subplots(k, len(cols), figsize=(1.9 * len(cols), 1.9 * k + (0.4 if title else 0)), squeeze=False)
    for r in range(k):
        panels = [_hwc(images[r]), _hwc(masks[r]), *(_hwc(p[r]) for p in predictions.values())]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel, cmap=None if panel.ndim == 3 else "gray", vmin=0, vmax=255 if panel.ndim == 3 else 1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=10)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[r]), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
