"""Training configuration: every setting in one dataclass, read from flags, YAML, TOML or JSON.

`TrainConfig` holds the paper's recipe as its defaults; `resolved()` fills the model-dependent
defaults and checks every choice against the tuples below (the command line offers the same tuples).
The split of a run comes from `--split FILE`, else the committed split of a known dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from resunetpp.networks.registry import model_info
from resunetpp.training.losses import LOSSES

OPTIMIZERS = ("adam", "adamw", "nadam")
SCHEDULES = ("sgdr", "cosine", "constant", "onecycle")
AUGMENTS = ("paper", "light", "none")
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")
COMPILE_PAYS_FROM = 60_000  # images: 47 s / (1/546 - 1/1084 s per image), H200, ResUNet++ at 256, rounded up
# per-process batch from which compiling paid: 1.71x at 64 (H200); at 16 H100s trained ResUNet++ at 561 img/s
# compiled against 432 eager (1.30x) after 60 s of compilation, repaid only after ~110,000 images
# (benchmarks/RESULTS.md)
COMPILE_MIN_BATCH = 64


def resolve_compile(mode: str, cuda: bool, images: int, batch: int) -> str:
    """The `torch.compile` mode a run uses: "auto" compiles only on CUDA, for runs of at least
    `COMPILE_PAYS_FROM` training images at a per-process batch of at least `COMPILE_MIN_BATCH`."""
    if mode != "auto":
        return mode
    return "default" if cuda and images >= COMPILE_PAYS_FROM and batch >= COMPILE_MIN_BATCH else "off"


@dataclass
class TrainConfig:
    model: str = "resunetpp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = ""                      # dataset folder or prepared cache
    split: str | None = None            # split JSON; None: the committed split of a known dataset, else a new one
    out: str = "runs/resunetpp"
    size: int = 256
    epochs: int = 120
    batch_size: int = 16                # global, over all ranks
    lr: float = 1e-4
    weight_decay: float | None = None   # None: 0.01 for adamw, 0 otherwise
    optimizer: str = "adam"
    loss: str | None = None             # None: the model's default loss
    schedule: str = "sgdr"
    augment: str = "paper"
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    amp: bool | None = None             # None: bf16 autocast on CUDA, off on CPU
    deterministic: bool | None = None   # None: on for CPU, off (cudnn.benchmark) for CUDA
    early_stop: int = 0                 # patience in epochs without a better val Dice; 0: off
    limit: int | None = None            # only the first N train / val / test ids
    skip_bad: bool = False              # train on the good pairs of a dataset that fails the check
    threshold: float = 0.5
    check_every: int = 50               # steps between non-finite-loss checks (each one is a device sync)
    eval_every: int = 1                 # epochs between validations (and last.pt); the last epoch always
    compile: str = "auto"               # auto | off | default | reduce-overhead (CUDA graphs) | max-autotune
    time_limit: float | None = None     # seconds: stop (resumably) before an epoch that would not fit
    sync_bn: bool = False               # SyncBatchNorm across DDP ranks (CUDA only): for small per-GPU batches
    progress: bool = True
    teacher: str | None = None          # distil from this model (bundled name or run folder); None: off
    distill_weight: float = 0.5         # loss = (1 - w) * loss(mask) + w * BCE(teacher's probabilities)
    init: str | None = None             # start from these weights (bundled name or run folder) instead of random

    def resolved(self) -> TrainConfig:
        """A copy with the None defaults filled in and every choice checked."""
        cfg = TrainConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        cfg.loss = cfg.loss or model_info(cfg.model).default_loss  # KeyError listing the models
        for name, value, choices in (("loss", cfg.loss, tuple(LOSSES)), ("optimizer", cfg.optimizer, OPTIMIZERS),
                                     ("schedule", cfg.schedule, SCHEDULES), ("augment", cfg.augment, AUGMENTS),
                                     ("compile", cfg.compile, COMPILE_MODES)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if cfg.weight_decay is None:
            cfg.weight_decay = 0.01 if cfg.optimizer == "adamw" else 0.0
        for name in ("size", "epochs", "batch_size", "check_every", "eval_every"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
        if not 0.0 <= cfg.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must lie in [0, 1], got {cfg.distill_weight}")
        if not cfg.data:
            raise ValueError("no training data given (--data DIR_OR_CACHE)")
        return cfg


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """TrainConfig from a mapping (a YAML/TOML file's content), refusing unknown keys by name."""
    known = {f.name for f in fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    for name, value in values.items():
        problem = _type_problem(types[name], value)
        if problem:
            raise ValueError(f"{source}: setting {name!r}: {problem}, got {value!r}")
    return TrainConfig(**values)


def _type_problem(annotation: str, value: Any) -> str:
    """"" when `value` fits a TrainConfig field's annotation ("int", "float | None", ...), else what it must be."""
    parts = [p.strip() for p in annotation.split("|")]
    if value is None:
        return "" if "None" in parts else "must not be empty"
    for part in parts:
        if part == "int" and isinstance(value, int) and not isinstance(value, bool):
            return ""
        if part == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return "" if value == value and abs(value) != float("inf") else "must be a finite number"
        if part == "bool" and isinstance(value, bool):
            return ""
        if part == "str" and isinstance(value, str):
            return ""
        if part.startswith("dict") and isinstance(value, dict):
            return ""
        if part not in ("int", "float", "bool", "str", "None") and not part.startswith("dict"):
            return ""  # a type this check does not know: left to the setting's own check
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
    return "must be " + " or ".join(names.get(p, "a mapping" if p.startswith("dict") else p)
                                    for p in parts if p != "None")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a .yaml/.yml, .toml or .json file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                raise ValueError(f"{path}: TOML configs need Python 3.11+ (tomllib); use YAML instead") from None
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            import yaml  # JSON is YAML

            values = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"{path}: unknown config format {path.suffix!r}; use .yaml, .toml or .json")
    except (ValueError, TypeError) as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a valid config file ({e})") from None
    except Exception as e:  # yaml.YAMLError and friends
        raise ValueError(f"{path}: not a valid config file ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    return values


def resolve_split(cfg: TrainConfig, name: str) -> tuple[dict[str, Any] | None, str]:
    """(split, where it came from): --split FILE, else the committed split of a known dataset, else
    (None, "made"): the caller makes a seeded 80/10/10 split of the ids it finds."""
    from resunetpp.data import default_split, load_split

    if cfg.split:
        return load_split(cfg.split), str(cfg.split)
    if name in ("kvasir-seg", "cvc-clinicdb"):
        return load_split(default_split(name)), f"committed {name} split"
    return None, f"made by make_split(seed={cfg.seed})"


def limit_split(split: dict[str, Any], limit: int | None) -> dict[str, Any]:
    if not limit:
        return dict(split)
    return {**split, **{k: list(split[k])[:limit] for k in ("train", "val", "test")}}
