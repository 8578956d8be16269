"""Evaluation of a trained model on a dataset split: `evaluate(weights, data, split="test", out=DIR)`.

Conventions:
- The model's `config.json` decides the preprocessing: images are resized to its `input_size` (the
  data layer's resize: area when shrinking, nearest for masks) and normalised with its
  `normalization`; the threshold is its `threshold` (0.5) unless one is given.
- Metrics are computed at the model's input size, on the resized masks. `native=True` instead
  resizes the probabilities bilinearly to each mask's original size and scores against the original
  mask (slower: every mask is read again).
- The metrics and the empty-mask convention are those of `resunetpp.evaluation.metrics`: each reported as the
  mean over images (the headline: mDice, mIoU, ...) and pooled over all pixels (micro).
- `split`: "test" | "val" | "train" take that part of the run's own `split.json` when the data is the
  dataset the model was trained on, else the committed split of a known dataset (Kvasir-SEG,
  CVC-ClinicDB); "all" takes every pair; a path takes a split JSON's "test" ids or a text file's ids
  (one a line, e.g. Kvasir-Sessile/ids.txt). Cross-dataset evaluation is the same call with another
  `data`, resized to the model's input size.
- `miou_keras`: the paper's "mIoU" (`resunetpp.evaluation.metrics.keras_confusion`: Keras MeanIoU(2) on probabilities,
  so only p == 1.0 is polyp), pooled over the set at the model's input size. Compare the paper's mIoU
  column with this one, not with miou_2class (docs/evaluation.md).
- `detection`: per-polyp figures (`resunetpp.evaluation.metrics.detect_polyps`): sensitivity at IoU 0.5 and at any
  overlap, false-positive components per image, the per-polyp Dice distribution; at the scoring size.
- `protocol="polyp-benchmark"` adds the benchmark's columns (`resunetpp.evaluation.metrics.PolypBenchmark`: mDice,
  mIoU, wFm, Sm, meanEm, maxEm, MAE by PySODMetrics), always at each mask's original size, the probability
  map resized bilinearly to it, as the benchmark's code does; it needs the original dataset, not a cache.
- Outputs in `out`: `per_image.csv`, `metrics.json` ({"mean": {metric: value}, "pooled": {...},
  "images": N, "miou_keras": x, "detection": {...}, ["benchmark": {...}], "settings": {...}}) and `metrics.md`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from resunetpp.data.layouts import dataset_name
from resunetpp.device import resolve_device
from resunetpp.evaluation.metrics import (
    BENCHMARK_NAMES,
    METRIC_NAMES,
    PolypBenchmark,
    confusion,
    detect_polyps,
    keras_confusion,
    miou_keras_from_confusion,
    scores,
    summarize,
    summarize_detection,
)
from resunetpp.figures import plot_polyp_dice
from resunetpp.hub import load_model
from resunetpp.inference.transforms import predict_probs
from resunetpp.progress import progress_bar
from resunetpp.utils import atomic_path, write_json

SPLIT_NAMES = ("train", "val", "test", "all")
PROTOCOLS = ("default", "polyp-benchmark")


@dataclass
class Evaluation:
    summary: dict[str, Any]            # {"mean": {...}, "pooled": {...}, "images": N}
    per_image: list[dict[str, Any]]    # {"id": ..., metric: value, ..., "tp", "fp", "fn", "tn"}
    settings: dict[str, Any]


def resolve_ids(data: str | os.PathLike, split: str, weights: str | os.PathLike | None = None,
                limit: int | None = None) -> tuple[list[str] | None, str]:
    """(ids or None for all, a description of where they came from) for `split` (module docstring)."""
    from resunetpp.data import default_split, load_split

    if split == "all":
        if not limit:
            return None, "all"
        from resunetpp.data import SegmentationFolder

        return SegmentationFolder(data, skip_bad=True).ids[:limit], f"first {limit} of all"
    if split in ("train", "val", "test"):
        name = dataset_name(data)
        own = Path(weights) / "split.json" if weights is not None else None
        own_split = load_split(own) if own is not None and own.is_file() else None
        if own_split is not None and own_split.get("dataset") == name:
            ids, source = own_split[split], f"{split} of {own}"
        elif name in ("kvasir-seg", "cvc-clinicdb"):
            path = default_split(name)
            ids, source = load_split(path)[split], f"{split} of the committed {name} split"
        else:
            raise ValueError(f"{data}: no split known for dataset {name!r}; pass --split all or a split FILE")
    else:
        path = Path(split)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: split file not found (or use one of {', '.join(SPLIT_NAMES)})")
        if path.suffix == ".json":
            ids, source = load_split(path)["test"], f"test of {path}"
        else:
            ids = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
            source = str(path)
    ids = list(ids)[:limit] if limit else list(ids)
    return ids, source


def evaluate(weights: str | os.PathLike | None, data: str | os.PathLike, split: str = "test",
             out: str | os.PathLike | None = None, threshold: float | None = None, device: str = "auto",
             batch_size: int = 16, limit: int | None = None, native: bool = False, skip_bad: bool = False,
             amp: bool = False, progress: bool = True, protocol: str = "default",
             min_area: float = 0.0) -> Evaluation:
    """Score the model in `weights` (run folder, .safetensors, a bundled model's name, or None for the default
    bundled model) on `data`; write reports to `out` if given. `min_area` > 0 first drops predicted
    components smaller than that fraction of the image, as `Segmenter` does (0, the default, scores the
    thresholded map as the paper does)."""
    from resunetpp.data import SegmentationFolder, detect_layout, load_pairs
    from resunetpp.inference.transforms import check_min_area, check_threshold, drop_small_components
    from resunetpp.io import read_mask

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if threshold is not None:
        check_threshold(threshold)  # before loading anything: --threshold 1.5 is refused at once
    min_area = check_min_area(min_area)
    from resunetpp.hub import bundled_weights, resolve_weights

    weights = bundled_weights() if weights is None else resolve_weights(weights)
    dev = resolve_device(device)
    model = load_model(weights, dev)
    cfg = model.pretrained_config
    size = tuple(cfg.get("input_size", (256, 256)))
    norm = cfg["normalization"]
    thr = check_threshold(cfg.get("threshold", 0.5) if threshold is None else threshold)
    benchmark = protocol == "polyp-benchmark"
    if (native or benchmark) and detect_layout(data) == "cache":  # before the (slow) loading
        what = "--protocol polyp-benchmark" if benchmark else "--native"
        raise ValueError(f"{data}: {what} needs the original dataset folder, not a prepared cache of resized masks")
    ids, source = resolve_ids(data, split, weights, limit)
    pairs = load_pairs(data, ids=ids, size=size, skip_bad=skip_bad, progress=progress)
    if not len(pairs):
        raise ValueError(f"{data}: no pairs to evaluate ({source})")
    native_masks = SegmentationFolder(data, ids=pairs.ids, skip_bad=skip_bad).pairs if native or benchmark else None

    stats, found = [], []
    keras_cm = torch.zeros(2, 2, dtype=torch.long)
    bench = PolypBenchmark() if benchmark else None
    for i in progress_bar(range(0, len(pairs), batch_size), desc="evaluating", unit="batch", disable=not progress):
        probs = predict_probs(model, pairs.images[i:i + batch_size], norm, dev, amp)
        masks = pairs.masks[i:i + batch_size].to(dev).bool()
        keras_cm += keras_confusion(probs, masks).cpu()
        for k, p in enumerate(probs):
            if native_masks is not None:
                gt = torch.from_numpy(read_mask(native_masks[pairs.ids[i + k]][1]))
                up = F.interpolate(p[None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0].cpu()
                if bench is not None:
                    bench.step(up.numpy(), gt.numpy())
                if native:
                    p, gt = up[None], gt[None]
                else:
                    gt = masks[k]
            else:
                gt = masks[k]
            hit = torch.from_numpy(drop_small_components((p > thr).cpu().numpy()[0], min_area))[None]
            gt = gt.cpu()
            stats.append(confusion(hit[None], gt[None]))
            found.append(detect_polyps(hit.numpy(), gt.numpy()))
    stats = torch.cat(stats)
    per = scores(stats)
    rows = [{"id": pairs.ids[n], **{k: float(per[k][n]) for k in METRIC_NAMES},
             **dict(zip(("tp", "fp", "fn", "tn"), (int(v) for v in stats[n]))),
             **{k: found[n][k] for k in ("polyps", "found_iou50", "found_any", "fp_iou50", "fp_any")},
             "polyp_dice": " ".join(f"{d:.4f}" for d in found[n]["polyp_dice"])} for n in range(len(stats))]
    settings = {"weights": str(weights), "model": cfg["model"], "trained_on": cfg.get("dataset"),
                "data": str(data), "dataset": pairs.name, "split": source, "threshold": thr,
                "input_size": list(size), "scored_at": "native mask size" if native else "model input size",
                "min_area": min_area,
                "device": str(dev), "protocol": protocol,
                "miou_keras": "Keras MeanIoU(2) on probabilities (p == 1.0 is polyp), pooled, at the model input size",
                "detection": "8-connected components; found at IoU >= 0.5 and at any overlap"}
    summary = summarize(stats)
    summary["miou_keras"] = miou_keras_from_confusion(keras_cm)
    summary["detection"] = summarize_detection(found)
    if bench is not None:
        summary["benchmark"] = bench.results()
    result = Evaluation(summary, rows, settings)
    if out is not None:
        write_reports(result, out)
    return result


def metrics_markdown(summary: dict[str, Any], settings: dict[str, Any] | None = None) -> str:
    lines = []
    if settings:
        lines += [f"{settings['model']} ({settings['weights']}) on {settings['dataset']}, {settings['split']}: "
                  f"{summary['images']} images, threshold {settings['threshold']}, scored at "
                  f"{settings['scored_at']}.", ""]
    lines += ["| metric | mean over images | pooled over pixels |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {summary['mean'][k]:.4f} | {summary['pooled'][k]:.4f} |" for k in METRIC_NAMES]
    if "miou_keras" in summary:
        lines += [f"| miou_keras (the paper's mIoU) | | {summary['miou_keras']:.4f} |"]
    if "benchmark" in summary:
        b = summary["benchmark"]
        lines += ["", "Polyp benchmark (PySODMetrics, at each mask's original size):", "",
                  "| " + " | ".join(BENCHMARK_NAMES) + " |", "|" + " ---: |" * len(BENCHMARK_NAMES),
                  "| " + " | ".join(f"{b[k]:.4f}" for k in BENCHMARK_NAMES) + " |"]
    if "detection" in summary:
        d = summary["detection"]
        lines += ["", f"Per-polyp detection: {d['polyps']} polyps (8-connected ground-truth components) in "
                  f"{d['images']} images.", "",
                  "| figure | value |", "| --- | ---: |",
                  f"| sensitivity, IoU >= 0.5 | {d['sensitivity_iou50']:.4f} |",
                  f"| sensitivity, any overlap | {d['sensitivity_any']:.4f} |",
                  f"| false-positive components per image, IoU < 0.5 | {d['fp_per_image_iou50']:.3f} |",
                  f"| false-positive components per image, no overlap | {d['fp_per_image_any']:.3f} |",
                  f"| per-polyp Dice, mean | {d['polyp_dice_mean']:.4f} |",
                  f"| per-polyp Dice, median | {d['polyp_dice_median']:.4f} |",
                  "", "Per-polyp Dice histogram (`polyp_dice.png`):", "", "```"]
        h = d["polyp_dice_histogram"]
        top = max(h["counts"] + [1])
        for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"]):
            lines.append(f"{lo:.1f}-{hi:.1f} {c:5d} {'#' * round(40 * c / top)}")
        lines.append("```")
    return "\n".join(lines) + "\n"


def write_reports(result: Evaluation, out: str | os.PathLike) -> Path:
    """per_image.csv, metrics.json, metrics.md and (with detection figures) polyp_dice.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "per_image.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result.per_image[0]))
        w.writeheader()
        w.writerows(result.per_image)
    write_json(out / "metrics.json", {**result.summary, "settings": result.settings})
    with atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(metrics_markdown(result.summary, result.settings))
    if "detection" in result.summary:
        plot_polyp_dice(result.summary["detection"], out / "polyp_dice.png")
    return out


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
