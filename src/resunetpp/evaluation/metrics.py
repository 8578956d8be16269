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
  miou_2class (iou + tn / (tn + fp + fn)) / 2      mean of foreground and background IoU at the threshold:
                                                   NOT the paper's mIoU (see `miou_keras` below)

Empty-mask convention (a ratio whose denominator is 0): the score is 1 when the image has no errors
(fp = fn = 0) and 0 otherwise. So an image with an empty ground truth and an empty prediction scores 1
on dice/iou/recall/precision/f2; an empty ground truth with any false positive scores 0 on all of them
(recall included); a missed polyp (empty prediction) scores 0 precision. This is MONAI's
`ignore_empty=False` behaviour and segmentation_models_pytorch's `zero_division=1` for the
error-free case: a frame without a polyp that is correctly left empty counts as perfect, and a false
alarm on it counts fully against the model, which is what matters on colonoscopy video.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

METRIC_NAMES = ("dice", "iou", "recall", "precision", "f2", "accuracy", "miou_2class")


def confusion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image confusion counts.

    Args:
        pred: (N, ...) binary predictions (bool or {0, 1}); threshold probabilities first.
        target: (N, ...) binary ground truth, of the same shape.

    Returns:
        (tp, fp, fn, tn) pixel counts per image, int64 of shape (N, 4).

    Raises:
        ValueError: `pred` and `target` differ in shape.
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
    """The metrics of confusion counts, with the empty-mask convention (module docstring).

    Args:
        stats: (N, 4) counts from `confusion`, or one row (4,).

    Returns:
        Metric name (`METRIC_NAMES`) -> float64 tensor of shape (N,), or () for one row.
    """
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
    """Each metric averaged over images and pooled over all pixels (module docstring).

    Args:
        stats: (N, 4) counts from `confusion`, N >= 1.

    Returns:
        {"mean": {metric: float}, "pooled": {metric: float}, "images": N}.

    Raises:
        ValueError: `stats` is not (N, 4) with N >= 1.
    """
    if stats.ndim != 2 or stats.shape[0] == 0:
        raise ValueError("summarize needs counts of at least one image, shape (N, 4)")
    per_image = scores(stats)
    pooled = scores(stats.sum(0))
    return {
        "mean": {k: float(per_image[k].mean()) for k in METRIC_NAMES},
        "pooled": {k: float(pooled[k]) for k in METRIC_NAMES},
        "images": int(stats.shape[0]),
    }


# --- The paper's mIoU, as Keras computed it ------------------------------------------------------------------

def keras_confusion(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The pooled confusion counts of Keras' `MeanIoU(num_classes=2)` fed with probabilities, as the paper's code.

    Keras casts both tensors to int, so the prediction is polyp only where p >= 1.0 (a float32 sigmoid
    saturates to exactly 1.0 above a logit of about 16.6), and a float ground truth counts as polyp only where
    it is >= 1.0 (floor(mask / 255) of a 0..255 mask). Sum the counts of several batches to accumulate over a set.

    Args:
        probs: Probabilities, any shape.
        target: The ground truth, of the same shape: float (polyp where >= 1.0), or integer or bool labels {0, 1}.

    Returns:
        [[tn, fp], [fn, tp]], int64 (2, 2).

    Raises:
        ValueError: `probs` and `target` differ in shape.
    """
    if probs.shape != target.shape:
        raise ValueError(f"prediction {tuple(probs.shape)} and ground truth {tuple(target.shape)} differ in shape")
    pred = probs.float() >= 1.0
    gt = target >= 1.0 if target.is_floating_point() else target.bool()
    tp = int((pred & gt).sum())
    fp = int((pred & ~gt).sum())
    fn = int((~pred & gt).sum())
    tn = pred.numel() - tp - fp - fn
    return torch.tensor([[tn, fp], [fn, tp]], dtype=torch.long)


def miou_keras_from_confusion(cm: torch.Tensor) -> float:
    """Keras MeanIoU from pooled counts.

    Args:
        cm: (2, 2) counts from `keras_confusion` (summed over batches).

    Returns:
        Per class tp / (row + column - tp), averaged over the classes whose denominator is not 0 (Keras'
        `num_valid_entries`); 0.0 when there is none.
    """
    cm = cm.double()
    tp = cm.diagonal()
    den = cm.sum(0) + cm.sum(1) - tp
    valid = den > 0
    if not bool(valid.any()):
        return 0.0
    return float((tp[valid] / den[valid]).sum() / valid.sum())


def miou_keras(probs: torch.Tensor, target: torch.Tensor) -> float:
    """The paper's "mIoU": Keras MeanIoU(2) on probabilities, pooled over all images given.

    Args:
        probs: Probabilities, any shape.
        target: The ground truth, of the same shape (as `keras_confusion` reads it).

    Returns:
        The mean IoU of the two classes (`miou_keras_from_confusion`).
    """
    return miou_keras_from_confusion(keras_confusion(probs, target))


# --- Per-polyp detection ---------------------------------------------------------------------------------------

DETECTION_IOU = 0.5
DICE_BINS = 10


def detect_polyps(pred, target) -> dict:
    """Per-image detection: each ground-truth connected component (8-connectivity) is a polyp.

    A polyp is found at IoU 0.5 when one predicted component has IoU >= 0.5 with it (the component against the
    polyp, pixel sets), and found at any overlap when a predicted component touches it. Its Dice is that of
    the polyp against the union of the predicted components that touch it (0 when missed). False-positive
    components: predicted components that touch no polyp (`fp_any`), or that match no polyp at IoU 0.5
    (`fp_iou50`).

    Args:
        pred: The binary prediction, an array of shape (..., H, W) holding one image.
        target: The binary ground truth, of the same size.

    Returns:
        {"polyps", "found_iou50", "found_any", "fp_any", "fp_iou50", "predicted", "polyp_dice": [...],
        "polyp_iou": [best IoU per polyp]}.
    """
    p = np.ascontiguousarray(np.asarray(pred).astype(np.uint8).reshape(np.asarray(pred).shape[-2:]))
    t = np.ascontiguousarray(np.asarray(target).astype(np.uint8).reshape(np.asarray(target).shape[-2:]))
    n_t, lab_t = cv2.connectedComponents(t, connectivity=8)
    n_p, lab_p = cv2.connectedComponents(p, connectivity=8)
    joint = np.bincount((lab_t.astype(np.int64) * n_p + lab_p).ravel(), minlength=n_t * n_p).reshape(n_t, n_p)
    inter = joint[1:, 1:]                                   # (polyps, predicted components) overlaps
    area_t = joint[1:].sum(1)
    area_p = joint[:, 1:].sum(0)
    union = area_t[:, None] + area_p[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    touch = inter > 0
    best = iou.max(1) if iou.shape[1] else np.zeros(len(area_t))
    dice = []
    for k in range(len(area_t)):
        cover = (touch[k] * area_p).sum()                  # pixels of the touching components
        dice.append(float(2 * inter[k][touch[k]].sum() / (area_t[k] + cover)) if touch[k].any() else 0.0)
    matched = (iou >= DETECTION_IOU).any(0) if iou.shape[0] else np.zeros(len(area_p), bool)
    return {"polyps": int(len(area_t)), "found_iou50": int((best >= DETECTION_IOU).sum()),
            "found_any": int(touch.any(1).sum()), "predicted": int(len(area_p)),
            "fp_any": int((~touch.any(0)).sum()) if touch.shape[0] else int(len(area_p)),
            "fp_iou50": int((~matched).sum()), "polyp_dice": dice, "polyp_iou": [float(x) for x in best]}


def summarize_detection(rows: list[dict]) -> dict:
    """Detection figures over images.

    Args:
        rows: One `detect_polyps` result per image.

    Returns:
        Sensitivity at IoU 0.5 and at any overlap (NaN without polyps), false-positive components per image,
        and the per-polyp Dice distribution (mean, median, histogram of `DICE_BINS` bins).
    """
    polyps = sum(r["polyps"] for r in rows)
    n = max(1, len(rows))
    dice = np.array([d for r in rows for d in r["polyp_dice"]], dtype=np.float64)
    counts, edges = np.histogram(dice, bins=DICE_BINS, range=(0.0, 1.0))
    return {
        "images": len(rows), "polyps": polyps,
        "sensitivity_iou50": sum(r["found_iou50"] for r in rows) / polyps if polyps else float("nan"),
        "sensitivity_any": sum(r["found_any"] for r in rows) / polyps if polyps else float("nan"),
        "fp_per_image_iou50": sum(r["fp_iou50"] for r in rows) / n,
        "fp_per_image_any": sum(r["fp_any"] for r in rows) / n,
        "polyp_dice_mean": float(dice.mean()) if dice.size else float("nan"),
        "polyp_dice_median": float(np.median(dice)) if dice.size else float("nan"),
        "polyp_dice_histogram": {"edges": [round(float(e), 2) for e in edges], "counts": counts.tolist()},
    }


# --- The polyp benchmark (PraNet, Polyp-PVT and after) --------------------------------------------------------

BENCHMARK_NAMES = ("mDice", "mIoU", "wFm", "Sm", "meanEm", "maxEm", "MAE")


class PolypBenchmark:
    """The six columns of the polyp-segmentation benchmark tables, computed by PySODMetrics (`py_sod_metrics`)
    exactly as those papers' evaluation code does: `step(prob, gt)` per image with `prob` the probability
    map at the ground truth's size and `gt` the binary mask; `results()` gives

    mDice, mIoU  Dice and IoU at each of 256 thresholds, averaged over images, then over thresholds
                 (PySODMetrics' FmeasureV2 DICEHandler/IOUHandler "dynamic" curve; PraNet's meanDic/meanIoU)
    wFm          weighted F-measure (Margolin et al. 2014)
    Sm           S-measure, structure similarity (Fan et al. 2017)
    meanEm/maxEm E-measure (Fan et al. 2018): mean and max of its 256-threshold curve
    MAE          mean absolute error between the probability map and the mask

    The probability map is handed over as uint8 round(255 p) and PySODMetrics min-max normalises it per image
    (MATLAB's mapminmax, as the benchmark's code does); the mask as 0/255.
    """

    def __init__(self):
        import py_sod_metrics as sod  # heavy (loads SciPy), needed only by the polyp-benchmark protocol

        self._fm = sod.FmeasureV2(metric_handlers={"dice": sod.DICEHandler(with_dynamic=True, with_adaptive=False),
                                                   "iou": sod.IOUHandler(with_dynamic=True, with_adaptive=False)})
        self._wfm, self._sm, self._em, self._mae = sod.WeightedFmeasure(), sod.Smeasure(), sod.Emeasure(), sod.MAE()
        self.images = 0

    def step(self, prob, gt) -> None:
        """Add one image.

        Args:
            prob: The probability map in [0, 1] (or already 0..255), at the mask's size.
            gt: The binary mask.

        Raises:
            ValueError: The two differ in shape.
        """
        prob = np.asarray(prob, dtype=np.float32)
        pred = np.clip(np.rint(prob * 255), 0, 255).astype(np.uint8) if prob.max() <= 1.0 else prob.astype(np.uint8)
        mask = np.asarray(gt).astype(bool).astype(np.uint8) * 255
        if pred.shape != mask.shape:
            raise ValueError(f"probability map {pred.shape} and mask {mask.shape} differ in shape")
        for m in (self._fm, self._wfm, self._sm, self._em, self._mae):
            m.step(pred=pred, gt=mask)
        self.images += 1

    def results(self) -> dict[str, float]:
        """The benchmark's columns (`BENCHMARK_NAMES`) over the images added."""
        fm = self._fm.get_results()
        em = self._em.get_results()["em"]["curve"]
        return {"mDice": float(fm["dice"]["dynamic"].mean()), "mIoU": float(fm["iou"]["dynamic"].mean()),
                "wFm": float(self._wfm.get_results()["wfm"]), "Sm": float(self._sm.get_results()["sm"]),
                "meanEm": float(em.mean()), "maxEm": float(em.max()), "MAE": float(self._mae.get_results()["mae"])}
