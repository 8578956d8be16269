"""An exponential moving average of a model's weights and buffers, updated after every optimiser step.

`WeightEMA(model, decay)` keeps an averaged copy (`.module`); `update(model)` moves it towards the model's
current weights by 1 - d, where d = min(decay, (1 + t) / (10 + t)) at update t (timm's warm-up: early
updates weigh the new weights more, so the average of a short run is not its random start). Floating-point
tensors are averaged with one fused `_foreach_lerp_` per update; integer buffers (BatchNorm's batch count) are
copied. The step count is a Python int, so an update never waits for the GPU.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class WeightEMA:
    """The averaged copy of `model` (a deep copy in eval mode, without gradients).

    Args:
        model: The model being trained (its parameters and buffers, in `state_dict` order).
        decay: The largest weight of the old average, in (0, 1).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The weight of the old average at the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards `model` (the same architecture; DDP- or compile-wrapped is fine)."""
        d = self.current_decay()
        averaged, current = _tensors(self.module), _tensors(model)
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c.detach() for _, c in floats], 1.0 - d)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, in a fixed order (a wrapper's `module` prefix does not change it)."""
    return [*model.parameters(), *model.buffers()]
