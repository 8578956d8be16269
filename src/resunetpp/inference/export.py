"""ONNX export with a parity check, and static int8 quantisation for CPU real time.

Conventions
-----------
* The exported graph maps "image" (N, 3, H, W) float32, already normalised, to "logits"
  (N, 1, H, W); batch, height and width are dynamic (H and W multiples of the model's stride).
* The default exporter is torch.export-based (`dynamo=True`, opset 18, its lowest): it gives a
  cleaner graph (BatchNorm after convolutions folded, Linear as Gemm) than the deprecated
  TorchScript exporter (`exporter="legacy"`, opset 17 allowed). Both were checked to run at
  several sizes with the nearest-neighbour upsampling; dynamo needs the sizes declared as
  multiples of the stride (`8 * Dim`), which is what the model accepts anyway.
* Parity: the exported model is run with onnxruntime on random inputs (batch 2, the config's
  input size and a second non-square size) and compared with PyTorch; a maximum logit difference
  above `atol` (1e-4) times max(1, largest |logit|), or any NaN, raises `ParityError`, and leaves no
  model file behind.
* The checkpoint's config.json is embedded as metadata (key "resunetpp_config") and written as
  config.json beside the .onnx when none is there, so `Segmenter("model.onnx")` knows the input
  size, normalisation and threshold.
* int8: onnxruntime static quantisation, QDQ format, per-channel int8 weights and uint8
  activations, calibrated (MinMax by default) on real images preprocessed exactly as at inference.
  Only convolutions are quantised, and not those reading a concatenation: quantising every op
  (Add, Mul, Concat too) took a Kvasir-trained ResUNet++ from Dice 0.46 to 0.08, because the
  pre-activation BatchNorms amplify the error of per-tensor activation scales (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.export import Dim
from torch.onnx import _constants as onnx_constants

from resunetpp.hub import load_model
from resunetpp.inference.backends import ONNX_CONFIG_KEY, onnx_config
from resunetpp.inference.predict import collect_inputs
from resunetpp.inference.transforms import preprocess_images
from resunetpp.io import read_image
from resunetpp.progress import progress_bar
from resunetpp.spec import ModelSpec
from resunetpp.utils import atomic_path, write_json

EXPORTERS = ("dynamo", "legacy")
CALIB_METHODS = ("minmax", "entropy", "percentile")
PARITY_ATOL = 1e-4


class ParityError(RuntimeError):
    """The exported model disagrees with PyTorch by more than the tolerance."""


class OpsetError(ValueError):
    """An opset the exporter cannot emit: refused before exporting, or when the exporter gave another one."""


def opset_range(exporter: str) -> tuple[int, int]:
    """(lowest, highest) ONNX opset `exporter` emits with this torch: dynamo 18.., legacy 17..20 (torch 2.x)."""
    top = getattr(onnx_constants, "ONNX_MAX_OPSET", 20)
    if exporter == "legacy":
        top = getattr(onnx_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", top)
    return (18 if exporter == "dynamo" else 17), int(top)


def check_opset(opset: int, exporter: str) -> None:
    """Refuse, before exporting, an unknown exporter (ValueError) or an opset it cannot emit (`OpsetError`)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    low, high = opset_range(exporter)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise OpsetError(f"opset must be an integer, got {opset!r}")
    if opset < 17:
        raise OpsetError(f"opset {opset} is too old: use 17 or newer")
    if exporter == "dynamo" and opset < 18:
        raise OpsetError("the dynamo exporter emits opset 18 or newer; use opset 18, or the legacy exporter for 17")
    if opset > high:
        raise OpsetError(f"opset {opset} is newer than the {exporter} exporter of torch {torch.__version__} emits "
                         f"({low}..{high}); nothing was exported")


@dataclass
class ExportReport:
    path: Path
    exporter: str
    opset: int
    max_abs_diff: float  # largest |logit difference| over the parity inputs
    checked_shapes: list[tuple[int, ...]]
    config_path: Path | None  # config.json written beside the model, None if one was there already


def _stride(model: nn.Module) -> int:
    return int(getattr(model, "total_stride", 8))


def parity_shapes(input_size: Sequence[int], stride: int, batch: int = 2) -> list[tuple[int, int, int, int]]:
    """Shapes for the parity check: the config's size and a second, non-square one."""
    h, w = int(input_size[0]), int(input_size[1])
    h2 = max(stride, round(h * 0.75 / stride) * stride)
    w2 = max(stride, round(w * 1.25 / stride) * stride)
    if (h2, w2) == (h, w):
        w2 += stride
    return [(batch, 3, h, w), (batch, 3, h2, w2)]


def _session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort  # heavy runtime, needed only for the parity check

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(onnx_path: str | os.PathLike, model: nn.Module, shapes: Sequence[Sequence[int]],
                 seed: int = 0) -> float:
    """Compare an exported model with PyTorch on random inputs.

    The difference is in units of max(1, largest |PyTorch logit|): float32 rounding grows with the logits'
    size, and a trained model's logits reach tens. NaN or inf anywhere counts as an infinite difference.

    Args:
        onnx_path: The exported model, run by onnxruntime on CPU.
        model: The PyTorch model it was exported from.
        shapes: Input shapes (N, 3, H, W) to compare at.
        seed: Seed of the random inputs.

    Returns:
        The largest |onnxruntime logits - PyTorch logits| over the inputs, relative as above.

    Raises:
        ParityError: The two give outputs of different shapes.
    """
    sess = _session(onnx_path)
    name = sess.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    for shape in shapes:
        x = torch.rand(*shape, generator=gen)
        with torch.inference_mode():
            ref = model(x.to(device)).float().cpu().numpy()
        out = sess.run(None, {name: x.numpy()})[0]
        if out.shape != ref.shape:
            raise ParityError(f"{onnx_path}: output shape {out.shape} != PyTorch's {ref.shape} "
                              f"for input {tuple(shape)}")
        diff = float(np.abs(out - ref).max() / max(1.0, float(np.abs(ref).max())))
        worst = max(worst, diff if np.isfinite(diff) else float("inf"))
    return worst


def embed_config(model_proto: onnx.ModelProto, config: dict[str, Any]) -> None:
    """Store `config` (JSON) in the ONNX model's metadata_props."""
    for prop in list(model_proto.metadata_props):
        if prop.key == ONNX_CONFIG_KEY:
            model_proto.metadata_props.remove(prop)
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = ONNX_CONFIG_KEY, json.dumps(config)


def _save_onnx(model_proto: onnx.ModelProto, out: Path) -> None:
    with atomic_path(out) as tmp:
        onnx.save(model_proto, str(tmp))  # one file: small models need no external data


def export_onnx(weights: str | os.PathLike | nn.Module, out: str | os.PathLike, opset: int = 18,
                exporter: str = "dynamo", atol: float = PARITY_ATOL, config: dict[str, Any] | None = None,
                check: bool = True) -> ExportReport:
    """Export a checkpoint (or a model with `config`) to ONNX, check parity, embed the config.

    The config is embedded as metadata, and written as config.json beside `out` when none is there
    (module docstring).

    Args:
        weights: A run folder, a .safetensors file or a bundled model's name; or an `nn.Module` (a CPU
            float32 copy is exported; the module itself stays as it was).
        out: The .onnx file to write; it appears only once the export passed its checks.
        opset: The ONNX opset: 18 or newer for dynamo, 17 or newer for legacy, at most what the exporter emits.
        exporter: "dynamo" (torch.export-based) or "legacy" (the TorchScript exporter).
        atol: The largest parity difference accepted (relative to max(1, |logit|); `check_parity`).
        config: Replaces the weights' config (for an `nn.Module`: its `pretrained_config`).
        check: Whether to run the parity check.

    Returns:
        The path, exporter and opset, the parity difference (NaN without the check), the shapes checked and
        the config.json written (None if one was there).

    Raises:
        ValueError: An unknown exporter, or `out` does not end in .onnx.
        OpsetError: An opset the exporter cannot emit, or the exporter produced another one.
        ParityError: The export disagrees with PyTorch (no model file is left).
    """
    check_opset(opset, exporter)
    model, cfg = _model_and_config(weights, config)
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"{out}: the output file name must end in .onnx")
    stride = _stride(model)
    shapes = parity_shapes(cfg["input_size"], stride)
    example = torch.rand(*shapes[0])
    with torch.inference_mode(False), torch.no_grad():
        if exporter == "dynamo":
            proto = _dynamo_export(model, example, opset, stride)
        else:
            proto = _legacy_export(model, example, opset)
    actual_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    if actual_opset != opset:  # a requested opset is never silently replaced by another
        raise OpsetError(f"the {exporter} exporter produced opset {actual_opset}, not the requested {opset}; "
                         f"nothing was written to {out}")
    embed_config(proto, {**cfg, "onnx": {"exporter": exporter, "opset": opset, "precision": "fp32"}})
    if check:
        diff = _save_checked(proto, out, model, shapes, atol)
    else:
        _save_onnx(proto, out)
        diff = float("nan")
    config_path = None
    if not out.with_name("config.json").exists():
        config_path = out.with_name("config.json")
        write_json(config_path, cfg)
    return ExportReport(out, exporter, int(actual_opset), diff, [tuple(s) for s in shapes], config_path)


def _model_and_config(weights: str | os.PathLike | nn.Module,
                      config: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    """The model to export, on CPU in eval mode, and its config checked (`resunetpp.spec`)."""
    if isinstance(weights, nn.Module):
        # a CPU float32 copy: the caller's model may be on a GPU or in training mode, and stays as it was
        model = copy.deepcopy(weights).float().cpu().eval()
        cfg = dict(config or getattr(weights, "pretrained_config", {}) or {})
        return model, ModelSpec.from_dict(cfg, "config", require_model=False).to_dict()
    model = load_model(weights)  # the spec and the weights checked (resunetpp.spec)
    return model, ModelSpec.from_dict(config, "config").to_dict() if config else dict(model.pretrained_config)


def _dynamo_export(model: nn.Module, example: torch.Tensor, opset: int, stride: int) -> onnx.ModelProto:
    """The torch.export-based export, batch, height and width dynamic (height and width multiples of `stride`)."""
    dims = {0: Dim("batch", min=1), 2: stride * Dim("h_blocks", min=1), 3: stride * Dim("w_blocks", min=1)}
    # quiet the exporter's known noise: "torchvision is not installed" and a pytree FutureWarning
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=["image"], output_names=["logits"],
                                        dynamic_shapes=(dims,), verbose=False)
    finally:
        noisy.setLevel(level)
    return program.model_proto


def _legacy_export(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """The TorchScript exporter's export, batch, height and width dynamic."""
    buf = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation and tracer warnings are known and harmless here
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": axes, "logits": axes})
    return onnx.load_from_string(buf.getvalue())


def _save_checked(proto: onnx.ModelProto, out: Path, model: nn.Module, shapes: list[tuple[int, int, int, int]],
                  atol: float) -> float:
    """Write `proto` to `out` if it passes the parity check (else `ParityError`); the difference found."""
    with atomic_path(out) as tmp:  # checked before it is renamed into place: a failed export leaves no model
        onnx.save(proto, str(tmp))  # one file: small models need no external data
        try:
            diff = check_parity(tmp, model, shapes)
        except ParityError as e:  # name the output, not the temporary file
            raise ParityError(str(e).replace(str(tmp), str(out))) from None
        if not diff <= atol:
            raise ParityError(f"{out}: max |logit difference| vs PyTorch (relative to max(1, |logit|)) is "
                              f"{diff:.3g} > {atol:g}; "
                              f"the export is wrong (try exporter='legacy' or another opset)")
    return diff


def calibration_images(source: str | os.PathLike | Sequence[str | os.PathLike], count: int = 64) -> list[Path]:
    """Up to `count` image files from a folder (recursive) or list, spread evenly over the sorted list."""
    listing = collect_inputs([source] if isinstance(source, (str, os.PathLike)) else list(source))
    files = listing.files
    if not files:
        raise FileNotFoundError(f"{source}: no calibration images found")
    if len(files) > count:
        files = [files[i] for i in np.linspace(0, len(files) - 1, count).round().astype(int)]
    return files


def concat_fed(path: str | os.PathLike) -> list[str]:
    """Names of the Concat nodes and of the convolutions that read a Concat directly (the decoder
    shortcuts). Quantising a concatenation of attention output and skip with one scale crushes the
    small-range skip channels, which the BatchNorm after it then amplifies: keep them float."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    cats = [n.name for n in graph.node if n.op_type == "Concat"]
    fed = [n.name for n in graph.node if n.op_type == "Conv" and n.input[0] in producer
           and producer[n.input[0]].op_type == "Concat"]
    return cats + fed


def quantize_int8(fp32_onnx: str | os.PathLike, out: str | os.PathLike,
                  calib: str | os.PathLike | Sequence[str | os.PathLike], count: int = 64,
                  method: str = "minmax", per_channel: bool = True, progress: bool = True) -> Path:
    """Static int8 quantisation of an exported fp32 model, calibrated on real images.

    QDQ format, per-channel weights, only the convolutions that do not read a concatenation (module
    docstring); the images are preprocessed as `Segmenter` does. The config metadata is carried over.

    Args:
        fp32_onnx: The fp32 model from `export_onnx`.
        out: The int8 .onnx file to write.
        calib: A folder of images (searched recursively) or a list of image files.
        count: At most this many calibration images, spread evenly over the sorted list.
        method: The calibration method: "minmax", "entropy" or "percentile".
        per_channel: Per-channel weight scales (else per tensor).
        progress: Whether to show a progress bar over the calibration images.

    Returns:
        `out`.

    Raises:
        ValueError: An unknown calibration method.
        FileNotFoundError: No calibration image found.
        ModelError: `fp32_onnx` is not a readable ONNX model, or has no config.
    """
    from onnxruntime import quantization  # heavy (onnxruntime's quantisation tools), only for int8 models

    if method not in CALIB_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIB_METHODS)}")
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    cfg = onnx_config(fp32_onnx)
    files = calibration_images(calib, count)
    size, norm = cfg["input_size"], cfg["normalization"]

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(progress_bar(files, desc="calibrate", unit="img", disable=not progress))

        def get_next(self):
            f = next(self.it, None)
            if f is None:
                return None
            x = preprocess_images([read_image(f)], size, norm["mean"], norm["std"])
            return {"image": x.numpy()}

    proto = _quantize_static(quantization, fp32_onnx, Reader(), method, per_channel)
    embed_config(proto, {**cfg, "onnx": {**cfg.get("onnx", {}), "precision": "int8", "calibration": method,
                                         "calibration_images": len(files)}})
    _save_onnx(proto, out)
    return out


def _quantize_static(quantization, fp32_onnx: Path, reader, method: str, per_channel: bool) -> onnx.ModelProto:
    """The int8 model (`quantize_int8`); `quantization` is the onnxruntime.quantization module, `reader` its
    CalibrationDataReader."""
    methods = {"minmax": quantization.CalibrationMethod.MinMax, "entropy": quantization.CalibrationMethod.Entropy,
               "percentile": quantization.CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # ONNX shape inference + graph optimisation (BatchNorm folded into Conv) before placing Q/DQ pairs;
        # onnxruntime's symbolic shape inference cannot follow the "8 * h_blocks" dimensions, and is not needed
        quantization.shape_inference.quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)
        q = Path(tmp) / "int8.onnx"
        quantization.quantize_static(str(pre), str(q), reader, quant_format=quantization.QuantFormat.QDQ,
                                     per_channel=per_channel, activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8, calibrate_method=methods[method],
                                     op_types_to_quantize=["Conv"], nodes_to_exclude=concat_fed(pre))
        return onnx.load(str(q))
