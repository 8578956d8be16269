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
  dataset the model was trained on (alone, or beside others: then its "<dataset>/<id>" ids), else the
  committed split of a known dataset (Kvasir-SEG, CVC-ClinicDB); "official" and "grouped" take the "test"
  part of the dataset's committed published split (Kvasir-SEG's official 880/120) or leak-free split
  (CVC-ClinicDB by video sequence, Kvasir-SEG by near-duplicate group); "all" takes every pair; a path
  takes a split JSON's "test" ids or a text file's ids (one a line, e.g. Kvasir-Sessile/ids.txt).
  Cross-dataset evaluation is the same call with another `data`, resized to the model's input size.
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

from resunetpp.data import (
    NAMED_SPLITS,
    Pairs,
    SegmentationFolder,
    dataset_part,
    default_split,
    detect_layout,
    load_pairs,
    load_split,
    named_split_path,
)
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
from resunetpp.hub import bundled_weights, load_model, resolve_weights
from resunetpp.inference.transforms import (
    check_min_area,
    check_threshold,
    predict_probs,
    resize_prob_tensor,
    threshold_mask,
)
from resunetpp.io import read_mask
from resunetpp.progress import progress_bar
from resunetpp.utils import atomic_path, output_folder, write_json

SPLIT_NAMES = ("train", "val", "test", "all", *NAMED_SPLITS)
PROTOCOLS = ("default", "polyp-benchmark")
SETTING_NOTES = {  # how two of the figures are computed, in every metrics.json
    "miou_keras": "Keras MeanIoU(2) on probabilities (p == 1.0 is polyp), pooled, at the model input size",
    "detection": "8-connected components; found at IoU >= 0.5 and at any overlap"}


@dataclass
class Evaluation:
    summary: dict[str, Any]            # {"mean": {...}, "pooled": {...}, "images": N}
    per_image: list[dict[str, Any]]    # {"id": ..., metric: value, ..., "tp", "fp", "fn", "tn"}
    settings: dict[str, Any]


def resolve_ids(data: str | os.PathLike, split: str, weights: str | os.PathLike | None = None,
                limit: int | None = None) -> tuple[list[str] | None, str]:
    """(ids or None for all, a description of where they came from) for `split` (module docstring)."""
    if split == "all":
        if not limit:
            return None, "all"
        return SegmentationFolder(data, skip_bad=True).ids[:limit], f"first {limit} of all"
    if split in ("train", "val", "test"):
        ids, source = _named_split(data, split, weights)
    elif split in NAMED_SPLITS:  # the test part of a committed published or leak-free split
        path = named_split_path(split, dataset_name(data))
        ids, source = load_split(path)["test"], f"test of the {split} split ({path.name})"
    else:
        ids, source = _split_file(Path(split))
    ids = list(ids)[:limit] if limit else list(ids)
    return ids, source


def _named_split(data: str | os.PathLike, split: str, weights: str | os.PathLike | None) -> tuple[list[str], str]:
    """The run's own split of `data` when it was trained on it (alone or beside other datasets), else the
    committed split of a known dataset."""
    name = dataset_name(data)
    own = Path(weights) / "split.json" if weights is not None else None
    own_split = load_split(own) if own is not None and own.is_file() else None
    ids = dataset_part(own_split, split, name) if own_split is not None else None
    if ids is not None:
        return ids, f"{split} of {own}" + (f" ({name})" if own_split.get("dataset") != name else "")
    if name in ("kvasir-seg", "cvc-clinicdb"):
        return load_split(default_split(name))[split], f"{split} of the committed {name} split"
    raise ValueError(f"{data}: no split known for dataset {name!r}; use split 'all' or a split file")


def _split_file(path: Path) -> tuple[list[str], str]:
    """A split JSON's "test" ids, or a text file's ids (one a line, "#" comments)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found (or use one of {', '.join(SPLIT_NAMES)})")
    if path.suffix == ".json":
        return load_split(path)["test"], f"test of {path}"
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return ids, str(path)


def evaluate(weights: str | os.PathLike | None, data: str | os.PathLike, split: str = "test",
             out: str | os.PathLike | None = None, threshold: float | None = None, device: str = "auto",
             batch_size: int = 16, limit: int | None = None, native: bool = False, skip_bad: bool = False,
             amp: bool = False, progress: bool = True, protocol: str = "default",
             min_area: float = 0.0) -> Evaluation:
    """Score a trained model on a dataset split, and write its reports (module docstring).

    Args:
        weights: A run folder, a .safetensors file, a bundled model's name, or None for the default bundled model.
        data: The dataset folder (or a prepared cache, except with `native` or the polyp-benchmark protocol).
        split: "test", "val", "train", "all", or a split file (module docstring).
        out: The folder for the reports (per_image.csv, metrics.json, metrics.md, polyp_dice.png); None writes none.
        threshold: The probability threshold in [0, 1] (default: the model's config).
        device: "auto", "cpu", "cuda" or "cuda:N".
        batch_size: Images per forward pass.
        limit: Score only the first this many images of the split.
        native: Score at each mask's original size, the probabilities resized bilinearly to it.
        skip_bad: Skip unreadable pairs instead of failing.
        amp: bf16 autocast for the forward pass.
        progress: Whether to show progress bars.
        protocol: "default", or "polyp-benchmark" to add the benchmark's columns.
        min_area: Drop predicted components smaller than this fraction of the image first, as `Segmenter`
            does; 0 (the default) scores the thresholded map, as the paper does.

    Returns:
        The summary (as metrics.json has it), the per-image rows and the settings.

    Raises:
        ValueError: An unknown protocol, a threshold or min_area out of range, no known split, a cache where
            the original dataset is needed, or no pairs to evaluate.
        FileNotFoundError: The weights or the split file do not exist.
        DeviceError: A device this machine does not have.
        NotADirectoryError: `out` is a file, or lies under one.
    """
    min_area = _check_options(protocol, threshold, min_area)
    weights = bundled_weights() if weights is None else resolve_weights(weights)
    dev = resolve_device(device)
    model = load_model(weights, dev)
    cfg = model.pretrained_config
    size, norm = tuple(cfg.get("input_size", (256, 256))), cfg["normalization"]
    thr = check_threshold(cfg.get("threshold", 0.5) if threshold is None else threshold)
    benchmark = protocol == "polyp-benchmark"
    _check_original_data(data, native, benchmark)  # before the (slow) loading
    if out is not None:
        output_folder(out, create=False)  # a file in the way is said before the scoring, not after it
    ids, source = resolve_ids(data, split, weights, limit)
    pairs = load_pairs(data, ids=ids, size=size, skip_bad=skip_bad, progress=progress)
    if not len(pairs):
        raise ValueError(f"{data}: no pairs to evaluate ({source})")
    native_masks = SegmentationFolder(data, ids=pairs.ids, skip_bad=skip_bad).pairs if native or benchmark else None
    scorer = _Scorer(thr, min_area, native, native_masks, PolypBenchmark() if benchmark else None)
    scorer.add_pairs(model, pairs, norm, dev, amp, batch_size, progress)
    settings = {"weights": str(weights), "model": cfg["model"], "trained_on": cfg.get("dataset"),
                "data": str(data), "dataset": pairs.name, "split": source, "threshold": thr,
                "input_size": list(size), "scored_at": "native mask size" if native else "model input size",
                "min_area": min_area, "device": str(dev), "protocol": protocol, **SETTING_NOTES}
    result = Evaluation(scorer.summary(), scorer.rows(pairs.ids), settings)
    if out is not None:
        write_reports(result, out)
    return result


def _check_options(protocol: str, threshold: float | None, min_area: float) -> float:
    """Refuse a bad setting before loading anything (a threshold of 1.5 at once); `min_area` as a float."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if threshold is not None:
        check_threshold(threshold)
    return check_min_area(min_area)


def _check_original_data(data: str | os.PathLike, native: bool, benchmark: bool) -> None:
    """Native-size scoring and the benchmark read the original masks: a prepared cache is refused."""
    if (native or benchmark) and detect_layout(data) == "cache":
        what = "protocol polyp-benchmark" if benchmark else "native-size scoring"
        raise ValueError(f"{data}: {what} needs the original dataset folder, not a prepared cache of resized masks")


class _Scorer:
    """The counts of one evaluation as it goes: per-image confusion and detection rows, the pooled Keras
    confusion, and the polyp benchmark's metrics (at each mask's original size)."""

    def __init__(self, threshold: float, min_area: float, native: bool,
                 native_masks: dict[str, tuple[Path, Path]] | None, bench: PolypBenchmark | None):
        self.threshold, self.min_area, self.native = threshold, min_area, native
        self.native_masks, self.bench = native_masks, bench
        self.stats: list[torch.Tensor] = []
        self.found: list[dict[str, Any]] = []
        self.keras_cm = torch.zeros(2, 2, dtype=torch.long)

    def add_pairs(self, model: torch.nn.Module, pairs: Pairs, normalization: dict[str, list[float]],
                  device: torch.device, amp: bool, batch_size: int, progress: bool) -> None:
        """Every pair, `batch_size` per forward pass, at the model's input size."""
        for i in progress_bar(range(0, len(pairs), batch_size), desc="evaluating", unit="batch", disable=not progress):
            probs = predict_probs(model, pairs.images[i:i + batch_size], normalization, device, amp)
            self.add_batch(probs, pairs.masks[i:i + batch_size].to(device).bool(), pairs.ids[i:i + batch_size])

    def add_batch(self, probs: torch.Tensor, masks: torch.Tensor, ids: list[str]) -> None:
        """A batch's probabilities (N, 1, h, w) and masks (N, 1, h, w) at the model's input size."""
        self.keras_cm += keras_confusion(probs, masks).cpu()
        for p, mask, image_id in zip(probs, masks, ids):
            if self.native_masks is not None:
                p, mask = self.at_native_size(p, mask, image_id)
            hit = torch.from_numpy(threshold_mask(p.cpu().numpy()[0], self.threshold, self.min_area))[None]
            gt = mask.cpu()
            self.stats.append(confusion(hit[None], gt[None]))
            self.found.append(detect_polyps(hit.numpy(), gt.numpy()))

    def at_native_size(self, p: torch.Tensor, mask: torch.Tensor, image_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps the benchmark at the original mask's size; (p, mask) to score: at that size with `native`."""
        gt = torch.from_numpy(read_mask(self.native_masks[image_id][1]))
        up = resize_prob_tensor(p, gt.shape)
        if self.bench is not None:
            self.bench.step(up.numpy(), gt.numpy())
        if self.native:
            return up[None], gt[None]
        return p, mask

    def rows(self, ids: list[str]) -> list[dict[str, Any]]:
        """per_image.csv's rows: the metrics, the counts and the detection figures of each image."""
        stats = torch.cat(self.stats)
        per = scores(stats)
        found = self.found
        return [{"id": ids[n], **{k: float(per[k][n]) for k in METRIC_NAMES},
                 **dict(zip(("tp", "fp", "fn", "tn"), (int(v) for v in stats[n]))),
                 **{k: found[n][k] for k in ("polyps", "found_iou50", "found_any", "fp_iou50", "fp_any")},
                 "polyp_dice": " ".join(f"{d:.4f}" for d in found[n]["polyp_dice"])} for n in range(len(stats))]

    def summary(self) -> dict[str, Any]:
        """metrics.json's figures: mean and pooled metrics, miou_keras, detection (and the benchmark)."""
        summary = summarize(torch.cat(self.stats))
        summary["miou_keras"] = miou_keras_from_confusion(self.keras_cm)
        summary["detection"] = summarize_detection(self.found)
        if self.bench is not None:
            summary["benchmark"] = self.bench.results()
        return summary


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
    out = output_folder(out)
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
    """The contents of a metrics.json that `write_reports` wrote."""
    return json.loads(Path(path).read_text())
