"""Contact sheets: images with their mask outlines, before and after augmentation (matplotlib)."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import torch

from resunetpp.data.augment import Augment
from resunetpp.data.cache import read_manifest
from resunetpp.data.check import scan
from resunetpp.data.layouts import locate
from resunetpp.data.load import load_pairs
from resunetpp.data.pairs import Size
from resunetpp.figures import pyplot
from resunetpp.utils import atomic_path


def draw_grid(images: torch.Tensor, masks: torch.Tensor, titles: list[str], out: str | os.PathLike,
              columns: int | None = None, suptitle: str | None = None) -> Path:
    """Save a grid of images (N, 3, H, W) (uint8 or float [0, 1]) with their masks (N, 1, H, W) outlined."""
    plt = pyplot()
    n = images.shape[0]
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    imgs = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(imgs[k].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
        m = masks[k, 0].float().cpu().numpy()
        if m.any() and not m.all():
            ax.contour(m, levels=[0.5], colors=["#00ff66"], linewidths=1.2)
        ax.set_title(titles[k], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out


def show_dataset(data: str | os.PathLike, out: str | os.PathLike, n: int = 16, augment: str | None = None,
                 seed: int = 0, size: Size = 256, layout: str | None = None, skip_bad: bool = False) -> Path:
    """Draw `n` pairs picked with `seed` (and, with `augment`, each one again after that preset)."""
    source = locate(data, layout)
    if source.layout == "cache":
        all_ids = list(read_manifest(source.root)["ids"])
        size = None
    else:
        report = scan(source, deep=False)
        all_ids = report.good_ids if skip_bad else list(report.pairs)
    picked = sorted(random.Random(seed).sample(range(len(all_ids)), min(n, len(all_ids))))
    ids = [all_ids[k] for k in picked]
    pairs = load_pairs(data, ids=ids, size=size, skip_bad=skip_bad, progress=False, layout=layout)
    short = [i if len(i) <= 14 else i[:12] + ".." for i in pairs.ids]
    if augment is None or augment == "none":
        return draw_grid(pairs.images, pairs.masks, short, out, suptitle=f"{pairs.name}: {len(pairs)} pairs")
    torch.manual_seed(seed)
    aug_images, aug_masks = Augment(augment)(pairs.images, pairs.masks)
    images = torch.stack([pairs.images.float() / 255.0, aug_images], 1).flatten(0, 1)
    masks = torch.stack([pairs.masks.float(), aug_masks], 1).flatten(0, 1)
    titles = [t for s in short for t in (s, f"{augment} aug.")]
    columns = 2 * max(1, math.ceil(math.sqrt(len(pairs) / 2)))
    return draw_grid(images, masks, titles, out, columns=columns,
                     suptitle=f"{pairs.name}: original | augmented ({augment}, seed {seed})")

