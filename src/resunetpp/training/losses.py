"""Segmentation losses on logits: `dice`, `bce`, `bce+dice`, `mse` and `structure`.

Conventions:
- Every loss takes `(logits, target)` of shape (N, 1, H, W); `target` is {0, 1} (any dtype).
- Every loss is computed in float32 with autocast switched off, so bf16 training gets the same
  numbers as float32 up to the logits' precision (a bf16 sum over 16 x 256 x 256 pixels would not).
- `dice` is the authors' Keras `dice_coef_loss`: 1 - (2 * sum(y * p) + 1) / (sum(y) + sum(p) + 1),
  with p = sigmoid(logits), summed over the whole batch (not per image), smooth = 1.
- `mse` is the mean squared error between sigmoid(logits) and the target (the ResUNet baseline's loss).
- `structure` is the structure loss of PraNet (Fan et al., MICCAI 2020), also used by HarDNet-MSEG and
  Polyp-PVT: a boundary-weighted BCE plus a boundary-weighted soft IoU, per image, averaged over the batch.
  Weights: weit = 1 + 5 * |avg_pool2d(y, 31, stride 1, padding 15) - y|, so 1 in flat regions and up to 6 at
  the mask's boundary (the pooling counts the zero padding, as PraNet's does: mask pixels near the image's
  edge weigh more too). wbce = sum(weit * bce) / sum(weit); with p = sigmoid(logits) and
  inter = sum(p * y * weit), union = sum((p + y) * weit): wiou = 1 - (inter + 1) / (union - inter + 1).
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


def structure_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PraNet's structure loss: mean over the images of weighted BCE + weighted IoU (module docstring)."""
    with torch.autocast(logits.device.type, enabled=False):
        x, y = _f32(logits, target)
        weit = 1.0 + 5.0 * torch.abs(F.avg_pool2d(y, kernel_size=31, stride=1, padding=15) - y)
        dims = (2, 3)  # per image (and channel; there is one)
        bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        wbce = (weit * bce).sum(dim=dims) / weit.sum(dim=dims)
        p = torch.sigmoid(x)
        inter = (p * y * weit).sum(dim=dims)
        union = ((p + y) * weit).sum(dim=dims)
        wiou = 1.0 - (inter + SMOOTH) / (union - inter + SMOOTH)
        return (wbce + wiou).mean()


LOSSES: dict[str, LossFn] = {"dice": dice_loss, "bce": bce_loss, "bce+dice": bce_dice_loss, "mse": mse_loss,
                             "structure": structure_loss}


def get_loss(name: str) -> LossFn:
    """The loss called `name`.

    Args:
        name: one of `LOSSES`: "dice", "bce", "bce+dice", "mse" or "structure".

    Returns:
        A function `(logits, target) -> scalar loss` (module docstring: shapes and precision).

    Raises:
        ValueError: an unknown name; the message lists the choices.
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None
