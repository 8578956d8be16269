"""Distillation: a student learns from the ground truth and from a trained teacher's probabilities.

`train(TrainConfig(teacher="resunetpp-kvasir-seg", ...))` turns it on. The teacher runs once over
the run's training and validation images (at the run's size, through its own input size and
normalisation) before the first epoch; its probabilities are kept as uint8 (p x 255) in
`<run>/teacher_probs.safetensors`, so a resumed run, or a new run given the same file, never
runs the teacher again. Each training step warps them with the batch's augmentation, like the
masks (`Augment(images, masks, soft)`), and the loss is

    (1 - w) * loss(logits, mask) + w * BCE(logits, teacher probability)

with w = `distill_weight` (Hinton et al. 2015's soft targets at temperature 1, per pixel).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from resunetpp.hub import load_model
from resunetpp.inference.backends import OpenVinoRunner
from resunetpp.inference.export import export_onnx
from resunetpp.inference.transforms import normalize, predict_probs
from resunetpp.progress import progress_bar
from resunetpp.training.losses import LossFn
from resunetpp.utils import atomic_path

CACHE_NAME = "teacher_probs.safetensors"


def soft_bce(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy against probabilities in [0, 1], in float32."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.binary_cross_entropy_with_logits(logits.float(), soft.float())


def distillation_loss(base: LossFn, weight: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                                torch.Tensor]:
    """(logits, mask, teacher probability) -> (1 - weight) * base(logits, mask) + weight * soft BCE."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distill_weight must lie in [0, 1], got {weight}")

    def loss(logits: torch.Tensor, target: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return (1.0 - weight) * base(logits, target) + weight * soft_bce(logits, soft)
    return loss


@torch.no_grad()
def teacher_probs(teacher: str | os.PathLike, images: torch.Tensor, batch_size: int = 8,
                  progress: bool = True, openvino: bool | None = None) -> torch.Tensor:
    """uint8 (N, 1, H, W) probabilities x 255 of `teacher` (a bundled name or a run folder) for uint8 images
    (N, 3, H, W): resized to the teacher's input size, normalised as it was trained, and back. `openvino`:
    run the teacher there (None: on a CPU when it is installed; export costs ~30 s, then ~5x torch's speed)."""
    model = load_model(teacher, images.device)
    cfg = model.pretrained_config
    size = tuple(int(v) for v in cfg["input_size"])
    norm = cfg.get("normalization")
    with tempfile.TemporaryDirectory() as tmp:  # the OpenVINO teacher's .onnx lives as long as it runs
        if openvino is None:
            openvino = images.device.type == "cpu" and importlib.util.find_spec("openvino") is not None
        run = _openvino_runner(model, Path(tmp)) if openvino else None
        fn = ((lambda x: torch.sigmoid(run(normalize(x, **norm)))) if run else
              (lambda x: predict_probs(model, x, norm, images.device)))
        return _probs(fn, images, size, batch_size, progress, str(teacher))


def _openvino_runner(model: torch.nn.Module, tmp: Path) -> OpenVinoRunner:
    return OpenVinoRunner(export_onnx(model, tmp / "teacher.onnx", exporter="legacy", check=False).path, None, "fp32")


def _probs(fn, images: torch.Tensor, size: tuple[int, ...], batch_size: int, progress: bool, name: str):
    """`fn` (uint8 batch at `size` -> probabilities) over `images` in batches, as uint8 at the images' size."""
    out = torch.empty(len(images), 1, *images.shape[2:], dtype=torch.uint8, device=images.device)
    for i in progress_bar(range(0, len(images), batch_size), desc=f"teacher {Path(name).name}", unit="batch",
                  disable=not progress, leave=False):
        x = images[i:i + batch_size]
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8)
        p = fn(x)
        if tuple(p.shape[2:]) != tuple(images.shape[2:]):
            p = F.interpolate(p, size=images.shape[2:], mode="bilinear", align_corners=False)
        out[i:i + batch_size] = (p * 255).round().clamp(0, 255).to(torch.uint8)
    return out


def cached_teacher_probs(teacher: str | os.PathLike, images: torch.Tensor, ids: list[str], path: Path,
                         progress: bool = True, openvino: bool | None = None) -> torch.Tensor:
    """`teacher_probs`, read from `path` when it holds this teacher's probabilities of these ids at this
    size, else computed and written there (atomically)."""
    meta = {"teacher": str(teacher), "size": f"{images.shape[2]}x{images.shape[3]}", "ids": "\n".join(ids)}
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if f.metadata() == meta:
                return load_file(str(path))["probs"].to(images.device)
    probs = teacher_probs(teacher, images, progress=progress, openvino=openvino)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"probs": probs.cpu().contiguous()}, str(tmp), metadata=meta)
    return probs
