"""Training configuration: every setting in one dataclass, read from YAML, TOML or JSON files and overrides.

`TrainConfig` holds the paper's recipe as its defaults, and each field's `Setting` (its metadata) holds its
help, its choices and its range: the one home of what the setting means, read by the docs, by
`TrainConfig.resolved()` (which checks every value) and by the command line (which makes a flag of each).
`settings()` layers them: the defaults (or a resumed run's saved settings), then a file, then overrides.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from resunetpp.data import NAMED_SPLITS, default_split, load_split, named_split_path
from resunetpp.data.augment import PRESETS
from resunetpp.errors import SettingError
from resunetpp.networks.registry import list_models, model_info
from resunetpp.training.losses import LOSSES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML files are refused by name, YAML works
    tomllib = None

OPTIMIZERS = ("adam", "adamw", "nadam")
SCHEDULES = ("sgdr", "cosine", "constant", "onecycle")
AUGMENTS = PRESETS  # the augmentation presets, one list for `train --augment` and `data show --augment`
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")
COMPILE_PAYS_FROM = 60_000  # images: 47 s / (1/546 - 1/1084 s per image), H200, ResUNet++ at 256, rounded up
# per-process batch from which compiling paid: 1.71x at 64 (H200); at 16 H100s trained ResUNet++ at 561 img/s
# compiled against 432 eager (1.30x) after 60 s of compilation, repaid only after ~110,000 images
# (benchmarks/RESULTS.md)
COMPILE_MIN_BATCH = 64
SAVED_SETTINGS = "train_config.yaml"  # in every run folder: the settings it was trained with


def resolve_compile(mode: str, cuda: bool, images: int, batch: int) -> str:
    """The `torch.compile` mode a run uses: "auto" compiles only on CUDA, for runs of at least
    `COMPILE_PAYS_FROM` training images at a per-process batch of at least `COMPILE_MIN_BATCH`."""
    if mode != "auto":
        return mode
    return "default" if cuda and images >= COMPILE_PAYS_FROM and batch >= COMPILE_MIN_BATCH else "off"


@dataclass(frozen=True)
class Setting:
    """What `TrainConfig` knows of one field besides its default: its help and its checks.

    Attributes:
        help: One or two sentences on the setting: its documentation and its flag's help.
        flag: Whether `resunetpp train` offers it as a flag; the others are set in a config file.
        choices: The names it takes (or a function giving them, read when asked); empty: any value.
        low: The least value it takes (None: no bound); with `above`, values must be greater.
        high: The greatest value it takes (None: no bound).
        above: `low` itself is out of range.
    """

    help: str
    flag: bool = True
    choices: tuple[str, ...] | Callable[[], Iterable[str]] = ()
    low: float | None = None
    high: float | None = None
    above: bool = False

    def names(self) -> tuple[str, ...]:
        """The choices, as a tuple (empty: any value)."""
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def check(self, name: str, value: Any) -> None:
        """Refuse a value that is not one of the choices or out of range; None (not set) passes.

        Args:
            name: The setting's name, for the message.
            value: Its value.

        Raises:
            SettingError: The value is not one of `names()`, or lies outside [`low`, `high`].
        """
        if value is None:
            return
        names = self.names()
        if names and value not in names:
            raise SettingError(f"unknown {name} {value!r}; choose one of {', '.join(names)}", name)
        if self.low is not None and self.high is not None and not self.low <= value <= self.high:
            raise SettingError(f"{name} must lie in [{self.low:g}, {self.high:g}], got {value}", name)
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            raise SettingError(f"{name} must be {'above' if self.above else 'at least'} {self.low:g}, got {value}",
                               name)


def _field(default: Any = None, help: str = "", *, factory: Callable[[], Any] | None = None, **checks: Any) -> Any:
    """A `TrainConfig` field: its default (or default factory) and its `Setting`."""
    metadata = {"setting": Setting(help, **checks)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def setting(name: str) -> Setting:
    """The `Setting` (help, choices, range) of the `TrainConfig` field `name`.

    Raises:
        KeyError: No field has that name.
    """
    for f in fields(TrainConfig):
        if f.name == name:
            return f.metadata["setting"]
    raise KeyError(f"no setting {name!r}")


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the paper's recipe (ResUNet++, 256x256, Adam at 1e-4,
    SGDR, batch 16, 120 epochs).

    Each field's help is in its `Setting` (`setting("lr").help`), where `resunetpp train --help` reads it too.
    A None default is filled by `resolved()`, from the model or the device.
    """

    model: str = _field("resunetpp", "Registry name of the architecture.", choices=list_models)
    model_kwargs: dict[str, Any] = _field(help="Keyword arguments of the model's constructor, e.g. filters.",
                                          factory=dict, flag=False)
    data: str = _field("", "Dataset folder or prepared cache; several joined by ':' train one model on all of "
                           "them, each with its own split.")
    split: str | None = _field(None, "Split JSON, or 'official' / 'grouped': the committed published or "
                                     "leak-free split of a known dataset (default: its committed 80/10/10 split, "
                                     "else a seeded 80/10/10 split); with several datasets, one for all or one "
                                     "each, joined by ':' (empty: the default).")
    out: str = _field("runs/resunetpp", "Run folder.")
    size: int = _field(256, "Square input size.", low=1)
    epochs: int = _field(120, "Number of epochs.", low=1)
    batch_size: int = _field(16, "Global batch size over all processes.", low=1)
    lr: float = _field(1e-4, "Learning rate.", low=0, above=True)
    weight_decay: float | None = _field(None, "Weight decay (default 0.01 for adamw, 0 otherwise).", flag=False,
                                        low=0)
    optimizer: str = _field("adam", "Optimizer.", choices=OPTIMIZERS)
    loss: str | None = _field(None, "Loss (default: the model's own loss).", choices=tuple(LOSSES))
    schedule: str = _field("sgdr", "Learning-rate schedule.", choices=SCHEDULES)
    augment: str = _field("paper", "Augmentation preset.", choices=AUGMENTS)
    seed: int = _field(0, "Random seed.", low=0)
    device: str = _field("auto", "auto | cpu | cuda | cuda:N.")
    amp: bool | None = _field(None, "bf16 autocast (default on for CUDA, off for CPU).")
    deterministic: bool | None = _field(None, "Deterministic kernels (default on for CPU; off for CUDA, where "
                                              "cudnn.benchmark picks the fastest).", flag=False)
    early_stop: int = _field(0, "Patience in epochs without a better val Dice (0: off).", low=0)
    limit: int | None = _field(None, "Use only the first N train/val/test ids.", low=1)
    skip_bad: bool = _field(False, "Train on the good pairs of a dataset that fails the check.")
    threshold: float = _field(0.5, "Probability threshold of the validation masks.", flag=False, low=0, high=1)
    check_every: int = _field(50, "Steps between non-finite-loss checks (each one is a device sync).", flag=False,
                              low=1)
    eval_every: int = _field(1, "Validate and write last.pt every N epochs (the last epoch always).", low=1)
    compile: str = _field("auto", "torch.compile the model (reduce-overhead: CUDA graphs); auto: on CUDA for "
                                  "long runs.", choices=COMPILE_MODES)
    time_limit: float | None = _field(None, "Seconds: stop resumably before an epoch that would not fit.", low=0,
                                      above=True)
    sync_bn: bool = _field(False, "SyncBatchNorm across torchrun's CUDA processes: for small per-GPU batches.")
    progress: bool = _field(True, "Progress bars on a terminal (log lines elsewhere).", flag=False)
    teacher: str | None = _field(None, "Distil from this model (a bundled name or run folder): its probabilities "
                                       "join the masks as targets.")
    distill_weight: float = _field(0.5, "Share of the teacher's term in the loss: (1 - w) * loss(mask) + "
                                        "w * BCE(teacher's probabilities).", low=0, high=1)
    init: str | None = _field(None, "Start from these weights (a bundled name or run folder) instead of random "
                                    "ones: fine-tuning.")
    ema: float = _field(0.0, "Decay of an exponential moving average of the weights, updated every step (e.g. "
                             "0.999, after a warm-up: min(decay, (1 + t) / (10 + t))); validation picks and saves "
                             "the averaged weights. 0: off.", low=0, high=0.99999)
    multi_scale: bool = _field(False, "Multi-scale training: each step resizes its batch to size x 0.75, 1 or "
                                      "1.25 (drawn per step, rounded to the model's stride); validation stays at size.")

    def resolved(self) -> TrainConfig:
        """A copy with the None defaults filled in and every setting checked.

        Returns:
            The copy: `loss` and `weight_decay` set (from the model and the optimizer).

        Raises:
            KeyError: An unknown model (the message lists the registry's).
            SettingError: A name that is not one of its setting's choices, a value out of range, or no data.
        """
        cfg = replace(self)
        cfg.loss = cfg.loss or model_info(cfg.model).default_loss
        if cfg.weight_decay is None:
            cfg.weight_decay = 0.01 if cfg.optimizer == "adamw" else 0.0
        for f in fields(cfg):
            f.metadata["setting"].check(f.name, getattr(cfg, f.name))
        if not cfg.data:
            raise SettingError("no training data given: data must name a dataset folder or prepared cache", "data")
        return cfg


def settings(resume: str | os.PathLike | None = None, config_file: str | os.PathLike | None = None,
             overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The settings of a run, in layers: each one overrides the ones before it.

    1. the defaults (the paper's recipe), or the saved settings of the run in `resume`;
    2. the settings in `config_file`;
    3. `overrides` (the command line's flags), where not None.

    Args:
        resume: A run folder to continue: its `train_config.yaml` replaces the defaults.
        config_file: A YAML, TOML or JSON file of settings (`batch_size: 8`; `batch-size` reads the same).
        overrides: Settings by name; a None value is not given, so the layers below it show through.

    Returns:
        The merged settings, not yet resolved (`train()` resolves and checks them).

    Raises:
        FileNotFoundError: `resume` holds no saved settings, or `config_file` does not exist.
        SettingError: An unknown setting or a value of the wrong type (the message names its file), or a
            config file that cannot be read.
    """
    values = saved_settings(resume) if resume is not None else {}
    if config_file is not None:
        values.update(_checked(read_config_file(config_file), str(config_file)))
    values.update(_checked({k: v for k, v in (overrides or {}).items() if v is not None}, "overrides"))
    return TrainConfig(**values)


def saved_settings(run: str | os.PathLike) -> dict[str, Any]:
    """The settings a run was trained with (its `train_config.yaml`), those that `TrainConfig` still knows.

    Args:
        run: A run folder written by `train()`.

    Returns:
        The settings by name.

    Raises:
        FileNotFoundError: The folder holds no `train_config.yaml`.
        SettingError: A saved value of the wrong type.
    """
    saved = Path(run) / SAVED_SETTINGS
    if not saved.is_file():
        raise FileNotFoundError(f"{saved}: not found; {run} is not the folder of a training run")
    known = {f.name for f in fields(TrainConfig)}
    return _checked({k: v for k, v in read_config_file(saved).items() if k in known}, str(saved))


def config_from_dict(values: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """`TrainConfig` from a mapping (a YAML/TOML file's content), refusing unknown keys by name.

    Args:
        values: Settings by name; `batch-size` reads as `batch_size`.
        source: Where they came from (a file's path), named in the messages.

    Returns:
        The settings, the others at their defaults; not yet resolved.

    Raises:
        SettingError: An unknown setting, or a value of the wrong type.
    """
    return TrainConfig(**_checked(values, source))


def _checked(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`values` with `-` in names read as `_`, once each name is known and each value of its field's type."""
    known = {f.name: str(f.type) for f in fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for name, value in values.items():
        problem = _type_problem(known[name], value)
        if problem:
            raise SettingError(f"{source}: setting {name!r}: {problem}, got {value!r}")
    return values


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
    """Settings from a .yaml/.yml, .toml or .json file, as a dict.

    Args:
        path: The file; its suffix says its format (JSON is read as YAML).

    Returns:
        The file's settings by name (an empty file: none).

    Raises:
        FileNotFoundError: No such file.
        SettingError: An unknown suffix, TOML on Python 3.10, a file that does not parse, or one whose top
            level is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise SettingError(f"{path}: unknown config format {path.suffix!r}; use .yaml, .toml or .json")
    if path.suffix == ".toml" and tomllib is None:
        raise SettingError(f"{path}: TOML configs need Python 3.11+ (tomllib); use YAML instead")
    text = path.read_text()
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError and friends
        raise SettingError(f"{path}: not a valid config file ({e})") from None
    if values is None:  # an empty YAML file
        return {}
    if not isinstance(values, dict):
        raise SettingError(f"{path}: expected a mapping of settings at the top level")
    return values


def resolve_split(cfg: TrainConfig, name: str) -> tuple[dict[str, Any] | None, str]:
    """(split, where it came from): the file `cfg.split`, else the committed split of a known dataset, else
    (None, "made"): the caller makes a seeded 80/10/10 split of the ids it finds."""
    if cfg.split in NAMED_SPLITS:
        path = named_split_path(cfg.split, name)
        return load_split(path), f"{cfg.split} split of {name} ({path.name})"
    if cfg.split:
        return load_split(cfg.split), str(cfg.split)
    if name in ("kvasir-seg", "cvc-clinicdb"):
        return load_split(default_split(name)), f"committed {name} split"
    return None, f"made by make_split(seed={cfg.seed})"


def limit_split(split: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """The split with only the first `limit` ids of each part (None or 0: all)."""
    if not limit:
        return dict(split)
    return {**split, **{k: list(split[k])[:limit] for k in ("train", "val", "test")}}
