"""Model registry (timm-style): `register_model`, `create_model`, `list_models`, `model_info`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    constructor: Callable[..., nn.Module]
    default_kwargs: dict[str, Any] = field(default_factory=dict)
    default_loss: str = "dice"
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, default_loss: str, description: str, **default_kwargs):
    """Decorator that adds a constructor to the registry under `name`."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, fn, dict(default_kwargs), default_loss, description)
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelEntry:
    """The registry entry of `name`; a KeyError lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; `kwargs` override the entry's defaults."""
    entry = model_info(name)
    return entry.constructor(**{**entry.default_kwargs, **kwargs})


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Trainable parameters, or (trainable_only=False) parameters plus BatchNorm running
    mean/variance: the "Total params" that Keras prints."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    if not trainable_only:
        n += sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    return n
