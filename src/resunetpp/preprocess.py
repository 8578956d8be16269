"""Input normalisation: one definition, recorded in every checkpoint's config.json.

Images enter the models as float32 in [0, 1] (uint8 / 255), then (x - mean) / std. The default
mean 0 and std 1 reproduce the authors' code, which only divides by 255.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_MEAN = (0.0, 0.0, 0.0)
DEFAULT_STD = (1.0, 1.0, 1.0)


def default_normalization() -> dict[str, list[float]]:
    return {"mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}


def normalize(images: torch.Tensor, mean: Sequence[float] = DEFAULT_MEAN,
              std: Sequence[float] = DEFAULT_STD) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised; float input is taken to be in [0, 1] already."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
