"""Training throughput (images/s) of the real training step, eager vs compiled, per batch and precision.

The step under test is `resunetpp.training.loop.training_step`, the one `train` runs: `paper` augmentation
on the device, normalisation, forward/backward (bf16 autocast or fp32), dice loss, the optimiser
(fused Adam on CUDA, foreach on CPU), SGDR. Data are synthetic uint8 pairs held on the device.

    python benchmarks/train_speed.py --device cuda                     # 256x256, batch 16/64, fp32/bf16, eager/compiled
    python benchmarks/train_speed.py --device cuda --procs 3           # also: 3 processes sharing the GPU, summed
    python benchmarks/train_speed.py --device cuda --batches 16 --precisions bf16 --augments paper,none  # augmenting
    python benchmarks/train_speed.py --device cpu --size 64 --filters 8,16,32,64,128 --steps 3   # tiny, CPU

Each row: `--warmup` untimed steps (compilation happens there; its seconds are shown), then
`--steps` timed steps between device syncs. On a CPU, compare rows only within one run (the
machine's model changes between sessions; its flags are printed with the table).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from resunetpp import create_model
from resunetpp.data import Augment
from resunetpp.training.loop import TrainConfig, make_optimizer, make_scheduler, normalization_on, training_step
from resunetpp.training.losses import get_loss


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        have = set(next(line for line in info.splitlines() if line.startswith("flags")).split())
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in have)
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} cores; {flags or 'no AVX2'}), torch {torch.__version__}"


def measure(model_name: str, filters: list[int] | None, size: int, batch: int, bf16: bool, compile_mode: str,
            steps: int, warmup: int, device: torch.device, seed: int = 0, augment: str = "paper") -> dict:
    """img/s of `steps` training steps after `warmup` ones, plus the warm-up (compile) seconds."""
    torch.manual_seed(seed)
    cfg = TrainConfig(model=model_name, data="synthetic", batch_size=batch, size=size).resolved()
    model = create_model(model_name, **({"filters": filters} if filters else {})).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    net = model if compile_mode == "off" else torch.compile(model, mode=None if compile_mode == "default" else
                                                            compile_mode)
    opt = make_optimizer(cfg, model.parameters(), device)
    sched = make_scheduler(cfg, opt, total_steps=10_000)
    step = training_step(net, opt, get_loss(cfg.loss), Augment(augment).to(device), normalization_on(device),
                         amp=bf16, channels_last=cuda, sched=sched)
    pool = 4 * batch
    images = torch.randint(0, 256, (pool, 3, size, size), dtype=torch.uint8, device=device)
    masks = (torch.rand(pool, 1, size, size, device=device) > 0.7).to(torch.uint8)
    order = torch.randperm(pool * (warmup + steps + 1), device=device) % pool
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.train()
    t0 = time.perf_counter()
    for i in range(warmup):
        step(images[order[i * batch:(i + 1) * batch]], masks[order[i * batch:(i + 1) * batch]])
    sync()
    t1 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(images[order[i * batch:(i + 1) * batch]], masks[order[i * batch:(i + 1) * batch]])
    sync()
    t2 = time.perf_counter()
    return {"model": model_name, "size": size, "batch": batch, "precision": "bf16" if bf16 else "fp32",
            "augment": augment, "compile": compile_mode, "img_per_s": round(steps * batch / (t2 - t1), 1),
            "ms_per_step": round(1000 * (t2 - t1) / steps, 2), "warmup_s": round(t1 - t0, 1),
            "loss_finite": bool(torch.isfinite(loss).item())}


def concurrent(args: argparse.Namespace, procs: int, batch: int, bf16: bool) -> dict:
    """`procs` copies of one eager row at once (separate processes on one device): their img/s summed."""
    cmd = [sys.executable, __file__, "--device", args.device, "--size", str(args.size), "--batches", str(batch),
           "--precisions", "bf16" if bf16 else "fp32", "--augments", args.augments.split(",")[0],
           "--compile", "off", "--steps", str(args.steps), "--warmup", str(args.warmup), "--model", args.model,
           "--quiet", "--json", "-"]
    if args.filters:
        cmd += ["--filters", args.filters]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    rows = [json.loads(r.communicate()[0])["rows"][0] for r in runs]
    return {"model": args.model, "size": args.size, "batch": batch, "precision": "bf16" if bf16 else "fp32",
            "augment": rows[0]["augment"], "compile": f"off, {procs} processes",
            "img_per_s": round(sum(r["img_per_s"] for r in rows), 1),
            "ms_per_step": round(max(r["ms_per_step"] for r in rows), 2),
            "warmup_s": max(r["warmup_s"] for r in rows), "loss_finite": all(r["loss_finite"] for r in rows)}


def table(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "",
             "| model | size | batch | precision | augment | compile | img/s | ms/step | warm-up s |",
             "| --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['precision']} | {r['augment']} | "
                     f"{r['compile']} | {r['img_per_s']:,.1f} | {r['ms_per_step']} | {r['warmup_s']} |")
    key = lambda r: (r["batch"], r["precision"], r["augment"])  # noqa: E731
    eager = {key(r): r["img_per_s"] for r in rows if r["compile"] == "off"}
    ratios = [f"batch {r['batch']} {r['precision']} {r['augment']} {r['compile']}: "
              f"{r['img_per_s'] / eager[key(r)]:.2f}x"
              for r in rows if r["compile"] != "off" and key(r) in eager]
    if ratios:
        lines += ["", "vs eager in this run: " + "; ".join(ratios)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="resunetpp")
    ap.add_argument("--filters", help="comma-separated widths (default: the model's own)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--compile", default="off,default", help="comma-separated: off, default, reduce-overhead")
    ap.add_argument("--augments", default="paper", help="comma-separated augmentation presets (paper, light, none)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--procs", type=int, default=0, help="also run this many eager bf16 copies at once")
    ap.add_argument("--json", help="write the rows as JSON to this file ('-': stdout, no table)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    filters = [int(f) for f in args.filters.split(",")] if args.filters else None
    rows = []
    for compile_mode, batch, precision, augment in itertools.product(
            args.compile.split(","), [int(b) for b in args.batches.split(",")], args.precisions.split(","),
            args.augments.split(",")):
        rows.append(measure(args.model, filters, args.size, batch, precision == "bf16", compile_mode,
                            args.steps, args.warmup if compile_mode == "off" else max(args.warmup, 3), device,
                            augment=augment))
        if not args.quiet:
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.procs > 1:
        batch = int(args.batches.split(",")[0])
        rows.append(concurrent(args, args.procs, batch, "bf16" in args.precisions.split(",")))
    result = {"machine": machine(device), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.json == "-":
        print(json.dumps(result))
        return rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(table(rows, f"Training throughput, {result['machine']}, {result['date']}"))
    return rows


if __name__ == "__main__":
    main()
