"""Model input and output, in one home: resizing of image and mask, normalisation (recorded in every
checkpoint's config.json), the batch forward pass that every path (training's validation, evaluation, the
`Segmenter`) runs, and the post-processing of probabilities (resize back, threshold and min-area checks,
small components dropped).

Images enter the models as float32 in [0, 1] (uint8 / 255), then (x - mean) / std. The default
mean 0 and std 1 reproduce the authors' code, which only divides by 255.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

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


def sigmoid_probs(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: bool = False) -> np.ndarray:
    """(N, 3, h, w) normalised -> (N, h, w) float32 probabilities at the model's size, from `run`'s logits.
    `tta` averages the probabilities of the identity, horizontal-flip and vertical-flip predictions (each
    flipped back), as the ResUNet++ follow-up (JBHI 2021) did."""
    if not tta:
        return torch.sigmoid(run(x))[:, 0].numpy()
    n = len(x)
    p = torch.sigmoid(run(torch.cat([x, x.flip(-1), x.flip(-2)])))[:, 0]
    return ((p[:n] + p[n:2 * n].flip(-1) + p[2 * n:].flip(-2)) / 3).numpy()


def resize_image(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3): area when shrinking (no aliasing), bilinear when enlarging."""
    if size is None or image.shape[:2] == tuple(size):
        return image
    h, w = size
    shrink = h <= image.shape[0] and w <= image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W) bool/uint8 -> (h, w) uint8 {0, 1} by nearest neighbour."""
    mask = mask.astype(np.uint8)
    if size is None or mask.shape == tuple(size):
        return mask
    h, w = size
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)


def resize_prob(prob: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of an (h, w) probability map to `size` = (H, W)."""
    if prob.shape == tuple(size):
        return prob
    return cv2.resize(prob, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


def resize_prob_tensor(prob: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (half-pixel centres, as `resize_prob`) of a (1, h, w) probability tensor to an (H, W)
    one on the CPU: the evaluation's scoring at the mask's original size."""
    return F.interpolate(prob[None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0].cpu()


def smooth_prob(previous: np.ndarray | None, prob: np.ndarray, alpha: float) -> np.ndarray:
    """The exponential moving average alpha * previous + (1 - alpha) * prob of probability maps across video
    frames; `prob` itself when there is no previous map of its shape (the first frame, or a size change)."""
    if previous is None or previous.shape != prob.shape:
        return prob
    return alpha * previous + (1 - alpha) * prob


def preprocess_images(images: Sequence[np.ndarray], size: Sequence[int], mean: Sequence[float],
                      std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 RGB images -> (N, 3, h, w) float32 normalised, NCHW-contiguous: training's
    preprocessing, shared by `Segmenter`, int8 calibration and the benchmark."""
    for i, im in enumerate(images):
        if not isinstance(im, np.ndarray) or im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            got = f"{im.shape} {im.dtype}" if isinstance(im, np.ndarray) else type(im).__name__
            raise ValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, got {got}")
    size = (int(size[0]), int(size[1]))
    batch = np.stack([resize_image(im, size) for im in images])  # exactly as in training
    # contiguous before normalising: the permuted view would otherwise give a channels_last tensor,
    # which silently switches PyTorch to channels_last kernels and hands onnxruntime strided memory
    return normalize(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(), mean, std)


def check_threshold(threshold: float) -> float:
    """The probability threshold as a float in [0, 1], or ValueError (shared by predict, video, evaluate)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    return value


def check_min_area(min_area: float) -> float:
    """The smallest component kept, as a fraction of the image in [0, 1), or ValueError."""
    try:
        value = float(min_area)
    except (TypeError, ValueError):
        raise ValueError(f"min_area must be a fraction of the image in [0, 1), got {min_area!r}") from None
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise ValueError(f"min_area must be a fraction of the image in [0, 1), got {min_area}")
    return value


def threshold_mask(prob: np.ndarray, threshold: float, min_area: float) -> np.ndarray:
    """(H, W) bool mask `prob > threshold`, without its components smaller than `min_area` of the image."""
    return drop_small_components(prob > threshold, min_area)


def drop_small_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    """(H, W) bool `mask` without its 8-connected components of fewer than `min_area` * H * W pixels."""
    if min_area <= 0 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area * mask.size
    keep[0] = False  # the background
    return keep[labels]
