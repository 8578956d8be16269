"""Latency and throughput of ResUNet++ per backend and precision; optionally the Dice of each.

A benchmark, not a test: it prints a markdown table to paste into benchmarks/RESULTS.md.

    python benchmarks/latency.py [--weights RUN] [--size 256] [--runs 50] [--threads 2]
        [--calib DIR] [--dice-data ../shared/data/Kvasir-SEG] [--dice-count 50] [--only torch,ort,openvino]

Batch-1 latency: median and p90 of `--runs` timed calls after `--warmup` untimed ones.
Batch-16 throughput: images per second over `--bulk-runs` calls. Inputs are the preprocessed
(normalised) tensor at size x size, so pre/post-processing is not included.

CPU rows: torch fp32 (NCHW and channels_last), torch bf16 autocast, onnxruntime fp32 without and
with graph optimisation (the BatchNorm count before/after is printed), onnxruntime static int8
(QDQ, per-channel, calibrated on `--calib` images), and OpenVINO fp32 / bf16 / int8 if installed.
GPU rows when CUDA is present: torch fp32 and bf16 eager, bf16 CUDA-graph replay at batch 1, and
bf16 bulk throughput at batch 256 (every timing with torch.cuda.synchronize()).

Dice (`--dice-data`, needs trained `--weights`): each backend segments the same `--dice-count`
Kvasir-SEG test-split images through the documented pipeline (resize, normalise, sigmoid, resize
back, threshold) and its mean Dice against the ground truth is compared with torch fp32's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import resunetpp
from resunetpp.inference.backends import OpenVinoRunner
from resunetpp.inference.transforms import preprocess_images, resize_prob

Runner = Callable[[np.ndarray], np.ndarray]  # (N, 3, H, W) float32 -> (N, 1, H, W) logits
ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    """The CPU's vector-extension flags (avx*, amx*): what decides these timings."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma"))))
    return "unknown"


def time_runner(run: Runner, x: np.ndarray, runs: int, warmup: int, sync: Callable[[], None] = lambda: None):
    for _ in range(warmup):
        run(x)
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run(x)
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), float(np.percentile(times, 90))


# --- runners ---------------------------------------------------------------------------------

def torch_runner(model: torch.nn.Module, channels_last: bool = False, bf16: bool = False) -> Runner:
    m = model.to(memory_format=torch.channels_last) if channels_last else model

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return m(t).float().numpy()

    return run


def ort_runner(path: Path, threads: int, optimize: bool = True, save_optimized: Path | None = None) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if save_optimized:
        opts.optimized_model_filepath = str(save_optimized)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def openvino_runner(path: Path, threads: int, precision: str) -> Runner:
    # the Segmenter's own runner, so the benchmark times the code that `--backend openvino` runs
    run = OpenVinoRunner(path, threads, precision)
    return lambda x: run(torch.from_numpy(x)).numpy()


# --- Dice on real images -----------------------------------------------------------------------

def load_dice_set(data: Path, count: int, size: int, norm: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    from resunetpp.io import read_image, read_mask

    split = json.loads((ROOT / "src/resunetpp/splits/kvasir-seg.json").read_text())
    ids = sorted(split["test"])[:count]
    out = []
    for i in ids:
        x = preprocess_images([read_image(data / "images" / f"{i}.jpg")], (size, size),
                              norm["mean"], norm["std"]).numpy()
        out.append((x, read_mask(data / "masks" / f"{i}.jpg")))
    return out


def dice_of(run: Runner, data: list[tuple[np.ndarray, np.ndarray]], threshold: float) -> tuple[float, list]:
    scores, masks = [], []
    for x, truth in data:
        out = run(x)
        out = out.float().cpu().numpy() if torch.is_tensor(out) else out
        prob = 1 / (1 + np.exp(-np.clip(out[0, 0].astype(np.float32), -60, 60)))
        mask = resize_prob(prob, truth.shape) > threshold
        denom = mask.sum() + truth.sum()
        scores.append(1.0 if denom == 0 else 2 * float((mask & truth).sum()) / float(denom))
        masks.append(mask)
    return float(np.mean(scores)), masks


def agreement(a: list, b: list) -> float:
    """Mean Dice between two backends' masks (1 where both are empty)."""
    return float(np.mean([1.0 if not (x.any() or y.any()) else 2 * (x & y).sum() / (x.sum() + y.sum())
                          for x, y in zip(a, b)]))


# --- main ------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="checkpoint folder; default: untrained ResUNet++ (latency only)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--bulk-batch", type=int, default=16)
    ap.add_argument("--bulk-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=Path, help="folder (or Kvasir-SEG root: its train split) for int8 calibration")
    ap.add_argument("--calib-count", type=int, default=64)
    ap.add_argument("--dice-data", type=Path, help="Kvasir-SEG root; compares each backend's Dice")
    ap.add_argument("--dice-count", type=int, default=50)
    ap.add_argument("--only", default="torch,ort,openvino,cuda", help="comma-separated backend families")
    ap.add_argument("--keep", type=Path, help="keep the exported .onnx files in this folder")
    args = ap.parse_args()
    only = set(args.only.split(","))

    torch.set_num_threads(args.threads)
    if args.weights:
        model = resunetpp.load_model(args.weights)
        cfg = dict(model.pretrained_config)
    else:
        model = resunetpp.create_model("resunetpp").eval()
        cfg = {"model": "resunetpp", "model_kwargs": {}, "input_size": [args.size, args.size],
               "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}, "threshold": 0.5}
    cfg["input_size"] = [args.size, args.size]
    norm = cfg.get("normalization", {"mean": [0, 0, 0], "std": [1, 1, 1]})
    rng = np.random.default_rng(0)
    x1 = rng.random((1, 3, args.size, args.size), dtype=np.float32)
    xb = rng.random((args.bulk_batch, 3, args.size, args.size), dtype=np.float32)

    versions = [f"torch {torch.__version__}"]
    work = args.keep or Path(tempfile.mkdtemp(prefix="resunetpp-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runners: list[tuple[str, str, Runner, Callable[[], None]]] = []
    nosync: Callable[[], None] = lambda: None  # noqa: E731
    notes = []

    if "torch" in only:
        runners += [("torch", "fp32", torch_runner(model), nosync),
                    ("torch channels_last", "fp32", torch_runner(_copy(model), channels_last=True), nosync),
                    ("torch autocast", "bf16", torch_runner(model, bf16=True), nosync),
                    ("torch channels_last autocast", "bf16",
                     torch_runner(_copy(model), channels_last=True, bf16=True), nosync)]
    if {"ort", "openvino"} & only:
        import onnx
        import onnxruntime as ort

        from resunetpp.inference.export import export_onnx, quantize_int8

        versions.append(f"onnxruntime {ort.__version__}")
        fp32 = work / "model.onnx"
        rep = export_onnx(_copy(model), fp32, config=cfg)
        notes.append(f"export: {rep.exporter} opset {rep.opset}, parity max |logit diff| {rep.max_abs_diff:.2e}")
        int8 = work / "model-int8.onnx"
        calib = _calibration(args.calib, args.calib_count, work, args.size)
        t = time.perf_counter()
        quantize_int8(fp32, int8, calib, count=args.calib_count, progress=False)
        notes.append(f"int8: static QDQ, convolutions only (not those reading a Concat), per-channel weights, "
                     f"MinMax on {args.calib_count} calibration images ({time.perf_counter() - t:.0f} s)")
        if "ort" in only:
            optimized = work / "model-ort-optimized.onnx"
            runners += [("onnxruntime, no graph opt", "fp32", ort_runner(fp32, args.threads, optimize=False), nosync),
                        ("onnxruntime", "fp32", ort_runner(fp32, args.threads, save_optimized=optimized), nosync),
                        ("onnxruntime", "int8", ort_runner(int8, args.threads), nosync)]
            n_bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(fp32)).graph.node)
            n_bn_opt = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(optimized)).graph.node)
            n_conv = sum(n.op_type == "Conv" for n in onnx.load(str(fp32)).graph.node)
            notes.append(f"BatchNormalization nodes: {n_bn} in the export ({n_conv} Conv), {n_bn_opt} after "
                         "onnxruntime's ORT_ENABLE_ALL optimisation")
        if "openvino" in only:
            try:
                import openvino as ov

                versions.append(f"openvino {ov.__version__}")
                runners += [("openvino", "fp32", openvino_runner(fp32, args.threads, "fp32"), nosync),
                            ("openvino", "bf16", openvino_runner(fp32, args.threads, "bf16"), nosync),
                            ("openvino, int8 QDQ model", "int8 + fp32", openvino_runner(int8, args.threads, "fp32"),
                             nosync),
                            ("openvino, int8 QDQ model", "int8 + bf16", openvino_runner(int8, args.threads, "bf16"),
                             nosync)]
            except ImportError:
                notes.append("openvino not installed: skipped (pip install openvino)")
    if "cuda" in only and torch.cuda.is_available():
        runners += _cuda_runners(model, args.size)
        notes.append(f"GPU: {torch.cuda.get_device_name()}")

    dice_set = None
    if args.dice_data:
        if not args.weights:
            notes.append("Dice skipped: needs trained --weights")
        else:
            dice_set = load_dice_set(args.dice_data, args.dice_count, args.size, norm)

    print(f"# latency {datetime.date.today()} | {cpu_model()} | {args.threads} threads | input {args.size}x"
          f"{args.size} | {', '.join(versions)}")
    print(f"# CPU flags: {cpu_flags()}")
    for n in notes:
        print(f"# {n}")
    head = f"| backend | precision | batch-1 median ms | batch-1 p90 ms | batch-1 fps | batch-{args.bulk_batch} img/s |"
    if dice_set:
        head += f" mean Dice ({len(dice_set)} imgs) | Δ Dice vs torch fp32 | mask agreement vs torch fp32 |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    ref = None
    for name, prec, run, sync in runners:
        bulk_only = name.startswith("cuda bulk")
        bulk = 256 if bulk_only else args.bulk_batch
        cells = [name, prec]
        if bulk_only:
            cells += ["–", "–", "–"]
        else:
            med, p90 = time_runner(run, x1, args.runs, args.warmup, sync)
            cells += [f"{med:.1f}", f"{p90:.1f}", f"{1000 / med:.1f}"]
        if name == "cuda graph":  # a batch-1 graph: no bulk figure
            cells.append("–")
        else:
            xbulk = xb if bulk == len(xb) else np.random.default_rng(1).random((bulk, 3, args.size, args.size),
                                                                               dtype=np.float32)
            t_bulk, _ = time_runner(run, xbulk, args.bulk_runs, 1, sync)
            cells.append(f"{bulk * 1000 / t_bulk:.1f}" + (f" (batch {bulk})" if bulk_only else ""))
        if dice_set:
            d, masks = dice_of(run, dice_set, float(cfg.get("threshold", 0.5)))
            if ref is None:
                ref = (d, masks)
            cells += [f"{d:.4f}", f"{d - ref[0]:+.4f}", f"{agreement(masks, ref[1]):.4f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def _calibration(calib: Path | None, count: int, work: Path, size: int) -> list[Path]:
    """Calibration files: a folder, the Kvasir-SEG train split when given the dataset root, or
    (no data) random images, which only suit latency measurements."""
    if calib is not None:
        split = ROOT / "src/resunetpp/splits/kvasir-seg.json"
        if (calib / "images").is_dir() and split.is_file():
            ids = sorted(json.loads(split.read_text())["train"])
            picks = np.linspace(0, len(ids) - 1, min(count, len(ids))).round().astype(int)
            return [calib / "images" / f"{ids[i]}.jpg" for i in picks]
        return [calib]
    from PIL import Image

    folder = work / "random-calib"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(min(count, 16)):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return [folder]


def _cuda_runners(model: torch.nn.Module, size: int):
    """GPU rows: fp32 and bf16 eager, bf16 CUDA-graph replay at batch 1, bf16 bulk at batch 256."""
    dev = torch.device("cuda")
    m = _copy(model).to(dev)
    sync = torch.cuda.synchronize

    def eager(bf16: bool) -> Runner:
        @torch.inference_mode()
        def run(x: np.ndarray):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                out = m(torch.from_numpy(x).to(dev, non_blocking=True))
            return out  # stays on the GPU: timing covers the forward, not the copy back

        return run

    # CUDA graph for batch 1: capture once, replay with the input copied into a static buffer
    static_x = torch.zeros(1, 3, size, size, device=dev)
    with torch.inference_mode():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                m(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            static_out = m(static_x)

    def replay(x: np.ndarray):
        if x.shape[0] != 1:
            return eager(True)(x)
        static_x.copy_(torch.from_numpy(x), non_blocking=True)
        graph.replay()
        return static_out

    return [("cuda eager", "fp32", eager(False), sync), ("cuda eager autocast", "bf16", eager(True), sync),
            ("cuda graph", "bf16", replay, sync), ("cuda bulk autocast", "bf16", eager(True), sync)]


if __name__ == "__main__":
    main()
