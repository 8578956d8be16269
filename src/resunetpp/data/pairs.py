"""A dataset held in memory as uint8 tensors (`Pairs`), and the sizes it can be resized to.

Both readers (`folder` for raw datasets, `cache` for prepared caches) return `Pairs`; training
indexes and augments them on the device itself (`resunetpp.training.loop`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

Size = int | tuple[int, int] | Sequence[int] | str | None


def parse_size(size: Size) -> tuple[int, int] | None:
    """None, 256, "256", (288, 384) or "288x384" (HxW) -> (h, w) or None."""
    if size is None:
        return None
    if isinstance(size, str):
        parts = size.lower().replace("*", "x").split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"size {size!r}: expected an integer or HxW such as 288x384") from None
        size = vals[0] if len(vals) == 1 else vals
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        vals = list(size)
        if len(vals) != 2:
            raise ValueError(f"size {size!r}: expected an integer or (height, width)")
        h, w = (int(v) for v in vals)
    if h < 1 or w < 1:
        raise ValueError(f"size {size!r}: must be positive")
    return h, w


@dataclass
class Pairs:
    """A whole dataset in memory: images uint8 (N, 3, H, W), masks uint8 (N, 1, H, W) in {0, 1}."""

    images: torch.Tensor
    masks: torch.Tensor
    ids: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def select(self, ids: Sequence[str]) -> Pairs:
        """The pairs with these ids, in this order (e.g. a split's "train" list)."""
        index = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise KeyError(f"{self.name}: {len(missing)} id(s) not loaded: {shown}")
        k = torch.as_tensor([index[i] for i in ids], dtype=torch.long, device=self.images.device)
        return Pairs(self.images.index_select(0, k), self.masks.index_select(0, k), list(ids), self.name)

    def to(self, device: str | torch.device) -> Pairs:
        return Pairs(self.images.to(device), self.masks.to(device), self.ids, self.name)


def stack_pairs(items: list[tuple[np.ndarray, np.ndarray]], ids: list[str], name: str) -> Pairs:
    n = len(items)
    if n == 0:
        return Pairs(torch.zeros(0, 3, 0, 0, dtype=torch.uint8), torch.zeros(0, 1, 0, 0, dtype=torch.uint8), ids, name)
    h, w = items[0][1].shape
    images = np.empty((n, 3, h, w), dtype=np.uint8)  # numpy's strided copy is much faster than torch's here
    masks = np.empty((n, 1, h, w), dtype=np.uint8)
    for k, (image, mask) in enumerate(items):
        images[k] = image.transpose(2, 0, 1)
        masks[k, 0] = mask
    return Pairs(torch.from_numpy(images), torch.from_numpy(masks), ids, name)
