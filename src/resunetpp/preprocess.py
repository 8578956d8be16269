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


def forward(model: torch.nn.Module, x: torch.Tensor, amp: bool = False,
            channels_last: bool | None = None) -> torch.Tensor:
    """The one batch forward pass of every path (validation, evaluation, `Segmenter`, benchmarks):
    normalised float input (N, 3, H, W) on the model's device -> float32 logits (N, 1, H, W).
    `amp`: bf16 autocast; `channels_last` (default: on CUDA) matches how training lays out memory."""
    if channels_last if channels_last is not None else x.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        return model(x).float()


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: torch.Tensor, normalization: dict | None = None,
                  device: torch.device | str = "cpu", amp: bool = False) -> torch.Tensor:
    """Sigmoid probabilities (N, 1, H, W) float32 for one batch of uint8 images (N, 3, H, W), in eval mode.
    fp32 unless `amp`: validation (which picks the checkpoint) and evaluation score the same way."""
    norm = normalization or default_normalization()
    model.eval()
    x = normalize(images.to(device), norm["mean"], norm["std"])
    return torch.sigmoid(forward(model, x, amp))
