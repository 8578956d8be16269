"""Segmentation losses on logits: `dice`, `bce`, `bce+dice` and `mse`.

Conventions:
- Every loss takes `(logits, target)` of shape (N, 1, H, W); `target` is {0, 1} (any dtype).
- Every loss is computed in float32 with autocast switched off, so bf16 training gets the same
  numbers as float32 up to the logits' precision (a bf16 sum over 16 x 256 x 256 pixels would not).
- `dice` is the authors' Keras `dice_coef_loss`: 1 - (2 * sum(y * p) + 1) / (sum(y) + sum(p) + 1),
  with p = sigmoid(logits), summed over the whole batch (not per image), smooth = 1.
- `mse` is the mean squared error between sigmoid(logits) and the target (the ResUNet baseline's loss).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SMOOTH = 1.0

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _f32(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    return logits.float(), target.float()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    with torch.autocast(logits.device.type, enabled=False):
        x, y = _f32(logits, target)
        p = torch.sigmoid(x)
        return 1.0 - (2.0 * (y * p).sum() + smooth) / (y.sum() + p.sum() + smooth)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.autocast(logits.device.type, enabled=False):
        x, y = _f32(logits, target)
        return F.binary_cross_entropy_with_logits(x, y)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return bce_loss(logits, target) + dice_loss(logits, target)


def mse_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.autocast(logits.device.type, enabled=False):
        x, y = _f32(logits, target)
        return F.mse_loss(torch.sigmoid(x), y)


LOSSES: dict[str, LossFn] = {"dice": dice_loss, "bce": bce_loss, "bce+dice": bce_dice_loss, "mse": mse_loss}


def get_loss(name: str) -> LossFn:
    """The loss called `name`.

    Args:
        name: one of `LOSSES`: "dice", "bce", "bce+dice" or "mse".

    Returns:
        A function `(logits, target) -> scalar loss` (module docstring: shapes and precision).

    Raises:
        ValueError: an unknown name; the message lists the choices.
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None
