"""Design table of the lite models against ResUNet++: parameters, GFLOP, CPU latency, training speed.

A benchmark, not a test: it prints a markdown table (with the CPU and its flags) to paste into
benchmarks/RESULTS.md. Untrained weights: speed does not depend on them.

    python benchmarks/lite_design.py [--models resunetpp-lite,resunetpp-lite-m,resunetpp] [--size 256]
        [--threads 2] [--runs 30] [--train-steps 6] [--train-batch 8]

Columns: torch fp32 batch-1 latency (eager, no grad), OpenVINO fp32 batch-1 latency (ONNX -> OpenVINO,
LATENCY hint), the same with bf16 where the CPU has it, and a training step's images/s (forward,
bce+dice, backward, Adam) at `--train-batch`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from latency import cpu_model  # noqa: E402  (benchmarks/ sibling)
from torch.utils.flop_counter import FlopCounterMode

import resunetpp
from resunetpp.export import export_onnx
from resunetpp.losses import get_loss


def cpu_flags_line() -> str:
    """The CPU's vector-extension flags (avx*, amx*): what decides these timings."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx"))))
    except OSError:
        pass
    return "unknown"


def gflop(model: torch.nn.Module, size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def median_ms(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def openvino_ms(model: torch.nn.Module, size: int, runs: int, threads: int, precision: str) -> float | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(model, path, config={"input_size": [size, size]})
        core = ov.Core()
        net = core.read_model(str(path))
        net.reshape([1, 3, size, size])
        compiled = core.compile_model(net, "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                                                   "INFERENCE_NUM_THREADS": threads})
        req = compiled.create_infer_request()
        x = torch.rand(1, 3, size, size).numpy()
        return median_ms(lambda: req.infer({0: x}), runs)


def train_img_s(name: str, size: int, batch: int, steps: int) -> float:
    model = resunetpp.create_model(name).train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = get_loss("bce+dice")
    x, y = torch.rand(batch, 3, size, size), (torch.rand(batch, 1, size, size) > 0.5).float()

    def step():
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch / (median_ms(step, steps, warmup=2) / 1e3)


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resunetpp-lite,resunetpp-lite-m,resunetpp")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--train-batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = "avx512_bf16" in cpu_flags_line() or "amx_bf16" in cpu_flags_line()
    print(f"CPU: {cpu_model()}, {args.threads} threads; torch {torch.__version__}")
    print(f"CPU flags: {cpu_flags_line()}\n")
    print("| model | parameters | GFLOP | torch fp32 ms | OpenVINO fp32 ms | OpenVINO bf16 ms | train img/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        model = resunetpp.create_model(name).eval()
        x = torch.rand(1, 3, args.size, args.size)
        with torch.no_grad():
            t_torch = median_ms(lambda m=model, x=x: m(x), args.runs)
        ov32 = openvino_ms(model, args.size, args.runs, args.threads, "f32")
        ov16 = openvino_ms(model, args.size, args.runs, args.threads, "bf16") if bf16 else None
        print(f"| {name} | {resunetpp.registry.count_parameters(model):,} | {gflop(model, args.size):.3f} | "
              f"{t_torch:.2f} | {fmt(ov32)} | {fmt(ov16)} | "
              f"{train_img_s(name, args.size, args.train_batch, args.train_steps):.1f} |", flush=True)


if __name__ == "__main__":
    main()
