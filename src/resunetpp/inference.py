"""Inference: `Segmenter` (one image, a batch, or files on disk) over PyTorch or onnxruntime.

Conventions
-----------
* Images are (H, W, 3) uint8 RGB numpy arrays of any size (`resunetpp.io.read_image` gives them).
* Preprocessing repeats training's, from the checkpoint's config.json: resize to `input_size`
  ([H, W]) with cv2.INTER_AREA when shrinking and cv2.INTER_LINEAR when enlarging, then
  `resunetpp.preprocess.normalize` with the config's mean/std.
* The probability map is sigmoid(logits), resized back to the image's own size with bilinear
  interpolation *before* thresholding, so masks always have the input's resolution.
* `threshold` comes from config.json unless given. The mask is `prob > threshold`, or with
  `crf=...` the CRF's labelling (see `resunetpp.crf`); `prob` is always the model's own probability.
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

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from .preprocess import forward, normalize, resize_image
from .runtime import resolve_device
from .spec import MIN_AREA, ModelError, ModelSpec, ModelSpecError  # noqa: F401  (MIN_AREA re-exported)

BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
ONNX_CONFIG_KEY = "resunetpp_config"  # metadata_props key holding config.json in exported models
# MIN_AREA (from resunetpp.spec): fraction of the image; smaller predicted components are dropped (module docstring)
DEFAULT_CONFIG: dict[str, Any] = {k: v for k, v in ModelSpec("").to_dict().items()
                                  if k in ("input_size", "normalization", "threshold")}


def resize_prob(prob: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of an (h, w) probability map to `size` = (H, W)."""
    if prob.shape == tuple(size):
        return prob
    return cv2.resize(prob, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


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


def onnx_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config of an exported model: its embedded metadata, else config.json beside it."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelError(f"{path}: not a readable ONNX model ({e})") from None
    for prop in model.metadata_props:
        if prop.key == ONNX_CONFIG_KEY:
            try:
                return json.loads(prop.value)
            except ValueError as e:
                raise ModelSpecError(f"{path} (embedded {ONNX_CONFIG_KEY})", None, f"not valid JSON ({e})") from None
    beside = path.with_name("config.json")
    if beside.is_file():
        return ModelSpec.from_file(beside).to_dict()
    raise ModelError(f"{path}: has no embedded resunetpp config and no config.json beside it; "
                     "export it with `resunetpp export` or put the checkpoint's config.json next to it")


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


def drop_small_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    """(H, W) bool `mask` without its 8-connected components of fewer than `min_area` * H * W pixels."""
    if min_area <= 0 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area * mask.size
    keep[0] = False  # the background
    return keep[labels]


class _TorchRunner:
    def __init__(self, model: nn.Module, device: str | torch.device, channels_last: bool = False,
                 bf16: bool = False):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.channels_last = channels_last
        self.bf16 = bf16
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self.model, x.to(self.device), amp=self.bf16, channels_last=self.channels_last).cpu()


class _OrtRunner:
    def __init__(self, path: Path, device: str | torch.device, threads: int | None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # folds BatchNorm into Conv
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:
            raise ModelError(f"{path}: onnxruntime cannot load it ({e})") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.numpy().astype(np.float32, copy=False)})[0]
        return torch.from_numpy(out)


class OpenVinoRunner:
    """OpenVINO on CPU: one static-shape compilation per input shape (faster than a dynamic one)."""

    def __init__(self, path: Path, threads: int | None, precision: str):
        try:
            import openvino as ov
        except ImportError:
            raise ImportError("the openvino backend needs the optional package openvino: "
                              "pip install \"resunetpp[openvino]\"") from None
        self.core, self.path = ov.Core(), path
        self.options: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                                        "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.options["INFERENCE_NUM_THREADS"] = threads
        self.requests: dict[tuple[int, ...], Any] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if shape not in self.requests:
            model = self.core.read_model(str(self.path))
            model.reshape(list(shape))
            self.requests[shape] = self.core.compile_model(model, "CPU", self.options).create_infer_request()
        req = self.requests[shape]
        req.infer({0: x.numpy().astype(np.float32, copy=False)})
        return torch.from_numpy(req.get_output_tensor(0).data.copy())


class Segmenter:
    """Polyp segmentation of RGB images with a trained model.

    >>> seg = Segmenter("runs/kvasir")            # or Segmenter("model.onnx") for onnxruntime
    >>> mask, prob = seg.segment(read_image("frame.jpg"))

    backend: "torch", "onnxruntime", "openvino" (an .onnx file; the `openvino` extra), or None to
    choose from the weights (".onnx" -> onnxruntime).
    precision: "fp32", or "bf16" (torch autocast, or OpenVINO's bf16 inference precision; the
    fastest accurate CPU option measured, see benchmarks/RESULTS.md). onnxruntime runs the
    precision the .onnx file has (fp32, or int8 from `resunetpp export --int8`).
    crf: None, "mask" or "bilateral" (needs the `crf` extra). min_area: predicted components smaller than
    this fraction of the image are dropped (`MIN_AREA`; 0 keeps all). threads: onnxruntime / OpenVINO
    threads (default: their choice, one per physical core). channels_last: PyTorch memory format.
    """

    def __init__(self, weights: str | os.PathLike | nn.Module | None = None, device: str = "auto",
                 backend: str | None = None, tta: bool = False, crf: str | None = None,
                 threshold: float | None = None, config: dict[str, Any] | None = None,
                 threads: int | None = None, channels_last: bool = False, precision: str = "fp32",
                 min_area: float | None = None):
        from .crf import CRF_MODES, CRFUnavailableError, crf_available

        device = resolve_device(device)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if min_area is not None:
            check_min_area(min_area)
        if crf is not None:
            if crf not in CRF_MODES:
                raise ValueError(f"unknown CRF mode {crf!r}; choose one of {', '.join(CRF_MODES)}")
            if not crf_available():
                raise CRFUnavailableError()
        if weights is None:
            from .hub import bundled_weights

            weights = bundled_weights()  # FileNotFoundError saying how to get weights
        if isinstance(weights, nn.Module):
            if backend in ("onnxruntime", "openvino"):
                raise ValueError(f"the {backend} backend needs an .onnx file, not an nn.Module")
            self.backend = "torch"
            cfg = config or getattr(weights, "pretrained_config", None) or {}
            source = "config" if config else "the module's pretrained_config"
            self._run = _TorchRunner(weights, device, channels_last, precision == "bf16")
            self.weights = None
        else:
            path = Path(weights)
            if backend in ("onnxruntime", "openvino") and path.is_dir() and (path / "model.onnx").is_file():
                path = path / "model.onnx"
            is_onnx = path.suffix == ".onnx"
            self.backend = backend or ("onnxruntime" if is_onnx else "torch")
            if self.backend in ("onnxruntime", "openvino"):
                if not is_onnx:
                    raise ValueError(f"{path}: the {self.backend} backend needs an .onnx file; "
                                     "make one with `resunetpp export --weights RUN --out model.onnx`")
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: ONNX model not found")
                cfg = config or onnx_config(path)
                source = "config" if config else f"{path} (its config)"
                if self.backend == "openvino":
                    self._run = OpenVinoRunner(path, threads, precision)
                else:
                    if precision != "fp32":
                        raise ValueError("onnxruntime runs the .onnx file's own precision; for bf16 use "
                                         "backend='openvino' or 'torch', for int8 `resunetpp export --int8`")
                    self._run = _OrtRunner(path, device, threads)
            else:
                if is_onnx:
                    raise ValueError(f"{path}: an .onnx model runs with backend='onnxruntime', not torch")
                from .hub import load_model

                model = load_model(path, device)
                cfg = config or model.pretrained_config
                source = "config" if config else f"{path} (config.json)"
                self._run = _TorchRunner(model, device, channels_last, precision == "bf16")
            self.weights = path
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
        """Resize and normalise a list of (H, W, 3) uint8 images into an (N, 3, h, w) float tensor."""
        return preprocess_images(images, self.input_size, self.mean, self.std)

    def forward_probs(self, x: torch.Tensor) -> np.ndarray:
        """(N, 3, h, w) normalised -> (N, h, w) float32 probabilities at the model's size (with TTA)."""
        if not self.tta:
            return torch.sigmoid(self._run(x))[:, 0].numpy()
        n = len(x)
        p = torch.sigmoid(self._run(torch.cat([x, x.flip(-1), x.flip(-2)])))[:, 0]
        return ((p[:n] + p[n:2 * n].flip(-1) + p[2 * n:].flip(-2)) / 3).numpy()

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Polyp probability maps, float32, each at its image's own (H, W)."""
        if not len(images):
            return []
        probs = self.forward_probs(self.preprocess(images))
        return [np.ascontiguousarray(resize_prob(p, im.shape[:2]), dtype=np.float32) for p, im in zip(probs, images)]

    def postprocess(self, image: np.ndarray, prob: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """(H, W) bool mask from a probability map: threshold (this one's unless given), or the CRF's
        labelling; then the components smaller than `min_area` dropped."""
        threshold = self.threshold if threshold is None else threshold
        if self.crf is not None:
            from .crf import crf_refine

            mask = crf_refine(image, prob, mode=self.crf, threshold=threshold) > 0.5
        else:
            mask = prob > threshold
        return drop_small_components(mask, self.min_area)

    # -- the API most callers want --
    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask bool (H, W), prob float32 (H, W)) for one (H, W, 3) uint8 RGB image."""
        return self.segment_batch([image])[0]

    def segment_batch(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`segment` for a list of images (any sizes) in one forward pass."""
        probs = self.probabilities(images)
        return [(self.postprocess(im, p), p) for im, p in zip(images, probs)]
