"""Evaluation of a trained model on a dataset split: `evaluate(weights, data, split="test", out=DIR)`.

Conventions:
- The model's `config.json` decides the preprocessing: images are resized to its `input_size` (the
  data layer's resize: area when shrinking, nearest for masks) and normalised with its
  `normalization`; the threshold is its `threshold` (0.5) unless one is given.
- Metrics are computed at the model's input size, on the resized masks. `native=True` instead
  resizes the probabilities bilinearly to each mask's original size and scores against the original
  mask (slower: every mask is read again).
- The metrics and the empty-mask convention are those of `resunetpp.metrics`: each reported as the
  mean over images (the headline: mDice, mIoU, ...) and pooled over all pixels (micro).
- `split`: "test" | "val" | "train" take that part of the run's own `split.json` when the data is the
  dataset the model was trained on, else the committed split of a known dataset (Kvasir-SEG,
  CVC-ClinicDB); "all" takes every pair; a path takes a split JSON's "test" ids or a text file's ids
  (one a line, e.g. Kvasir-Sessile/ids.txt). Cross-dataset evaluation is the same call with another
  `data`, resized to the model's input size.
- Outputs in `out`: `per_image.csv`, `metrics.json` ({"mean": {metric: value}, "pooled": {...},
  "images": N, "settings": {...}}) and `metrics.md`.
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

from .hub import load_model
from .metrics import METRIC_NAMES, confusion, scores, summarize
from .preprocess import normalize
from .progress import progress_bar
from .train import dataset_name, resolve_device
from .utils import atomic_path, write_json

SPLIT_NAMES = ("train", "val", "test", "all")


@dataclass
class Evaluation:
    summary: dict[str, Any]            # {"mean": {...}, "pooled": {...}, "images": N}
    per_image: list[dict[str, Any]]    # {"id": ..., metric: value, ..., "tp", "fp", "fn", "tn"}
    settings: dict[str, Any]


def resolve_ids(data: str | os.PathLike, split: str, weights: str | os.PathLike | None = None,
                limit: int | None = None) -> tuple[list[str] | None, str]:
    """(ids or None for all, a description of where they came from) for `split` (module docstring)."""
    from .data import default_split, load_split

    if split == "all":
        if not limit:
            return None, "all"
        from .data import SegmentationFolder

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


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, normalization: dict[str, Any],
            device: torch.device | str = "cpu", amp: bool = False) -> torch.Tensor:
    """Sigmoid probabilities (N, 1, H, W) float32 for one batch of uint8 images (N, 3, H, W)."""
    device = torch.device(device)
    model.eval()
    x = normalize(images.to(device), normalization["mean"], normalization["std"])
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return torch.sigmoid(model(x).float())


def evaluate(weights: str | os.PathLike | None, data: str | os.PathLike, split: str = "test",
             out: str | os.PathLike | None = None, threshold: float | None = None, device: str = "auto",
             batch_size: int = 16, limit: int | None = None, native: bool = False, skip_bad: bool = False,
             amp: bool = False, progress: bool = True) -> Evaluation:
    """Score the model in `weights` (run folder, .safetensors, a bundled model's name, or None for the default
    bundled model) on `data`; write reports to `out` if given."""
    from .data import SegmentationFolder, detect_layout, load_pairs
    from .inference import check_threshold
    from .io import read_mask

    if threshold is not None:
        check_threshold(threshold)  # before loading anything: --threshold 1.5 is refused at once
    from .hub import bundled_weights, resolve_weights

    weights = bundled_weights() if weights is None else resolve_weights(weights)
    dev = resolve_device(device)
    model = load_model(weights, dev)
    cfg = model.pretrained_config
    size = tuple(cfg.get("input_size", (256, 256)))
    norm = cfg["normalization"]
    thr = check_threshold(cfg.get("threshold", 0.5) if threshold is None else threshold)
    if native and detect_layout(data) == "cache":  # before the (slow) loading
        raise ValueError(f"{data}: --native needs the original dataset folder, not a prepared cache of resized masks")
    ids, source = resolve_ids(data, split, weights, limit)
    pairs = load_pairs(data, ids=ids, size=size, skip_bad=skip_bad, progress=progress)
    if not len(pairs):
        raise ValueError(f"{data}: no pairs to evaluate ({source})")
    native_masks = SegmentationFolder(data, ids=pairs.ids, skip_bad=skip_bad).pairs if native else None

    stats = []
    for i in progress_bar(range(0, len(pairs), batch_size), desc="evaluating", unit="batch", disable=not progress):
        probs = predict(model, pairs.images[i:i + batch_size], norm, dev, amp)
        if native_masks is None:
            stats.append(confusion(probs > thr, pairs.masks[i:i + batch_size].to(dev).bool()).cpu())
            continue
        for k, p in enumerate(probs):
            gt = torch.from_numpy(read_mask(native_masks[pairs.ids[i + k]][1]))
            up = F.interpolate(p[None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0]
            stats.append(confusion((up > thr)[None].cpu(), gt[None]))
    stats = torch.cat(stats)
    per = scores(stats)
    rows = [{"id": pairs.ids[n], **{k: float(per[k][n]) for k in METRIC_NAMES},
             **dict(zip(("tp", "fp", "fn", "tn"), (int(v) for v in stats[n])))} for n in range(len(stats))]
    settings = {"weights": str(weights), "model": cfg["model"], "trained_on": cfg.get("dataset"),
                "data": str(data), "dataset": pairs.name, "split": source, "threshold": thr,
                "input_size": list(size), "scored_at": "native mask size" if native else "model input size",
                "device": str(dev)}
    result = Evaluation(summarize(stats), rows, settings)
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
    return "\n".join(lines) + "\n"


def write_reports(result: Evaluation, out: str | os.PathLike) -> Path:
    """per_image.csv, metrics.json and metrics.md in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "per_image.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result.per_image[0]))
        w.writeheader()
        w.writerows(result.per_image)
    write_json(out / "metrics.json", {**result.summary, "settings": result.settings})
    with atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(metrics_markdown(result.summary, result.settings))
    return out


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
