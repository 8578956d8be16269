"""Checkpoints as `config.json` + `model.safetensors` (the segmentation_models_pytorch layout).

`config.json` holds everything inference needs to repeat training's preprocessing:

    {"model": "resunetpp", "model_kwargs": {...}, "input_size": [256, 256],
     "normalization": {"mean": [...], "std": [...]}, "threshold": 0.5,
     "dataset": ..., "split": ..., "metrics": {...}, "version": "..."}

Weights load through safetensors only: no pickle is ever read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .preprocess import default_normalization
from .registry import create_model
from .utils import atomic_path, write_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Trained weights shipped inside the package (each folder has its MODEL_CARD.md), loadable by name;
# the first is used when none are given.
WEIGHTS_DIR = Path(__file__).parent / "weights"
PRETRAINED = ("resunetpp-kvasir-seg", "resunetpp-cvc-clinicdb")
DEFAULT_PRETRAINED = PRETRAINED[0]


def list_pretrained() -> list[str]:
    """Names of the bundled trained models, e.g. ``load_model("resunetpp-cvc-clinicdb")``."""
    return [n for n in PRETRAINED if (WEIGHTS_DIR / n / WEIGHTS_NAME).is_file()]


def resolve_weights(path: str | os.PathLike) -> Path:
    """A path as given, or the folder of a bundled model when `path` is one's name (and no such file exists)."""
    p = Path(path)
    if not p.exists() and str(path) in PRETRAINED:
        return bundled_weights(str(path))
    return p


def _files(path: str | os.PathLike) -> tuple[Path, Path]:
    p = resolve_weights(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: not found; pass a run folder (config.json + model.safetensors), "
                                "a .safetensors file or an .onnx model")
    if p.is_dir():
        return p / WEIGHTS_NAME, p / CONFIG_NAME
    if p.suffix == ".safetensors":
        return p, p.with_name(CONFIG_NAME)
    if p.name == CONFIG_NAME:
        return p.with_name(WEIGHTS_NAME), p
    raise FileNotFoundError(f"{p}: expected a run folder, a .safetensors file or a config.json")


def save_pretrained(model: nn.Module, directory: str | os.PathLike, config: dict[str, Any],
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model.safetensors` and `config.json` into `directory`, each atomically.

    `config` must name the registry entry ("model") and its "model_kwargs"; missing
    preprocessing keys get their defaults. Non-finite weights are refused, so a diverged run
    can never overwrite a good checkpoint.
    """
    directory = Path(directory)
    if "model" not in config:
        raise ValueError("config must contain 'model', the registry name")
    state = {k: v.detach().to("cpu", dtype=dtype if (dtype and v.is_floating_point()) else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite weights ({len(bad)} tensors, e.g. {bad[0]})")
    from .version import __version__

    full = {"model_kwargs": {}, "input_size": [256, 256], "normalization": default_normalization(),
            "threshold": 0.5, "version": __version__, **config}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model": str(full["model"])})
    write_json(directory / CONFIG_NAME, full)
    return directory


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    _, cfg_path = _files(path)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no config.json beside the weights; cannot tell which model they are")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if "model" not in cfg:
        raise ValueError(f"{cfg_path}: has no 'model' key")
    return cfg


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a run folder, a `.safetensors` file with `config.json` beside it, the
    name of a bundled model (`list_pretrained()`) or (path=None) the default bundled weights.
    Returns it in eval mode, float32, with its config as `model.pretrained_config`."""
    if path is None:
        path = bundled_weights()
    weights, _ = _files(path)
    cfg = load_config(path)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file not found")
    kwargs = cfg.get("model_kwargs", {})
    try:
        model = create_model(cfg["model"], **_listify(kwargs if isinstance(kwargs, dict) else {}))
    except (TypeError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ValueError(f"{_files(path)[1]}: cannot build model {cfg['model']!r} with model_kwargs {kwargs} "
                         f"({msg})") from None
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise ValueError(f"{weights}: weights do not match {cfg['model']} {kwargs} of its config.json: {problem}; "
                         "use the config.json written with these weights") from None
    model.load_state_dict(state)
    model.pretrained_config = cfg
    return model.to(device).eval()


def state_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], show: int = 2) -> str:
    """"" when `got` fits `expected` (a model's state_dict), else one short line: the counts of
    missing, unexpected and wrongly shaped tensors with the first `show` of each."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in got and tuple(got[k].shape) != tuple(v.shape)]
    parts = []
    for what, items in (("of another shape (file vs model)", shapes), ("missing", missing),
                        ("unexpected", unexpected)):
        if items:
            more = f", ... {len(items) - show} more" if len(items) > show else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:show])}{more}")
    return "; ".join(parts)


def bundled_weights(name: str = DEFAULT_PRETRAINED) -> Path:
    """Folder of a bundled trained model (default: ResUNet++ on Kvasir-SEG); a clear error if absent."""
    if name not in PRETRAINED:
        raise FileNotFoundError(f"{name}: not found, and not a bundled model ({', '.join(PRETRAINED)})")
    folder = WEIGHTS_DIR / name
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{folder / WEIGHTS_NAME}: the bundled weights {name!r} are missing from this install (a source "
            "checkout without them?). Reinstall resunetpp, or train a model: `resunetpp train --config "
            "configs/quick-cpu.yaml` (minutes on a CPU) and pass --weights runs/quick-cpu.")
    return folder


def _listify(kwargs: dict[str, Any]) -> dict[str, Any]:
    # JSON has no tuples; constructors take either.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
