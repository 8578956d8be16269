"""The model spec: what a trained model is and how to feed it, typed and versioned.

A `ModelSpec` is saved as a checkpoint's `config.json` and read back by every front end (`load_model`,
`Segmenter`, `evaluate`, `export`, `serve`) through `ModelSpec.from_dict` / `from_file`, which check
every field and refuse a damaged or impossible one with one `ModelSpecError` naming the file and the
field. The fields:

    spec_version   int, 1 (files without it are version 1; a newer one is refused by name)
    model          a registry name ("resunetpp", ...)
    model_kwargs   the constructor's arguments (a JSON object)
    input_size     [height, width]: positive integers (multiples of the network's stride: checked
                   by `load_model`, which builds it)
    normalization  {"mean": [3 finite numbers], "std": [3 finite numbers > 0]}
    threshold      probability threshold, strictly inside (0, 1)
    min_area       smallest predicted component kept, a fraction of the image in [0, 1)

Any other key (version, dataset, split, metrics, training, best_epoch, trained, name, ...) is
provenance: kept as it is and written back, never interpreted here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_VERSION = 1
DEFAULT_INPUT_SIZE = (256, 256)
DEFAULT_MEAN = (0.0, 0.0, 0.0)
DEFAULT_STD = (1.0, 1.0, 1.0)
DEFAULT_THRESHOLD = 0.5
MIN_AREA = 0.001  # fraction of the image: smaller predicted components are dropped (resunetpp.inference.segmenter)
MAX_SIDE = 16384  # an input side beyond this is a damaged file, not a model
SPEC_KEYS = ("spec_version", "model", "model_kwargs", "input_size", "normalization", "threshold", "min_area")


class ModelError(ValueError):
    """Weights, or the spec beside them, that cannot be used (bad input: `resunetpp` exits 3)."""


class ModelSpecError(ModelError):
    """A field of a model spec (config.json) is missing, of the wrong type or impossible."""

    def __init__(self, source: str, field_name: str | None, problem: str):
        self.source, self.field, self.problem = source, field_name, problem
        where = f"{source}: field {field_name!r}: " if field_name else f"{source}: "
        super().__init__(where + problem)


def _number(value: Any) -> float | None:
    """`value` as a float when it is a JSON number (not a bool, not a string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@dataclass(frozen=True)
class ModelSpec:
    """A trained model's contract (module docstring). Build with `from_dict`/`from_file`, which validate.

    Attributes:
        model: the registry name of the architecture.
        model_kwargs: its constructor's arguments.
        input_size: (height, width) the model takes.
        mean, std: the per-channel normalisation of [0, 1] RGB input.
        threshold: the probability above which a pixel is polyp.
        min_area: the smallest predicted component kept, a fraction of the image.
        provenance: every other key of the config.json (dataset, split, metrics, ...), kept as it is.
        spec_version: the format's version.
    """

    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    threshold: float = DEFAULT_THRESHOLD
    min_area: float = MIN_AREA
    provenance: dict[str, Any] = field(default_factory=dict)
    spec_version: int = SPEC_VERSION

    @property
    def normalization(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    # -- reading --
    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike = "model spec", require_model: bool = True) -> ModelSpec:
        """A validated spec from a config.json's content.

        Args:
            data: the parsed config.json.
            source: what it was read from (the file), at the start of every error message.
            require_model: False accepts a spec without "model" (an `nn.Module` given to `Segmenter` with only
                its preprocessing); its `model` is then "".

        Returns:
            The spec; keys other than the spec's fields are kept as `provenance`.

        Raises:
            ModelSpecError: a field is missing, of the wrong type or impossible (naming `source` and the field).
        """
        src = str(source)
        if not isinstance(data, dict):
            raise ModelSpecError(src, None, f"expected a JSON object, got {type(data).__name__}")
        _check_version(data, src)  # in the spec's field order: of several bad fields, the first is named
        model, kwargs = _model_name(data, src, require_model), _model_kwargs(data, src)
        size, stats = _input_size(data, src), _normalization(data, src)
        threshold, min_area = _threshold(data, src), _min_area(data, src)
        return cls(model=model, model_kwargs=kwargs, input_size=size, mean=stats["mean"], std=stats["std"],
                   threshold=threshold, min_area=min_area,
                   provenance={k: v for k, v in data.items() if k not in SPEC_KEYS}, spec_version=SPEC_VERSION)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ModelSpec:
        """The spec in a config.json file; `ModelSpecError` (naming the file) when unreadable or invalid."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError) as e:
            raise ModelSpecError(str(path), None, f"unreadable ({e})") from None
        try:
            data = json.loads(text)  # NaN and Infinity are read as floats, then refused by the field check
        except ValueError as e:
            raise ModelSpecError(str(path), None, f"not valid JSON ({e})") from None
        return cls.from_dict(data, path)

    # -- writing --
    def to_dict(self) -> dict[str, Any]:
        """The config.json content: the spec's fields first, then the provenance as it came."""
        return {"spec_version": self.spec_version, "model": self.model, "model_kwargs": dict(self.model_kwargs),
                "input_size": list(self.input_size), "normalization": self.normalization,
                "threshold": self.threshold, "min_area": self.min_area, **self.provenance}

    def replace(self, **changes: Any) -> ModelSpec:
        """A validated copy with some fields changed (by their config.json names)."""
        return ModelSpec.from_dict({**self.to_dict(), **changes}, "model spec")


# ---------------------------------------------------------------------------------------- field checks
# Each reads one field of a config.json's content (its default when absent) or raises a ModelSpecError
# naming the source and the field.


def _check_version(data: dict[str, Any], src: str) -> None:
    version = data.get("spec_version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelSpecError(src, "spec_version", f"must be an integer, got {version!r}")
    if version < 1 or version > SPEC_VERSION:
        raise ModelSpecError(src, "spec_version", f"version {version} is not one this resunetpp reads "
                             f"(1..{SPEC_VERSION}); " + ("upgrade resunetpp to load it" if version > SPEC_VERSION
                                                         else "the file is damaged"))


def _model_name(data: dict[str, Any], src: str, require_model: bool) -> str:
    if "model" not in data and require_model:
        raise ModelSpecError(src, "model", "has no 'model' key: the registry name of the architecture, e.g. "
                             "\"resunetpp\"")
    model = data.get("model", "")
    if not isinstance(model, str) or (require_model and not model):
        raise ModelSpecError(src, "model", f"must be a registry name (a string), got {model!r}")
    return model


def _model_kwargs(data: dict[str, Any], src: str) -> dict[str, Any]:
    kwargs = data.get("model_kwargs", {})
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ModelSpecError(src, "model_kwargs", f"must be a JSON object of constructor arguments, got {kwargs!r}")
    return dict(kwargs)


def _input_size(data: dict[str, Any], src: str) -> tuple[int, int]:
    size = data.get("input_size", list(DEFAULT_INPUT_SIZE))
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in size)):
        raise ModelSpecError(src, "input_size", f"must be [height, width], two integers, got {size!r}")
    if not all(1 <= v <= MAX_SIDE for v in size):
        raise ModelSpecError(src, "input_size", f"impossible size {list(size)}: each side must lie in 1..{MAX_SIDE}")
    return int(size[0]), int(size[1])


def _normalization(data: dict[str, Any], src: str) -> dict[str, tuple[float, ...]]:
    """{"mean": 3 finite numbers, "std": 3 finite numbers > 0}."""
    norm = data.get("normalization", {"mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)})
    if norm is None:
        norm = {"mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}
    if not isinstance(norm, dict):
        raise ModelSpecError(src, "normalization", f"must be an object {{\"mean\": [...], \"std\": [...]}}, "
                             f"got {norm!r}")
    stats = {}
    for key, default in (("mean", DEFAULT_MEAN), ("std", DEFAULT_STD)):
        name = f"normalization.{key}"
        values = norm.get(key, list(default))
        if not isinstance(values, (list, tuple)) or len(values) != 3:
            raise ModelSpecError(src, name, f"must be 3 numbers (R, G, B), got {values!r}")
        nums = [_number(v) for v in values]
        if any(v is None for v in nums):
            raise ModelSpecError(src, name, f"must be 3 numbers (R, G, B), got {values!r}")
        if not all(math.isfinite(v) for v in nums):
            raise ModelSpecError(src, name, f"must be finite, got {values!r}")
        if key == "std" and not all(v > 0 for v in nums):
            raise ModelSpecError(src, name, f"must be positive (the input is divided by it), got {values!r}")
        stats[key] = tuple(nums)
    unknown = sorted(set(norm) - {"mean", "std"})
    if unknown:
        raise ModelSpecError(src, "normalization", f"unknown key(s) {', '.join(unknown)}; expected mean and std")
    return stats


def _threshold(data: dict[str, Any], src: str) -> float:
    threshold = data.get("threshold", DEFAULT_THRESHOLD)
    t = _number(threshold)
    if t is None:
        raise ModelSpecError(src, "threshold", f"must be a number strictly between 0 and 1, got {threshold!r}")
    if not 0.0 < t < 1.0:  # also refuses NaN
        raise ModelSpecError(src, "threshold", f"must lie strictly between 0 and 1, got {threshold!r}")
    return t


def _min_area(data: dict[str, Any], src: str) -> float:
    min_area = data.get("min_area", MIN_AREA)
    a = _number(min_area)
    if a is None or not 0.0 <= a < 1.0:
        raise ModelSpecError(src, "min_area", f"must be a fraction of the image in [0, 1), got {min_area!r}")
    return a
