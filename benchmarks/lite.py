"""ResUNet++ against resunetpp-lite on this CPU, side by side in one run: cost, speed per backend, Dice, video.

A benchmark, not a test: it prints markdown tables (with the CPU and its flags) for benchmarks/RESULTS.md
and docs/models.md.

    python benchmarks/lite.py [--weights resunetpp-kvasir-seg,resunetpp-lite-kvasir-seg]
        [--data ../shared/data/Kvasir-SEG] [--dice-count 100] [--threads 2] [--runs 50]
        [--video-frames 150] [--train-speed] [--torch-only]
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/lite.py --torch-only   # an AVX2-only CPU, as PyTorch sees one

Per model: parameters, GFLOP at its input size (torch's FlopCounterMode, multiply-add = 2), batch-1
latency (median of `--runs`, preprocessed input, no pre/post-processing) and mean test Dice over the
first `--dice-count` ids of the committed Kvasir-SEG test split, for torch fp32, OpenVINO fp32 and bf16
(bf16 only where the CPU has avx512_bf16 or AMX), onnxruntime int8 and OpenVINO int8 (static QDQ,
calibrated on 64 training images). Then `resunetpp video` end to end (decode, model, overlay, H.264
encode) at 384x288 on a clip made of the test images, with the model's fastest backend of the table
whose Dice is within 0.005 of its fp32. `--torch-only`: PyTorch fp32 alone, for the table and `video` (OpenVINO
does not run under oneDNN's ISA limit, so this is how an AVX2-only CPU is stood in for here).
`--train-speed`: a training step's images/s (batch 8, bce+dice,
AdamW; the paper's augmentation) for each architecture.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from latency import (
    ROOT,
    _calibration,
    cpu_flags,
    cpu_model,
    dice_of,
    load_dice_set,
    openvino_runner,
    ort_runner,
    time_runner,
    torch_runner,
)
from torch.utils.flop_counter import FlopCounterMode

import resunetpp
from resunetpp.data import Augment
from resunetpp.hub import resolve_weights
from resunetpp.inference.export import export_onnx, quantize_int8
from resunetpp.inference.video import process_video
from resunetpp.networks.registry import count_parameters
from resunetpp.training.loop import training_step
from resunetpp.training.losses import get_loss


def gflop(name: str, kwargs: dict, size: tuple[int, int]) -> float:
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        resunetpp.create_model(name, **kwargs).eval()(torch.zeros(1, 3, *size))
    return counter.get_total_flops() / 1e9


def train_img_s(name: str, kwargs: dict, size: int, batch: int = 8, steps: int = 5) -> float:
    torch.manual_seed(0)
    model = resunetpp.create_model(name, **kwargs).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3, foreach=True)
    step = training_step(model, opt, get_loss("bce+dice"), Augment("paper"), {"mean": [0.0] * 3, "std": [1.0] * 3},
                         amp=False, channels_last=False)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    y = (torch.rand(batch, 1, size, size) > 0.5).to(torch.uint8)
    step(x, y)
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return batch * steps / (time.perf_counter() - t)


def make_clip(data: Path, path: Path, frames: int) -> Path:
    """An mp4v clip at 384x288, 25 fps, of the test images in turn (kept in a temporary folder only)."""
    ids = sorted(json.loads((ROOT / "src/resunetpp/splits/kvasir-seg.json").read_text())["test"])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (384, 288))
    for i in range(frames):
        img = cv2.imread(str(data / "images" / f"{ids[i % len(ids)]}.jpg"))
        writer.write(cv2.resize(img, (384, 288), interpolation=cv2.INTER_AREA))
    writer.release()
    return path


def torch_only_row(name: str, model, cfg: dict, size: tuple[int, int], args) -> str:
    """The table row of PyTorch fp32 alone: latency and Dice."""
    run = torch_runner(model)
    med, _ = time_runner(run, np.random.default_rng(0).random((1, 3, *size), dtype=np.float32), args.runs, 5)
    dice, _ = dice_of(run, load_dice_set(args.data, args.dice_count, size[0], cfg["normalization"]),
                      float(cfg["threshold"]))
    cost = f"{count_parameters(model):,} | {gflop(cfg['model'], cfg['model_kwargs'], size):.2f}"
    return f"| {name} | {cost} | torch fp32 | {med:.1f} | {1000 / med:.1f} | {dice:.4f} | +0.0000 |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="resunetpp-kvasir-seg,resunetpp-lite-kvasir-seg")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/Kvasir-SEG")
    ap.add_argument("--dice-count", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--video-frames", type=int, default=150)
    ap.add_argument("--train-speed", action="store_true")
    ap.add_argument("--torch-only", action="store_true", help="PyTorch fp32 only (e.g. under ONEDNN_MAX_CPU_ISA)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16"))
    work = Path(tempfile.mkdtemp(prefix="resunetpp-lite-bench-"))
    print(f"# {datetime.date.today()} | {cpu_model()} | {args.threads} threads | torch {torch.__version__}")
    print(f"# CPU flags: {cpu_flags()}")
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        print(f"# oneDNN limited to ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}")
    print(f"# Dice: mean over the first {args.dice_count} ids of the committed Kvasir-SEG test split, threshold "
          "0.5, no min-area; latency: batch 1, median, preprocessed input\n")
    rows, video_rows = [], []
    clip = make_clip(args.data, work / "clip.mp4", args.video_frames) if args.video_frames else None
    for name in args.weights.split(","):
        model = resunetpp.load_model(name)
        cfg = dict(model.pretrained_config)
        size = tuple(cfg["input_size"])
        folder = work / name
        shutil.copytree(resolve_weights(name), folder)
        if args.torch_only:
            rows.append(torch_only_row(name, model, cfg, size, args))
            print(rows[-1], flush=True)
            if clip:
                stats = process_video(resunetpp.Segmenter(name, backend="torch"), clip, work / f"{name}.mp4",
                                      progress=False)
                video_rows.append(f"| {name} | torch fp32 | {stats.frames} | {stats.processing_fps:.1f} | "
                                  f"{stats.mean_latency_ms:.1f} | {stats.codec} |")
            continue
        fp32 = export_onnx(model, folder / "model.onnx", exporter="legacy").path
        int8 = quantize_int8(fp32, folder / "model-int8.onnx", _calibration(args.data, 64, work, size[0]),
                             progress=False)
        runners = [("torch", "fp32", torch_runner(model)),
                   ("openvino", "fp32", openvino_runner(fp32, args.threads, "fp32")),
                   *([("openvino", "bf16", openvino_runner(fp32, args.threads, "bf16"))] if bf16 else []),
                   ("onnxruntime", "int8", ort_runner(int8, args.threads)),
                   ("openvino", "int8", openvino_runner(int8, args.threads, "fp32"))]
        dice_set = load_dice_set(args.data, args.dice_count, size[0], cfg["normalization"])
        x1 = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
        results = []
        for backend, prec, run in runners:
            med, _ = time_runner(run, x1, args.runs, 5)
            dice, _ = dice_of(run, dice_set, float(cfg["threshold"]))
            results.append((backend, prec, med, dice))
        ref = results[0][3]
        fast = min((r for r in results if r[0] == "openvino" and r[3] >= ref - 0.005), key=lambda r: r[2])
        cost = f"{count_parameters(model):,} | {gflop(cfg['model'], cfg['model_kwargs'], size):.2f}"
        for backend, prec, med, dice in results:
            rows.append(f"| {name} | {cost} | {backend} {prec} | {med:.1f} | {1000 / med:.1f} | {dice:.4f} | "
                        f"{dice - ref:+.4f} |")
        print("\n".join(rows[-len(results):]), flush=True)
        if clip:
            onnx = fp32 if fast[1] != "int8" else int8
            if onnx != folder / "model.onnx":
                shutil.copy(onnx, folder / "model.onnx")
            seg = resunetpp.Segmenter(folder, backend="openvino", precision="bf16" if fast[1] == "bf16" else "fp32",
                                      threads=args.threads)
            stats = process_video(seg, clip, work / f"{name}.mp4", progress=False)
            video_rows.append(f"| {name} | openvino {fast[1]} | {stats.frames} | {stats.processing_fps:.1f} | "
                              f"{stats.mean_latency_ms:.1f} | {stats.codec} |")
        if args.train_speed:
            video_rows.append(f"train {name}: {train_img_s(cfg['model'], cfg['model_kwargs'], size[0]):.1f} img/s")
    print("\n| model | parameters | GFLOP | backend | batch-1 ms | frames/s | test Dice | Δ Dice vs its torch fp32 |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    if video_rows:
        print("\n`resunetpp video` end to end at 384x288 (decode, model, overlay, encode):\n")
        print("| model | backend | frames | frames/s | mean model latency ms | codec |")
        print("| --- | --- | ---: | ---: | ---: | --- |")
        print("\n".join(r for r in video_rows if r.startswith("|")))
        print("\n".join(r for r in video_rows if not r.startswith("|")))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
