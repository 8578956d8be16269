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
    """Decorator that adds a model constructor to the registry.

    Args:
        name: the registry name (`create_model(name)`, config.json's "model").
        default_loss: the loss training uses for it unless told otherwise (`resunetpp.training.losses`).
        description: one line for `resunetpp models`.
        **default_kwargs: constructor arguments that `create_model` passes unless overridden.

    Returns:
        The decorator, which registers the constructor and returns it unchanged.

    Raises:
        ValueError: `name` is already registered.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, fn, dict(default_kwargs), default_loss, description)
        return fn

    return wrap


def list_models() -> list[str]:
    """The registered models.

    Returns:
        Their names, sorted.
    """
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelEntry:
    """What the registry knows of a model.

    Args:
        name: a registered name.

    Returns:
        Its `ModelEntry`: constructor, default arguments, default loss and description.

    Raises:
        KeyError: an unknown name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model with fresh (random) weights.

    Args:
        name: a registered name (`list_models()`).
        **kwargs: constructor arguments, over the entry's defaults, e.g. ``filters=(32, 64, 128, 256, 512)``
            or ``in_channels=1``.

    Returns:
        The network, in training mode; it returns logits (N, 1, H, W) for inputs (N, in_channels, H, W).

    Raises:
        KeyError: an unknown name.
        TypeError, ValueError: arguments the constructor does not take.
    """
    entry = model_info(name)
    return entry.constructor(**{**entry.default_kwargs, **kwargs})


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Trainable parameters, or (trainable_only=False) parameters plus BatchNorm running
    mean/variance: the "Total params" that Keras prints."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    if not trainable_only:
        n += sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    return n
