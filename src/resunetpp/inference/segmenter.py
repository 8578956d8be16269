"""Inference: `Segmenter` (one image, a batch, or files on disk) over PyTorch or onnxruntime.

Conventions
-----------
* Images are (H, W, 3) uint8 RGB numpy arrays of any size (`resunetpp.io.read_image` gives them).
* Preprocessing repeats training's, from the checkpoint's config.json: resize to `input_size`
  ([H, W]) with cv2.INTER_AREA when shrinking and cv2.INTER_LINEAR when enlarging, then
  `resunetpp.inference.transforms.normalize` with the config's mean/std.
* The probability map is sigmoid(logits), resized back to the image's own size with bilinear
  interpolation *before* thresholding, so masks always have the input's resolution.
* `threshold` comes from config.json unless given. The mask is `prob > threshold`, or with
  `crf=...` the CRF's labelling (see `resunetpp.inference.crf`); `prob` is always the model's own probability.
* `min_area` (default `MIN_AREA`, 0.1 % of the image) then drops the mask's 8-connected components
  smaller than that fraction of the image: specks that are false alarms in a second-observer display.
  On the bundled models' test splits it cut false-positive components from 0.60 to 0.17 per image
  (Kvasir-SEG) and 0.38 to 0.11 (CVC-ClinicDB), Dice unchanged; at IoU >= 0.5 no polyp is lost, at any
  overlap one of 112 on Kvasir-SEG (docs/inference.md). `min_area=0` keeps every pixel, as `evaluate` does by default.
* `tta=True` averages the sigmoid probabilities of the identity, horizontal-flip and
  vertical-flip predictions (each flipped back), as the ResUNet++ follow-up (JBHI 2021) did.
* Weights: a checkpoint folder (config.json + model.safetensors), a `.safetensors` file with
  config.json beside it, an `.onnx` file from `resunetpp export` (its config is embedded as
  metadata and written beside it; run by onnxruntime, or by OpenVINO with backend="openvino"),
  an `nn.Module`, or None for the bundled weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resunetpp import hub
from resunetpp.device import resolve_device
from resunetpp.inference import crf as crf_module
from resunetpp.inference.backends import BACKENDS, PRECISIONS, TorchRunner, open_onnx
from resunetpp.inference.transforms import (
    check_min_area,
    check_threshold,
    preprocess_images,
    resize_prob,
    sigmoid_probs,
    threshold_mask,
)
from resunetpp.spec import MIN_AREA, ModelSpec  # noqa: F401  (MIN_AREA re-exported)

# MIN_AREA (from resunetpp.spec): fraction of the image; smaller predicted components are dropped (module docstring)
DEFAULT_CONFIG: dict[str, Any] = {k: v for k, v in ModelSpec("").to_dict().items()
                                  if k in ("input_size", "normalization", "threshold")}


def check_options(backend: str | None, precision: str, min_area: float | None, crf: str | None) -> None:
    """ValueError for an unknown backend, precision, CRF mode or a bad min_area; CRFUnavailableError when
    a CRF is asked for without its extra."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if min_area is not None:
        check_min_area(min_area)
    if crf is not None:
        if crf not in crf_module.CRF_MODES:
            raise ValueError(f"unknown CRF mode {crf!r}; choose one of {', '.join(crf_module.CRF_MODES)}")
        if not crf_module.crf_available():  # looked up at call time: tests stand in for the optional extra
            raise crf_module.CRFUnavailableError()


def open_weights(weights: str | os.PathLike | nn.Module, backend: str | None, device: torch.device,
                 threads: int | None, channels_last: bool, precision: str, config: dict[str, Any] | None = None):
    """(backend name, weights path or None, runner, config dict, where the config came from) for a run
    folder, a .safetensors or .onnx file, or an nn.Module; `config` replaces the weights' own."""
    backend, path, runner, own, source = _open(weights, backend, device, threads, channels_last, precision, config)
    return (backend, path, runner, config, "config") if config else (backend, path, runner, own, source)


def _open(weights, backend, device, threads, channels_last, precision, config):
    """`open_weights` with the weights' own config (an .onnx file's is not read when `config` replaces it)."""
    bf16 = precision == "bf16"
    if isinstance(weights, nn.Module):
        if backend in ("onnxruntime", "openvino"):
            raise ValueError(f"the {backend} backend needs an .onnx file, not an nn.Module")
        return ("torch", None, TorchRunner(weights, device, channels_last, bf16),
                getattr(weights, "pretrained_config", None) or {}, "the module's pretrained_config")
    path = Path(weights)
    if backend in ("onnxruntime", "openvino") and path.is_dir() and (path / "model.onnx").is_file():
        path = path / "model.onnx"
    is_onnx = path.suffix == ".onnx"
    backend = backend or ("onnxruntime" if is_onnx else "torch")
    if backend != "torch":
        runner, cfg = open_onnx(path, backend, device, threads, precision, config)
        return backend, path, runner, cfg, f"{path} (its config)"
    if is_onnx:
        raise ValueError(f"{path}: an .onnx model runs with backend='onnxruntime', not torch")
    model = hub.load_model(path, device)
    return "torch", path, TorchRunner(model, device, channels_last, bf16), model.pretrained_config, \
        f"{path} (config.json)"


class Segmenter:
    """Polyp segmentation of RGB images with a trained model (module docstring for the conventions).

    >>> seg = Segmenter("runs/kvasir")            # or Segmenter("model.onnx") for onnxruntime
    >>> mask, prob = seg.segment(read_image("frame.jpg"))

    Args:
        weights: A run folder (config.json + model.safetensors), a .safetensors file with config.json beside
            it, an .onnx file from `resunetpp export`, an `nn.Module`, or None for the bundled weights.
        device: "auto", "cpu", "cuda" or "cuda:N".
        backend: "torch", "onnxruntime", "openvino" (an .onnx file; the `openvino` extra), or None to
            choose from the weights (".onnx" -> onnxruntime).
        tta: Average the probabilities of the identity, horizontal-flip and vertical-flip predictions.
        crf: None, "mask" or "bilateral" (needs the `crf` extra; `resunetpp.inference.crf`).
        threshold: The probability threshold in [0, 1] (default: the config's).
        config: Replaces the weights' config (input size, normalisation, threshold, min_area).
        threads: onnxruntime / OpenVINO threads (default: their choice, one per physical core).
        channels_last: Run the torch backend in the channels_last memory format (the same numbers, faster
            on a CPU too: 1.3-2.2x at batch 1 for the five networks, benchmarks/RESULTS.md).
        precision: "fp32", or "bf16" (torch autocast, or OpenVINO's bf16 inference precision; the
            fastest accurate CPU option measured, see benchmarks/RESULTS.md). onnxruntime runs the
            precision the .onnx file has (fp32, or int8 from `resunetpp export --int8`).
        min_area: Predicted components smaller than this fraction of the image are dropped (default: the
            config's, `MIN_AREA`; 0 keeps all).

    Raises:
        ValueError: An unknown backend, precision or CRF mode, a threshold or min_area out of range, or
            weights the backend cannot run.
        CRFUnavailableError: A CRF is asked for without the `crf` extra.
        DeviceError: A device this machine does not have.
        FileNotFoundError: The weights (or the bundled weights) are missing.
        ModelError: Weights or a config that cannot be used.
    """

    def __init__(self, weights: str | os.PathLike | nn.Module | None = None, device: str = "auto",
                 backend: str | None = None, tta: bool = False, crf: str | None = None,
                 threshold: float | None = None, config: dict[str, Any] | None = None,
                 threads: int | None = None, channels_last: bool = True, precision: str = "fp32",
                 min_area: float | None = None):
        device = resolve_device(device)
        check_options(backend, precision, min_area, crf)
        if weights is None:
            weights = hub.bundled_weights()  # FileNotFoundError saying how to get weights
        self.backend, self.weights, self._run, cfg, source = open_weights(weights, backend, device, threads,
                                                                          channels_last, precision, config)
        # the one check of the model's contract (resunetpp.spec): an nn.Module may come without a registry name
        self.spec = ModelSpec.from_dict(cfg, source, require_model=False)  # load_model has required "model"
        self.config = self.spec.to_dict()
        self.input_size = tuple(self.spec.input_size)
        self.mean, self.std = list(self.spec.mean), list(self.spec.std)
        self.threshold = check_threshold(self.spec.threshold if threshold is None else threshold)
        self.min_area = self.spec.min_area if min_area is None else check_min_area(min_area)
        self.tta = tta
        self.crf = crf
        self.precision = precision

    def __repr__(self) -> str:
        return (f"Segmenter(weights={str(self.weights) if self.weights else 'module'!r}, backend={self.backend!r}, "
                f"precision={self.precision!r}, input_size={list(self.input_size)}, threshold={self.threshold}, "
                f"tta={self.tta}, crf={self.crf!r}, min_area={self.min_area})")

    # -- the steps, usable one by one (video smooths probabilities between them) --
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Resize and normalise images for the model, as training did.

        Args:
            images: (H, W, 3) uint8 RGB images, any sizes.

        Returns:
            An (N, 3, h, w) float32 tensor at the model's input size.

        Raises:
            ValueError: An image that is not an (H, W, 3) uint8 array.
        """
        return preprocess_images(images, self.input_size, self.mean, self.std)

    def forward_probs(self, x: torch.Tensor) -> np.ndarray:
        """The model's probabilities (with TTA when asked for).

        Args:
            x: An (N, 3, h, w) normalised batch from `preprocess`.

        Returns:
            (N, h, w) float32 probabilities at the model's size.
        """
        return sigmoid_probs(self._run, x, self.tta)

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Polyp probability maps, in one forward pass.

        Args:
            images: (H, W, 3) uint8 RGB images, any sizes.

        Returns:
            One float32 (H, W) map per image, at its own size (resized back bilinearly).
        """
        if not len(images):
            return []
        probs = self.forward_probs(self.preprocess(images))
        return [np.ascontiguousarray(resize_prob(p, im.shape[:2]), dtype=np.float32) for p, im in zip(probs, images)]

    def postprocess(self, image: np.ndarray, prob: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """The mask of a probability map: thresholded, or the CRF's labelling; then the components smaller
        than `min_area` dropped.

        Args:
            image: The (H, W, 3) uint8 RGB image (the CRF reads it).
            prob: Its (H, W) probability map.
            threshold: The threshold (default: this segmenter's).

        Returns:
            The (H, W) bool mask.
        """
        threshold = self.threshold if threshold is None else threshold
        if self.crf is not None:  # the MAP labelling of the CRF's two labels
            posterior = crf_module.crf_refine(image, prob, mode=self.crf, threshold=threshold)
            return threshold_mask(posterior, 0.5, self.min_area)
        return threshold_mask(prob, threshold, self.min_area)

    # -- the API most callers want --
    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment one image.

        Args:
            image: An (H, W, 3) uint8 RGB image.

        Returns:
            (mask, prob): the bool (H, W) mask and the float32 (H, W) probability map.
        """
        return self.segment_batch([image])[0]

    def segment_batch(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`segment` for a list of images in one forward pass.

        Args:
            images: (H, W, 3) uint8 RGB images, any sizes.

        Returns:
            One (mask, prob) pair per image, each at its image's size.
        """
        probs = self.probabilities(images)
        return [(self.postprocess(im, p), p) for im, p in zip(images, probs)]
