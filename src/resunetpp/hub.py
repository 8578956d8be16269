"""Checkpoints as `config.json` + `model.safetensors` (the segmentation_models_pytorch layout).

`config.json` is the model's `resunetpp.spec.ModelSpec` (architecture and its arguments, input size,
normalisation, threshold, min-area, and provenance such as dataset, split and metrics):

    {"spec_version": 1, "model": "resunetpp", "model_kwargs": {...}, "input_size": [256, 256],
     "normalization": {"mean": [...], "std": [...]}, "threshold": 0.5, "min_area": 0.001,
     "dataset": ..., "split": ..., "metrics": {...}, "version": "..."}

`load_model` is the one load path of every front end: it validates the spec (a `ModelSpecError` names
the file and the field), builds the network, checks that the input size fits its stride and that every
tensor of the weights is finite, and refuses anything else with a `ModelError` naming the file.
Weights load through safetensors only: no pickle is ever read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from resunetpp.networks.registry import create_model
from resunetpp.spec import ModelError, ModelSpec, ModelSpecError
from resunetpp.utils import atomic_path, write_json
from resunetpp.version import __version__

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Trained weights shipped inside the package (each folder has its MODEL_CARD.md), loadable by name;
# the first is used when none are given.
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_PRETRAINED = "resunetpp-kvasir-seg"


def list_pretrained() -> list[str]:
    """The bundled trained models, loadable by name, e.g. ``load_model("resunetpp-cvc-clinicdb")``.

    Returns:
        The names of the sub-folders of `WEIGHTS_DIR` that hold weights and a config, the default first.
    """
    if not WEIGHTS_DIR.is_dir():
        return []
    names = [p.name for p in WEIGHTS_DIR.iterdir() if (p / WEIGHTS_NAME).is_file() and (p / CONFIG_NAME).is_file()]
    return sorted(names, key=lambda n: (n != DEFAULT_PRETRAINED, n))


def resolve_weights(path: str | os.PathLike) -> Path:
    """A path as given, or the folder of a bundled model when `path` is one's name (and no such file exists)."""
    p = Path(path)
    if not p.exists() and str(path) in list_pretrained():
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

    Args:
        model: the network to save.
        directory: the folder to write (it must exist).
        config: the model spec and provenance: it must name the registry entry ("model") and its
            "model_kwargs"; missing preprocessing keys get their defaults.
        dtype: a floating-point type to store the weights in (None: as they are).

    Returns:
        `directory`.

    Raises:
        ValueError: no "model" in `config`, or non-finite weights (so a diverged run can never overwrite a
            good checkpoint).
        ModelSpecError: an invalid field of `config`; nothing is written.
    """
    directory = Path(directory)
    if "model" not in config:
        raise ValueError("config must contain 'model', the registry name")
    state = {k: v.detach().to("cpu", dtype=dtype if (dtype and v.is_floating_point()) else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite weights ({len(bad)} tensors, e.g. {bad[0]})")
    spec = ModelSpec.from_dict({"version": __version__, **config}, directory / CONFIG_NAME)  # nothing invalid saved
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model": spec.model})
    write_json(directory / CONFIG_NAME, spec.to_dict())
    return directory


def load_spec(path: str | os.PathLike) -> ModelSpec:
    """The validated `ModelSpec` of a run folder, `.safetensors` file or config.json (module docstring)."""
    _, cfg_path = _files(path)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no config.json beside the weights; cannot tell which model they are")
    return ModelSpec.from_file(cfg_path)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """`load_spec(path).to_dict()`: the validated config.json as a dict."""
    return load_spec(path).to_dict()


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a trained model. A damaged model is refused here, for every front end.

    Args:
        path: a run folder, a `.safetensors` file with `config.json` beside it, the name of a bundled model
            (`list_pretrained()`) or None: the default bundled weights.
        device: where to put it.

    Returns:
        The model in eval mode, float32, with its validated `ModelSpec` as `model.spec` (and as a dict,
        `model.pretrained_config`).

    Raises:
        FileNotFoundError: the weights or their config.json are missing.
        ModelSpecError: a bad config.json field.
        ModelError: weights that are unreadable, do not match the spec or hold NaN/inf.
    """
    if path is None:
        path = bundled_weights()
    weights, cfg_path = _files(path)
    spec = load_spec(path)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file not found")
    model = build_model(spec, cfg_path)
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(f"{weights}: not a readable safetensors file ({e})") from None
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise ModelError(f"{weights}: weights do not match {spec.model} {spec.model_kwargs} of its config.json: "
                         f"{problem}; use the config.json written with these weights")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelError(f"{weights}: damaged weights: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[0]}); "
                         "a model like this answers nothing useful, so it is refused")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state)
    model.spec = spec
    model.pretrained_config = spec.to_dict()
    return model.to(device).eval()


def build_model(spec: ModelSpec, source: str | os.PathLike = "model spec") -> nn.Module:
    """The untrained network a spec describes; a `ModelSpecError` naming `source` when its arguments or its
    input size do not fit the architecture."""
    try:
        model = create_model(spec.model, **_listify(spec.model_kwargs))
    except (TypeError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ModelSpecError(str(source), "model_kwargs", f"cannot build model {spec.model!r} with "
                             f"model_kwargs {spec.model_kwargs} ({msg})") from None
    stride = int(getattr(model, "total_stride", 1))
    h, w = spec.input_size
    if h % stride or w % stride:
        raise ModelSpecError(str(source), "input_size", f"{h}x{w} is impossible for {spec.model}: height and "
                             f"width must be multiples of its stride {stride}")
    return model


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
    folder = WEIGHTS_DIR / name
    if name != DEFAULT_PRETRAINED and name not in list_pretrained():
        raise FileNotFoundError(f"{name}: not found, and not a bundled model ({', '.join(list_pretrained())})")
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{folder / WEIGHTS_NAME}: the bundled weights {name!r} are missing from this install (a source "
            "checkout without them?). Reinstall resunetpp, or train a model (`resunetpp train` with the "
            "settings of configs/quick-cpu.yaml: minutes on a CPU) and use its run folder, runs/quick-cpu.")
    return folder


def _listify(kwargs: dict[str, Any]) -> dict[str, Any]:
    # JSON has no tuples; constructors take either.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
