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
* `tta=True` averages the sigmoid probabilities of the identity, horizontal-flip and
  vertical-flip predictions (each flipped back), as the ResUNet++ follow-up (JBHI 2021) did.
* Weights: a checkpoint folder (config.json + model.safetensors), a `.safetensors` file with
  config.json beside it, an `.onnx` file from `resunetpp export` (its config is embedded as
  metadata and written beside it; run by onnxruntime, or by OpenVINO with backend="openvino"),
  an `nn.Module`, or None for the bundled weights.
"""

from __future__ import annotations

import csv
import errno
import glob
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from .io import IMAGE_EXTENSIONS, ImageReadError, read_image
from .preprocess import default_normalization, forward, normalize, resize_image

BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
ONNX_CONFIG_KEY = "resunetpp_config"  # metadata_props key holding config.json in exported models
DEFAULT_CONFIG: dict[str, Any] = {"input_size": [256, 256], "normalization": default_normalization(), "threshold": 0.5}


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
        raise ValueError(f"{path}: not a readable ONNX model ({e})") from None
    for prop in model.metadata_props:
        if prop.key == ONNX_CONFIG_KEY:
            return json.loads(prop.value)
    beside = path.with_name("config.json")
    if beside.is_file():
        return json.loads(beside.read_text())
    raise ValueError(f"{path}: has no embedded resunetpp config and no config.json beside it; "
                     "export it with `resunetpp export` or put the checkpoint's config.json next to it")


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch.device (ValueError if unknown)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def check_threshold(threshold: float) -> float:
    """The probability threshold as a float in [0, 1], or ValueError (shared by predict, video, evaluate)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    return value


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
            raise ValueError(f"{path}: onnxruntime cannot load it ({e})") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.numpy().astype(np.float32, copy=False)})[0]
        return torch.from_numpy(out)


class _OpenVinoRunner:
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
    crf: None, "mask" or "bilateral" (needs the `crf` extra). threads: onnxruntime / OpenVINO
    threads (default: their choice, one per physical core). channels_last: PyTorch memory format.
    """

    def __init__(self, weights: str | os.PathLike | nn.Module | None = None, device: str = "auto",
                 backend: str | None = None, tta: bool = False, crf: str | None = None,
                 threshold: float | None = None, config: dict[str, Any] | None = None,
                 threads: int | None = None, channels_last: bool = False, precision: str = "fp32"):
        from .crf import CRF_MODES, CRFUnavailableError, crf_available

        device = resolve_device(device)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
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
                if self.backend == "openvino":
                    self._run = _OpenVinoRunner(path, threads, precision)
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
                self._run = _TorchRunner(model, device, channels_last, precision == "bf16")
            self.weights = path
        self.config = {**DEFAULT_CONFIG, **cfg}
        self.input_size = tuple(int(v) for v in self.config["input_size"])
        norm = self.config.get("normalization") or default_normalization()
        self.mean, self.std = list(norm["mean"]), list(norm["std"])
        self.threshold = check_threshold(self.config["threshold"] if threshold is None else threshold)
        self.tta = tta
        self.crf = crf
        self.precision = precision

    def __repr__(self) -> str:
        return (f"Segmenter(weights={str(self.weights) if self.weights else 'module'!r}, backend={self.backend!r}, "
                f"precision={self.precision!r}, input_size={list(self.input_size)}, threshold={self.threshold}, "
                f"tta={self.tta}, crf={self.crf!r})")

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

    def postprocess(self, image: np.ndarray, prob: np.ndarray) -> np.ndarray:
        """(H, W) bool mask from a probability map: threshold, or the CRF's labelling."""
        if self.crf is not None:
            from .crf import crf_refine

            return crf_refine(image, prob, mode=self.crf, threshold=self.threshold) > 0.5
        return prob > self.threshold

    # -- the API most callers want --
    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask bool (H, W), prob float32 (H, W)) for one (H, W, 3) uint8 RGB image."""
        return self.segment_batch([image])[0]

    def segment_batch(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`segment` for a list of images (any sizes) in one forward pass."""
        probs = self.probabilities(images)
        return [(self.postprocess(im, p), p) for im, p in zip(images, probs)]


# ----------------------------------------------------------------------------------------------
# Files on disk: `resunetpp predict`
# ----------------------------------------------------------------------------------------------

CSV_COLUMNS = ("input", "mask", "overlay", "prob", "height", "width", "area_fraction", "polyp",
               "x0", "y0", "x1", "y1", "time_ms", "error")
PROB_FORMATS = ("png", "npy")


@dataclass
class InputList:
    files: list[Path]
    missing: list[tuple[str, str]] = field(default_factory=list)  # (input as given, reason)
    skipped: list[Path] = field(default_factory=list)  # non-image files found inside folders


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> InputList:
    """Expand files, folders (recursively: files with an image extension; hidden files ignored)
    and glob patterns into a sorted, de-duplicated file list. Files named explicitly are kept
    whatever their extension (reading them reports what is wrong)."""
    found: dict[Path, None] = {}
    result = InputList(files=[])
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue
                if f.is_symlink() and not f.exists():  # reported, never dropped silently
                    result.missing.append((str(f), f"broken symbolic link (points to {os.readlink(f)})"))
                    continue
                if not f.is_file():
                    continue
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    found[f] = None
                else:
                    result.skipped.append(f)
        elif p.exists():
            found[p] = None
        elif p.is_symlink():
            result.missing.append((str(raw), f"broken symbolic link (points to {os.readlink(p)})"))
        elif glob.has_magic(str(raw)):
            matches = [Path(m) for m in sorted(glob.glob(str(raw), recursive=True)) if Path(m).is_file()]
            if not matches:
                result.missing.append((str(raw), "no files match this pattern"))
            for m in matches:
                found[m] = None
        else:
            result.missing.append((str(raw), "no such file or folder"))
    result.files = list(found)
    return result


def output_names(files: Sequence[Path]) -> list[Path]:
    """Relative output paths (".png") that keep the inputs' folder structure below their deepest
    common folder, so same-named files in different folders never collide; two inputs that
    differ only by extension keep it in the name (a.jpg -> a.jpg.png)."""
    if not files:
        return []
    parents = [os.path.abspath(f.parent) for f in files]
    root = Path(os.path.commonpath(parents))
    rel = [Path(os.path.abspath(f)).relative_to(root) for f in files]
    stems = [r.with_suffix(".png") for r in rel]
    counts: dict[Path, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else r.with_name(r.name + ".png") for s, r in zip(stems, rel)]


@dataclass
class PredictSummary:
    rows: list[dict[str, Any]]
    csv_path: Path
    skipped: list[Path]
    not_done: int = 0            # inputs never attempted (the run stopped early)
    stopped: str = ""            # why it stopped early ("" when it ran to the end)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["error"]]

    def line(self, out: str | os.PathLike) -> str:
        """The one-line summary `resunetpp predict` prints."""
        ok = len(self.rows) - len(self.failed)
        found = sum(1 for r in self.rows if r["polyp"] == 1)
        rest = f", {self.not_done} not done" if self.not_done else ""
        return (f"{ok} image(s) segmented, {found} with a polyp, {len(self.failed)} failed{rest}; "
                f"results in {out} (predictions.csv)")


class PredictOutputError(ValueError):
    """`out_dir` cannot be used: it is a file, lies under a file, or cannot be created or written."""


class PredictStopped(Exception):
    """The disk filled up (or the CSV could not be written): the run stopped; `summary` says what was done."""

    def __init__(self, message: str, summary: PredictSummary):
        super().__init__(message)
        self.summary = summary


class PredictInterrupted(KeyboardInterrupt):
    """Ctrl-C during `predict_files`; `summary` says what was written (the CSV is complete for it)."""

    def __init__(self, summary: PredictSummary):
        super().__init__("interrupted")
        self.summary = summary


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create `out` (and its parents) or raise `PredictOutputError` with one line saying what to do.
    An existing file is never replaced by the folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PredictOutputError(f"{out}: exists and is a file, not a folder; choose a folder for --out "
                                 "(nothing was written)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((a for a in [out, *out.parents] if a.exists() and not a.is_dir()), out.parent)
        raise PredictOutputError(f"{out}: cannot create this folder because {blocker} is a file; "
                                 "choose another --out") from None
    except PermissionError:
        raise PredictOutputError(f"{out}: cannot create this folder: permission denied; choose a folder you can "
                                 "write to for --out") from None
    except OSError as e:
        raise PredictOutputError(f"{out}: cannot create this folder ({e.strerror}); choose another --out") from None
    return out


def _os_reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the foreground, x1/y1 exclusive (numpy slicing), or None if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if not len(ys):
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _write_bytes(path: Path, data: bytes, written: list[Path]) -> None:
    """Write `data` to `path`, recording it in `written` first so that a failed row can be undone.
    An OSError keeps its errno and reason (e.g. ENOSPC, "No space left on device")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written.append(path)
    with open(path, "wb") as fh:
        fh.write(data)


def _write_png(path: Path, array: np.ndarray, written: list[Path]) -> None:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode this PNG ({array.shape} {array.dtype})")
    _write_bytes(path, buf.tobytes(), written)


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _timed_read(path: Path) -> tuple[np.ndarray | None, str, float]:
    t = time.perf_counter()
    try:
        return read_image(path), "", time.perf_counter() - t
    except ImageReadError as e:
        return None, str(e), time.perf_counter() - t
    except Exception as e:  # a reader bug must not stop a long run either
        return None, f"{path}: {type(e).__name__}: {e}", time.perf_counter() - t


def _print_error(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"error: {message}", file=sys.stderr)


def predict_files(segmenter: Segmenter, inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                  batch_size: int = 4, save_prob: str | None = None, overlay: bool = True, progress: bool = True,
                  on_error: Callable[[str], None] | None = _print_error) -> PredictSummary:
    """Segment image files and write, under `out_dir`: masks/<rel>.png (0/255), overlays/<rel>.png,
    with save_prob="png" probs/<rel>.png (8-bit, round(255 p)) or "npy" probs/<rel>.npy (float32),
    and predictions.csv (one row per input, written as the run goes).

    A file that cannot be read or processed gets a row with its error and `on_error(message)`
    (the message starts with the path); every other file is still done. `time_ms` is that file's
    wall time: reading, its share of its batch's forward pass, post-processing and writing.
    """
    from .progress import progress_bar

    if save_prob is not None and save_prob not in PROB_FORMATS:
        raise ValueError(f"save_prob must be one of {', '.join(PROB_FORMATS)} or None, got {save_prob!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = prepare_out_dir(out_dir)
    listing = collect_inputs(inputs)
    names = output_names(listing.files)
    rows: list[dict[str, Any]] = []
    csv_path = out / "predictions.csv"
    if csv_path.is_dir():
        raise PredictOutputError(f"{csv_path}: is a folder; remove it or choose another --out")
    report = on_error or (lambda _m: None)
    summary = PredictSummary(rows=rows, csv_path=csv_path, skipped=listing.skipped)
    try:
        fh = open(csv_path, "w", newline="")
    except OSError as e:
        raise PredictOutputError(f"{csv_path}: cannot write it ({_os_reason(e)}); choose a folder you can write "
                                 "to for --out") from None
    writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        try:
            writer.writerow(row)
        except OSError as e:
            raise PredictStopped(f"{csv_path}: cannot write the CSV ({_os_reason(e)})", summary) from None

    def fail(src: str, message: str, seconds: float = 0.0, quiet: bool = False) -> None:
        row = dict.fromkeys(CSV_COLUMNS, "")
        row.update(input=src, time_ms=f"{seconds * 1000:.1f}", error=message)
        record(row)
        if not quiet:
            report(message)

    batches = [list(range(i, min(i + batch_size, len(listing.files))))
               for i in range(0, len(listing.files), batch_size)]
    try:
        with fh, ThreadPoolExecutor(max_workers=2) as pool, \
                progress_bar(total=len(listing.files), unit="img", disable=not progress, desc="predict") as bar:
            writer.writeheader()
            for src, reason in listing.missing:
                fail(src, f"{src}: {reason}")

            def submit(b: list[int]) -> list[Future]:
                return [pool.submit(_timed_read, listing.files[i]) for i in b]

            pending = submit(batches[0]) if batches else []
            for k, batch in enumerate(batches):
                reads = [f.result() for f in pending]
                pending = submit(batches[k + 1]) if k + 1 < len(batches) else []  # read ahead while computing
                good = []
                for i, (image, err, secs) in zip(batch, reads):
                    if image is None:
                        fail(str(listing.files[i]), err, secs)
                    else:
                        good.append((i, image, secs))
                if good:
                    t0 = time.perf_counter()
                    results = _infer(segmenter, [g[1] for g in good])
                    share = (time.perf_counter() - t0) / len(good)
                    for (i, image, secs), (prob, err) in zip(good, results):
                        src = listing.files[i]
                        if prob is None:
                            fail(str(src), f"{src}: inference failed ({err})", secs)
                            continue
                        t1 = time.perf_counter()
                        written: list[Path] = []
                        try:
                            row = _write_outputs(segmenter, src, names[i], out, image, prob, save_prob, overlay,
                                                 written)
                        except BaseException as e:
                            _remove(written)  # no mask left behind for a row the CSV marks as failed
                            if not isinstance(e, Exception):
                                raise
                            if isinstance(e, OSError) and e.errno in _DISK_FULL:  # said once, by the caller
                                message = f"{src}: not written: {_os_reason(e)} in {out}"
                                fail(str(src), message, secs, quiet=True)
                                raise PredictStopped(message, summary) from None
                            fail(str(src), f"{src}: not written: {_os_reason(e)}", secs)
                            continue
                        row["time_ms"] = f"{(secs + share + time.perf_counter() - t1) * 1000:.1f}"
                        record(row)
                try:
                    fh.flush()
                except OSError as e:
                    raise PredictStopped(f"{csv_path}: cannot write the CSV ({_os_reason(e)})", summary) from None
                bar.update(len(batch))
    except PredictStopped:
        summary.not_done = len(listing.files) - len({r["input"] for r in rows} & {str(f) for f in listing.files})
        summary.stopped = "disk full"
        raise
    except KeyboardInterrupt:
        summary.not_done = len(listing.files) - len({r["input"] for r in rows} & {str(f) for f in listing.files})
        summary.stopped = "interrupted"
        raise PredictInterrupted(summary) from None
    return summary


def _infer(segmenter: Segmenter, images: list[np.ndarray]) -> list[tuple[np.ndarray | None, str]]:
    """(prob, "") or (None, error) per image. A failed batch is retried image by image, so an input
    that breaks the model (or a batch too big for the device) fails alone, not its batch-mates."""
    try:
        return [(p, "") for p in segmenter.probabilities(images)]
    except Exception as e:
        if len(images) == 1:
            return [(None, f"{type(e).__name__}: {e}")]
        return [r for im in images for r in _infer(segmenter, [im])]


def _write_outputs(segmenter: Segmenter, src: Path, name: Path, out: Path, image: np.ndarray, prob: np.ndarray,
                   save_prob: str | None, overlay: bool, written: list[Path]) -> dict[str, Any]:
    import io

    from .overlay import draw_overlay

    mask = segmenter.postprocess(image, prob)
    row = dict.fromkeys(CSV_COLUMNS, "")
    _write_png(out / "masks" / name, mask.astype(np.uint8) * 255, written)
    row["mask"] = str(Path("masks") / name)
    if overlay:
        _write_png(out / "overlays" / name, cv2.cvtColor(draw_overlay(image, mask), cv2.COLOR_RGB2BGR), written)
        row["overlay"] = str(Path("overlays") / name)
    if save_prob == "png":
        _write_png(out / "probs" / name, np.round(prob * 255).astype(np.uint8), written)
        row["prob"] = str(Path("probs") / name)
    elif save_prob == "npy":
        buf = io.BytesIO()
        np.save(buf, prob.astype(np.float32))
        _write_bytes(out / "probs" / name.with_suffix(".npy"), buf.getvalue(), written)
        row["prob"] = str(Path("probs") / name.with_suffix(".npy"))
    box = bounding_box(mask)
    row.update(input=str(src), height=mask.shape[0], width=mask.shape[1],
               area_fraction=f"{mask.mean():.6f}", polyp=int(box is not None))
    if box:
        row.update(zip(("x0", "y0", "x1", "y1"), box))
    return row
