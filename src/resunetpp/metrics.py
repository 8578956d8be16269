"""Binary segmentation metrics from per-image confusion counts.

Everything starts from `confusion(pred, target)`: one row (tp, fp, fn, tn) of pixel counts per image,
int64, computed at whatever size the masks have (the evaluation uses the model's input size).
`scores(stats)` turns rows into the metrics below; `summarize(stats)` reports each metric two ways:

- "mean": the metric per image, then averaged over images (the headline: mDice, mIoU, ...);
- "pooled": the counts summed over all images first, then one metric (micro-averaging, as a Keras
  metric accumulated over a test set or torchmetrics' `multidim_average="global"` do).

Metrics (threshold applied before this module; foreground = polyp):
  dice        2tp / (2tp + fp + fn)
  iou         tp / (tp + fp + fn)                  foreground Jaccard
  recall      tp / (tp + fn)
  precision   tp / (tp + fp)
  f2          5tp / (5tp + 4fn + fp)               F-beta with beta = 2
  accuracy    (tp + tn) / all pixels
  miou_2class (iou + tn / (tn + fp + fn)) / 2      mean of foreground and background IoU, the paper's
                                                   "mIoU" (a 2-class Keras MeanIoU), hence above Dice

Empty-mask convention (a ratio whose denominator is 0): the score is 1 when the image has no errors
(fp = fn = 0) and 0 otherwise. So an image with an empty ground truth and an empty prediction scores 1
on dice/iou/recall/precision/f2; an empty ground truth with any false positive scores 0 on all of them
(recall included); a missed polyp (empty prediction) scores 0 precision. This is MONAI's
`ignore_empty=False` behaviour and segmentation_models_pytorch's `zero_division=1` for the
error-free case: a frame without a polyp that is correctly left empty counts as perfect, and a false
alarm on it counts fully against the model, which is what matters on colonoscopy video.
"""

from __future__ import annotations

import torch

METRIC_NAMES = ("dice", "iou", "recall", "precision", "f2", "accuracy", "miou_2class")


def confusion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image (tp, fp, fn, tn) counts, int64 of shape (N, 4).

    `pred` and `target` are (N, ...) binary tensors (bool or {0, 1}); threshold probabilities first.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in shape")
    p = pred.bool().reshape(pred.shape[0], -1)
    t = target.bool().reshape(target.shape[0], -1)
    tp = (p & t).sum(1)
    fp = (p & ~t).sum(1)
    fn = (~p & t).sum(1)
    tn = p.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], 1).long()


def _ratio(num: torch.Tensor, den: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
    # 0/0 is 1 when there is nothing to get wrong and nothing was got wrong, else 0 (module docstring).
    return torch.where(den > 0, num / den.clamp(min=1), (errors == 0).to(num.dtype))


def scores(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metric name -> float64 tensor of shape (N,) for (N, 4) counts, or () for (4,) counts."""
    s = stats.double()
    tp, fp, fn, tn = s.unbind(-1)
    err = fp + fn
    fg_iou = _ratio(tp, tp + fp + fn, err)
    bg_iou = _ratio(tn, tn + fp + fn, err)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, err),
        "iou": fg_iou,
        "recall": _ratio(tp, tp + fn, err),
        "precision": _ratio(tp, tp + fp, err),
        "f2": _ratio(5 * tp, 5 * tp + 4 * fn + fp, err),
        "accuracy": _ratio(tp + tn, s.sum(-1), err),
        "miou_2class": (fg_iou + bg_iou) / 2,
    }


def summarize(stats: torch.Tensor) -> dict[str, dict[str, float] | int]:
    """{"mean": {metric: float}, "pooled": {metric: float}, "images": N} for (N, 4) counts."""
    if stats.ndim != 2 or stats.shape[0] == 0:
        raise ValueError("summarize needs counts of at least one image, shape (N, 4)")
    per_image = scores(stats)
    pooled = scores(stats.sum(0))
    return {
        "mean": {k: float(per_image[k].mean()) for k in METRIC_NAMES},
        "pooled": {k: float(pooled[k]) for k in METRIC_NAMES},
        "images": int(stats.shape[0]),
    }
