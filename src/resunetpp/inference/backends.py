"""Where a forward pass runs: PyTorch, onnxruntime or OpenVINO, each a callable from a normalised
(N, 3, h, w) float32 tensor to logits."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resunetpp.inference.transforms import forward
from resunetpp.spec import ModelError, ModelSpec, ModelSpecError

BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
ONNX_CONFIG_KEY = "resunetpp_config"  # metadata_props key holding config.json in exported models


def onnx_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config of an exported model: its embedded metadata, else config.json beside it."""
    import onnx  # protobuf-heavy, needed only for .onnx weights: `import resunetpp` stays light

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


class TorchRunner:
    def __init__(self, model: nn.Module, device: str | torch.device, channels_last: bool = True,
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


class OrtRunner:
    def __init__(self, path: Path, device: str | torch.device, threads: int | None):
        import onnxruntime as ort  # heavy runtime, needed only for the onnxruntime backend

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
            import openvino as ov  # the optional extra resunetpp[openvino]
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


def open_onnx(path: Path, backend: str, device: torch.device, threads: int | None, precision: str,
              config: dict[str, Any] | None = None) -> tuple[OrtRunner | OpenVinoRunner, dict[str, Any]]:
    """(runner, config) of an exported .onnx model run by onnxruntime or OpenVINO; `config` replaces the
    one embedded in the file."""
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: the {backend} backend needs an .onnx file; "
                         "export one first (`resunetpp export`, or `resunetpp.inference.export.export_onnx`)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found")
    config = config or onnx_config(path)  # before the runtime: an unreadable file is named as such
    if backend == "openvino":
        return OpenVinoRunner(path, threads, precision), config
    if precision != "fp32":
        raise ValueError("onnxruntime runs the .onnx file's own precision; for bf16 use "
                         "backend='openvino' or 'torch', for int8 quantise the export (`resunetpp.inference.export."
                         "quantize_int8`)")
    return OrtRunner(path, device, threads), config
