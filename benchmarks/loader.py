"""Loader + augmentation throughput: augmented pairs/s per preset on one device.

The data path under test is the one training uses: the prepared dataset held as uint8 tensors on the
device (`load_pairs(...).to(device)`), each batch an index into those tensors and one `Augment`
call, as training does. On the CPU the table also times one ResUNet++ forward+backward step on a
batch of the same size, so the
ratio says how much of a training step the data path costs.

    python benchmarks/loader.py                                # synthetic 256x256 pairs, CPU
    python benchmarks/loader.py --data CACHE --batch 16        # a cache from `resunetpp data prepare`
    python benchmarks/loader.py --device cuda --batch 256      # GPU (target: > 10,000 pairs/s on an H100)
"""

from __future__ import annotations

import argparse
import time

import torch

from resunetpp.data import Augment, load_pairs
from resunetpp.data.pairs import Pairs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(n: int, size: int) -> Pairs:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.randint(size // 4, 3 * size // 4, (n, 2), generator=g)
    masks = (((yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2) < (size // 6) ** 2)
    return Pairs(images, masks[:, None].to(torch.uint8), [str(i) for i in range(n)], "synthetic")


def time_preset(pairs: Pairs, preset: str, batch: int, batches: int, device: torch.device) -> float:
    """Seconds per batch (after one warm-up batch): what training does, an index into the uint8 tensors on
    the device and one `Augment` call."""
    aug = Augment(preset).to(device)
    order = torch.randint(0, len(pairs), (batches + 1, batch), device=device)
    aug(pairs.images[order[0]], pairs.masks[order[0]])
    sync(device)
    t0 = time.perf_counter()
    for idx in order[1:]:
        aug(pairs.images[idx], pairs.masks[idx])
    sync(device)
    return (time.perf_counter() - t0) / batches


def time_train_step(batch: int, size: int, device: torch.device) -> float:
    """Seconds for one ResUNet++ forward + backward + Adam step on a (batch, 3, size, size) batch."""
    from resunetpp import create_model

    torch.manual_seed(0)
    model = create_model("resunetpp").to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.rand(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()

    def step(xb, yb):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
        loss.backward()
        opt.step()

    step(x[:1], y[:1])  # warm-up (allocations, kernel choice)
    sync(device)
    t0 = time.perf_counter()
    step(x, y)
    sync(device)
    return time.perf_counter() - t0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=10, help="timed batches per preset")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--data", default=None, help="dataset folder or prepared cache (default: synthetic pairs)")
    ap.add_argument("--pairs", type=int, default=128, help="synthetic pairs held in memory")
    ap.add_argument("--no-train-step", action="store_true", help="skip timing the ResUNet++ training step")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    rows = []
    if args.data:
        t0 = time.perf_counter()
        pairs = load_pairs(args.data, size=args.size, progress=False)
        dt = time.perf_counter() - t0
        rows.append(("load_pairs (decode into RAM)", "cpu", f"{len(pairs) / dt:,.0f}", f"{dt:.2f} s total", ""))
    else:
        pairs = synthetic(args.pairs, args.size)
    pairs = pairs.to(device)

    results = {}
    for preset in ("none", "light", "paper"):
        per_batch = time_preset(pairs, preset, args.batch, args.batches, device)
        results[preset] = per_batch
        rows.append((f"batches + Augment('{preset}')", str(device), f"{args.batch / per_batch:,.0f}",
                     f"{per_batch * 1e3:.1f} ms/batch", ""))
    if device.type == "cpu" and not args.no_train_step:
        step = time_train_step(args.batch, args.size, device)
        rows.append(("ResUNet++ train step (fwd+bwd+Adam)", str(device), f"{args.batch / step:,.2f}",
                     f"{step:.2f} s/batch ({step / args.batch:.2f} s/image)",
                     f"{step / results['paper']:,.0f}x the paper loader"))

    print(f"\nbatch {args.batch} at {args.size}x{args.size}, {len(pairs)} pairs in memory ({pairs.name}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    head = ("what", "device", "pairs/s", "time", "ratio")
    widths = [max(len(str(r[k])) for r in [head, *rows]) for k in range(5)]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
