"""The GPU campaign in one command: smoke test, speed tables, the paper's Tables I and II, a recipe beyond
the paper, packed into a few files. Started by `benchmarks/device_run.sh` (which installs what a bare
GPU machine lacks); see the README's "Running on a GPU" for how to use it on any machine.

    python benchmarks/device_run.py --data-root DATA --out OUT [--budget 540] [--dry-run]

Stages, each writing its results as soon as it ends, all stopping cleanly before `--budget` seconds:

0. smoke (stops everything if it fails): 20 training steps + 1 validation + test evaluation; the
   training-speed table (`train_speed.py`: eager, batch 16 and 64, fp32 and bf16, and N processes at
   once); a CUDA kernel profile of 5 steps; inference latency (`latency.py`: batch 1 eager and CUDA
   graph, bulk).
1-4. trainings, in this priority order, on a pool of worker processes sharing the GPU (the pool's size
   comes from the measured speed-up of concurrent processes): ResUNet++ on Kvasir-SEG and on
   CVC-ClinicDB with the paper's recipe, then on CVC-ClinicDB's sequence-grouped split, the "beyond the
   paper" ResUNet++ on Kvasir-SEG, the "fast" one (45 s of training), then the baselines of Table I, of
   Table II and of Table II's grouped split, the lite models, then issue 23's "strong" recipe (`STRONG_CONFIG`:
   Kvasir-SEG's committed and official splits, CVC-ClinicDB by sequence, and a recipe search that turns
   one switch at a time off, compared on val only) (`JOBS`). Each gets the time left (`--time-limit`),
   stops resumably, and is evaluated on its test split. The strong jobs read 352x352 caches
   (`device_run.sh --fetch-data SRC 352`), the others 256x256 ones: both sets do not fit one transfer,
   so a slot runs one kind (`--jobs`).
5. tables: `reproduce(train_runs=False)` tabulates what finished (table.md, results.json, fig3.png).

`--jobs` picks trainings (in the order given), `--trainings-only` leaves stage 0 out (a later slot, once
an earlier one measured it), `--beyond-seconds` caps the beyond recipe so the jobs after it get time.

Outputs in `--out` (at most 8 files, 16 MiB each, at most two folders deep): `device_run.log`,
`summary.md`, `results.tar.gz` (everything but weights and optimiser states, so each run's
`config.json` too) and the trained ResUNet++ weights as fp16 safetensors (`<run>.safetensors`).
`--dry-run` runs every stage on the CPU at 32x32 on a few ids for 2 epochs, with the same outputs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TABLE_DATA = {"table1": "kvasir-seg", "table2": "cvc-clinicdb"}
# (job name, kind, table, model): the priority order of the trainings. "paper": the paper's recipe on the
# committed random split; "by-sequence": the same on CVC-ClinicDB's sequence-grouped split (a job of its own,
# so that each training gets the whole time it is given)
JOBS = [("table1-resunetpp", "paper", "table1", "resunetpp"), ("table2-resunetpp", "paper", "table2", "resunetpp"),
        ("table2-resunetpp-by-sequence", "by-sequence", "table2", "resunetpp"),
        ("beyond-kvasir", "beyond", "table1", "resunetpp"), ("fast-kvasir", "fast", "table1", "resunetpp"),
        ("table1-unet", "paper", "table1", "unet"), ("table1-resunet-mod", "paper", "table1", "resunet-mod"),
        ("table1-resunet", "paper", "table1", "resunet"),
        ("table2-unet", "paper", "table2", "unet"), ("table2-resunet-mod", "paper", "table2", "resunet-mod"),
        ("table2-resunet", "paper", "table2", "resunet"),
        ("table2-unet-by-sequence", "by-sequence", "table2", "unet"),
        ("table2-resunet-mod-by-sequence", "by-sequence", "table2", "resunet-mod"),
        ("table2-resunet-by-sequence", "by-sequence", "table2", "resunet"),
        ("lite-kvasir", "lite", "table1", "resunetpp-lite"), ("lite-cvc-clinicdb", "lite", "table2", "resunetpp-lite")]
# issue 23's strong recipe (STRONG_CONFIG below) on Kvasir-SEG's committed and official splits and CVC-ClinicDB by video
# sequence, then a recipe search on the committed split, compared on its val: one switch changed each
STRONG_JOBS = {"strong-kvasir": ("table1", {}), "strong-kvasir-official": ("table1", {"split": "official"}),
               "strong-cvc-by-sequence": ("table2", {"split": "grouped"}),
               "search-kvasir-bce-dice": ("table1", {"loss": "bce+dice"}),
               "search-kvasir-paper-augment": ("table1", {"augment": "paper"}),
               "search-kvasir-single-scale": ("table1", {"multi_scale": False}),
               "search-kvasir-no-ema": ("table1", {"ema": 0.0}),
               # the general model: both training parts (Kvasir-SEG's committed split, CVC-ClinicDB by sequence)
               "strong-polyp": ("both", {"split": ":grouped"})}
JOBS += [(name, "strong", table, "resunetpp") for name, (table, _) in STRONG_JOBS.items()]
# "Beyond the paper": the same network from scratch, a stronger recipe (bce+dice, AdamW 1e-3 with a
# one-cycle schedule, longer); epochs fitted to the measured speed so the schedule ends inside the slot.
BEYOND = {"loss": "bce+dice", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "onecycle",
          "augment": "paper", "batch_size": 16, "eval_every": 2}
# "Fast": the goal of test Dice >= 0.8133 (the paper's) within 45 s of training: a short one-cycle schedule,
# eager (compiling alone took 47-70 s), light augmentation, stopped at 45 s whatever it reached. Batch 16:
# at batch 32 the first epoch's warm-up took 21 s on the H100, against 5-8 s at batch 16; 18 epochs of 800
# images at the H100's eager 432 img/s (33 s) leave the rest for it and the validations, so that the
# one-cycle schedule ends before the limit cuts it
FAST = {**BEYOND, "lr": 2e-3, "augment": "light", "batch_size": 16, "epochs": 18, "eval_every": 6, "compile": "off"}
FAST_SECONDS = 45
# "Lite": resunetpp-lite distilled from the bundled ResUNet++ of its dataset (issue 28), the CPU recipe of
# configs/lite-*.yaml with the longer schedule a GPU affords (the CPU runs had 40-50 epochs)
LITE = {"loss": "bce+dice", "optimizer": "adamw", "lr": 3e-3, "schedule": "onecycle", "augment": "paper",
        "batch_size": 16, "epochs": 200, "eval_every": 2, "distill_weight": 0.5}
TEACHERS = {"table1": "resunetpp-kvasir-seg", "table2": "resunetpp-cvc-clinicdb"}
# "Strong" (issue 23): configs/strong-kvasir.yaml's recipe (its data, out and epochs replaced: epochs fit the
# slot). It reads 352x352 caches (`--fetch-data SRC 352`).
STRONG_CONFIG = ROOT / "configs" / "strong-kvasir.yaml"
# training images per epoch: Kvasir-SEG's committed split (the official one has 792), CVC-ClinicDB by sequence, both
TRAIN_IMAGES = {"table1": 800, "table2": 490, "both": 1290}
# a 352x352 multi-scale step (sizes 272, 352, 448) against a 256x256 one, in pixels: what fits the slot
STRONG_COST = sum(s * s for s in (272, 352, 448)) / 3 / 256**2
DRY = {"size": 32, "epochs": 2, "limit": 8, "batch_size": 4}
# eager bf16 img/s of one process at batch 16 on the slower card lent (H100: 432; H200: 546; benchmarks/
# RESULTS.md), for fitting the beyond recipe's epochs when `--trainings-only` leaves stage 0 out
EAGER_IMG_S = 432
# paper-recipe baselines compiled although `--compile auto` leaves batch 16 eager: on the H100 ResUNet and
# ResUNet-mod trained at 632/629 img/s compiled against 406/405 eager, after 8 and 40 s of compiling, which
# 120 epochs repay (U-Net: 1,234 against 920 after 25 s, about even; ResUNet++: 561 against 432 after 60 s)
COMPILED = ("resunet", "resunet-mod")
# brought back as fp16 safetensors
WEIGHTS = ("strong-polyp", "strong-kvasir", "strong-kvasir-official", "strong-cvc-by-sequence", "table1-resunetpp",
           "table2-resunetpp", "table2-resunetpp-by-sequence", "beyond-kvasir", "lite-kvasir", "lite-cvc-clinicdb")
MAX_FILES = 8  # what comes back from the GPU machine: the log, summary.md, results.tar.gz and at most 5 weights


class Log:
    def __init__(self, path: Path, start: float):
        self.f, self.start = open(path, "a", buffering=1), start

    def __call__(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f} s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")


def job_run(work: Path, name: str) -> Path:
    """The run folder a job trains into (where `reproduce` puts it for the tables' jobs)."""
    _, kind, table, model = next(j for j in JOBS if j[0] == name)
    return {"beyond": work / name, "fast": work / name, "lite": work / name, "strong": work / name,
            "paper": work / table / model, "by-sequence": work / table / "by-sequence" / model}[kind]


def strong_recipe(name: str) -> dict:
    """The settings of a strong job: configs/strong-kvasir.yaml's recipe (less model, data, out and epochs, which
    the job sets) with the job's one change."""
    from resunetpp.training.config import read_config_file

    recipe = {k: v for k, v in read_config_file(STRONG_CONFIG).items() if k not in ("model", "data", "out", "epochs")}
    return {**recipe, **STRONG_JOBS[name][1]}


def data_dir(root: Path, table: str, size: int = 256) -> Path:
    """The dataset folder or prepared cache for a table under `root`: <root>/<name>-<size>, <root>/<name> or the
    shared layout."""
    name = TABLE_DATA[table]
    for cand in (root / f"{name}-{size}", root / name, root / {"kvasir-seg": "Kvasir-SEG",
                                                               "cvc-clinicdb": "CVC-ClinicDB"}[name]):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"{root}: no {name} data (expected {name}-{size}/ from `bash benchmarks/device_run.sh "
                            f"--fetch-data SRC {size}`, or the dataset folder)")


# ------------------------------------------------------------------------------------------- one job


def run_job(args: argparse.Namespace) -> None:
    """Worker process: one training (+ evaluation) with the time it is given."""
    import torch

    from resunetpp.evaluation.evaluator import evaluate
    from resunetpp.training.loop import TrainConfig, train
    from resunetpp.training.reproduce import reproduce

    name, kind, table, model = next(j for j in JOBS if j[0] == args.job)
    if args.dry_run:
        torch.set_num_threads(1)
    if kind == "strong":
        return run_strong_job(args, name, table, model)
    data = data_dir(args.data_root, table)
    work = args.work
    common = {"device": "cpu" if args.dry_run else "cuda", "progress": False}
    size = DRY if args.dry_run else {}
    if kind in ("paper", "by-sequence"):
        reproduce(table, data=data, out=work / table, models=(model,), time_limit=args.time_limit,
                  overrides={"eval_every": 1 if args.dry_run else 2,
                             **({"compile": "default"} if model in COMPILED and not args.dry_run else {})},
                  command=f"device_run.py job {name}",
                  random_split=kind == "paper", grouped=kind == "by-sequence", **size, **common)
        return
    recipe = {"beyond": BEYOND, "lite": LITE, "fast": FAST}[kind]
    time_limit = min(args.time_limit, FAST_SECONDS) if kind == "fast" else args.time_limit
    epochs = 2 if args.dry_run else args.epochs if kind == "beyond" else recipe["epochs"]
    teacher = {"teacher": TEACHERS[table]} if kind == "lite" else {}
    cfg = TrainConfig(model=model, data=str(data), out=str(work / name), time_limit=time_limit,
                      **{**recipe, **size, "epochs": epochs}, **teacher, **common)
    run = work / name
    train(cfg, resume=run if (run / "last.pt").is_file() else None)
    evaluate(run, data, split="test", out=run / "eval", device=common["device"], limit=size.get("limit"),
             progress=False)


def run_strong_job(args: argparse.Namespace, name: str, table: str, model: str) -> None:
    """A strong job: its recipe on 352x352 caches (one dataset, or both for the general model), evaluated on
    each dataset's test part (CVC-ClinicDB's by video sequence when the job trained on that split)."""
    from resunetpp.data.layouts import dataset_name
    from resunetpp.evaluation.evaluator import evaluate
    from resunetpp.training.loop import DATA_SEPARATOR, TrainConfig, train

    recipe = strong_recipe(name)
    size = DRY if args.dry_run else {"size": recipe["size"]}
    folders = [data_dir(args.data_root, t, size["size"]) for t in (("table1", "table2") if table == "both"
                                                                    else (table,))]
    device = "cpu" if args.dry_run else "cuda"
    cfg = TrainConfig(model=model, data=DATA_SEPARATOR.join(map(str, folders)), out=str(args.work / name),
                      time_limit=args.time_limit, **{**recipe, **size, "epochs": 2 if args.dry_run else args.epochs},
                      device=device, progress=False)
    run = args.work / name
    train(cfg, resume=run if (run / "last.pt").is_file() else None)
    entries = (cfg.split or "").split(DATA_SEPARATOR)
    for folder, split in zip(folders, entries * len(folders) if len(entries) == 1 else entries):
        out = run / ("eval" if len(folders) == 1 else f"eval-{dataset_name(folder)}")
        evaluate(run, folder, split=split or "test", out=out, device=device, limit=size.get("limit"), progress=False)


# ------------------------------------------------------------------------------------------- stages


def smoke(args, log: Log, stage_dir: Path) -> dict:
    """20 steps + validation + evaluation on the device; raises on any failure."""
    from resunetpp.evaluation.evaluator import evaluate
    from resunetpp.training.loop import TrainConfig, train

    data = data_dir(args.data_root, "table1")
    device = "cpu" if args.dry_run else "cuda"
    # 20 steps of batch 16 = the first 320 train ids (dry: 2 of batch 4)
    cfg = TrainConfig(data=str(data), out=str(stage_dir / "smoke-run"), device=device, progress=False,
                      **({**DRY, "epochs": 1} if args.dry_run else {"limit": 320, "epochs": 1}))
    t0 = time.perf_counter()
    run = train(cfg)
    ev = evaluate(run, data, split="test", out=run / "eval", device=device, limit=cfg.limit, progress=False)
    took = time.perf_counter() - t0
    log(f"smoke: trained and evaluated in {took:.1f} s; test Dice {ev.summary['mean']['dice']:.4f}")
    return {"seconds": round(took, 1), "test_dice": ev.summary["mean"]["dice"]}


def speed(args, log: Log, stage_dir: Path) -> int:
    """The training-speed table; returns the worker-pool size the concurrent row supports."""
    out = stage_dir / "train_speed.json"
    cmd = [sys.executable, str(BENCH / "train_speed.py"), "--compile", "off", "--json", str(out), "--quiet"]
    if args.dry_run:
        cmd += ["--device", "cpu", "--size", "32", "--filters", "4,8,16,32,64", "--batches", "4", "--steps", "2",
                "--warmup", "1", "--precisions", "fp32", "--procs", "2"]
    else:
        cmd += ["--device", "cuda", "--steps", "30", "--warmup", "5", "--procs", str(args.max_workers)]
    table = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    (stage_dir / "train_speed.md").write_text(table)
    log("training speed:\n" + table)
    rows = json.loads(out.read_text())["rows"]
    single = next(r for r in rows if r["compile"] == "off" and r["batch"] == rows[-1]["batch"]
                  and r["precision"] == rows[-1]["precision"])["img_per_s"]
    together = rows[-1]["img_per_s"]
    n = int(rows[-1]["compile"].split(", ")[1].split()[0])
    # more workers only when they add throughput: each must keep at least 60% of a lone process's speed
    workers = n if together >= 0.6 * n * single else max(1, min(n, int(together / (0.6 * single))))
    log(f"{n} processes at once: {together:.0f} img/s against {single:.0f} alone: {workers} worker(s)")
    args.per_worker_img_s = together / n if workers > 1 else single  # n at once is the pessimistic case
    return workers


def profile(args, log: Log, stage_dir: Path) -> None:
    """Top CUDA kernels of 5 training steps (batch 16, bf16): where the time goes."""
    if args.dry_run:
        return
    import torch
    from torch.profiler import ProfilerActivity

    sys.path.insert(0, str(BENCH))
    from train_speed import measure

    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        measure("resunetpp", None, 256, 16, True, "off", steps=5, warmup=0, device=torch.device("cuda"))
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    (stage_dir / "profile.txt").write_text(text)
    log("profile (top 12 by CUDA time):\n" + "\n".join(text.splitlines()[:15]))


def latency(args, log: Log, stage_dir: Path) -> None:
    cmd = [sys.executable, str(BENCH / "latency.py"), "--only", "torch" if args.dry_run else "cuda",
           "--runs", "3" if args.dry_run else "200", "--size", "32" if args.dry_run else "256"]
    if args.dry_run:
        cmd += ["--bulk-runs", "1", "--warmup", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    (stage_dir / "latency.md").write_text(res.stdout + res.stderr[-4000:])
    log("latency:\n" + res.stdout[-3000:])


def trainings(args, log: Log, deadline: float, workers: int) -> list[dict]:
    """The jobs in priority order on `workers` processes, each with the time left before `deadline`."""
    queue, running, done = job_queue(args.jobs), {}, []
    while queue or running:
        left = deadline - time.perf_counter()
        while queue and len(running) < workers and left > args.min_job_seconds:
            name = queue.pop(0)[0]
            limit = left - args.eval_reserve
            if name == "beyond-kvasir" and args.beyond_seconds:
                limit = min(limit, args.beyond_seconds)
            cost = STRONG_COST if name in STRONG_JOBS else 1.0
            images = TRAIN_IMAGES[STRONG_JOBS[name][0]] if name in STRONG_JOBS else 800
            cmd = [sys.executable, __file__, "--job", name, "--data-root", str(args.data_root), "--work",
                   str(args.work), "--time-limit", f"{limit:.0f}",
                   "--epochs", str(beyond_epochs(args, limit, cost, images))]
            if args.dry_run:
                cmd.append("--dry-run")
            logf = open(args.work / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), time.perf_counter(), logf)
            log(f"started {name} with {limit:.0f} s of training time")
        if queue and left <= args.min_job_seconds:
            log(f"not started (no time left): {', '.join(j[0] for j in queue)}")
            queue = []
        for name, (proc, t0, logf) in list(running.items()):
            if proc.poll() is None and time.perf_counter() > deadline:
                proc.terminate()  # past the budget: its last checkpoint stays; it can be resumed
                log(f"{name}: stopped at the budget")
            if proc.poll() is not None:
                logf.close()
                secs = time.perf_counter() - t0
                done.append({"job": name, "returncode": proc.returncode, "seconds": round(secs, 1)})
                tail = (args.work / f"{name}.log").read_text().strip().splitlines()[-1:] or [""]
                log(f"{name}: {'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'} in {secs:.0f} s: "
                    f"{tail[0][:200]}")
                del running[name]
        time.sleep(0.2 if args.dry_run else 1.0)
    return done


def trainings_only_pool(workers: int | None) -> tuple[int, float]:
    """(processes, img/s each) without stage 0's measurement: `--workers` processes (default 1) sharing the
    measured eager rate of one, so each one's schedule is fitted to end inside the slot."""
    n = workers or 1
    return n, EAGER_IMG_S / n


def job_queue(names: str | None) -> list[tuple]:
    """The `JOBS` named in `names` (comma-separated) in that order; all of them when None."""
    if not names:
        return list(JOBS)
    known = {j[0]: j for j in JOBS}
    unknown = [n for n in names.split(",") if n not in known]
    if unknown:
        raise SystemExit(f"--jobs: unknown {', '.join(unknown)}; the jobs are {', '.join(known)}")
    return [known[n] for n in names.split(",")]


def beyond_epochs(args, seconds: float, cost: float = 1.0, images: int = 800) -> int:
    """Epochs of the beyond (or strong) recipe that fit `seconds` of training at the measured per-worker speed
    (its schedule must end inside the slot to pay off), between 40 and 300; `cost`: an image's time against a
    256x256 one; `images`: the training images of an epoch."""
    per_epoch = images * cost / max(getattr(args, "per_worker_img_s", 0) or 1, 1) * 1.15  # + validation, slack
    return int(min(300, max(40, seconds / per_epoch)))


def tables(args, log: Log) -> None:
    from resunetpp.training.reproduce import MODELS, reproduce

    for table in ("table1", "table2"):
        if not (args.work / table).is_dir():
            continue
        try:
            reproduce(table, data=data_dir(args.data_root, table), out=args.work / table, models=MODELS,
                      train_runs=False, device="cpu" if args.dry_run else "cuda", progress=False,
                      command="bash benchmarks/device_run.sh" + (" --dry-run" if args.dry_run else ""),
                      **(DRY if args.dry_run else {}))
            log(f"{table}:\n" + (args.work / table / "table.md").read_text())
        except Exception as e:  # one table's failure must not lose the other's
            log(f"{table}: could not tabulate: {e}")


# ------------------------------------------------------------------------------------------- packing


def pack(args, log: Log) -> None:
    """results.tar.gz (no weights, no optimiser states, no TensorBoard) + fp16 weights of the ResUNet++ runs."""
    from safetensors.torch import load_file, save_file

    keep = lambda p: p.is_file() and p.suffix not in (".pt", ".safetensors") and "tb" not in p.parts  # noqa: E731
    with tarfile.open(args.out / "results.tar.gz", "w:gz") as tar:
        for p in sorted(args.work.rglob("*")):
            if keep(p):
                tar.add(p, arcname=str(p.relative_to(args.work)))
    room = MAX_FILES - len(list(args.out.iterdir()))
    for name in WEIGHTS:
        run = job_run(args.work, name)
        if (run / "model.safetensors").is_file():
            if room == 0:
                log(f"{name}: its weights stay behind (at most {MAX_FILES} files come back)")
                continue
            room -= 1
            state = load_file(run / "model.safetensors")
            tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
            save_file(tensors, args.out / f"{name}.safetensors")  # its config.json is in results.tar.gz
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(args.out.iterdir()))
    log(f"packed: {sizes}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=540, help="seconds for everything (default 540)")
    ap.add_argument("--out", type=Path, default=Path("device-out"))
    ap.add_argument("--data-root", type=Path, help="prepared caches or dataset folders (default .devdata/; "
                    "with --dry-run ../shared/data, since a 256x256 cache can't be read at 32x32)")
    ap.add_argument("--work", type=Path, help="working folder (default: OUT/../device-work)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--max-workers", type=int, default=3)
    ap.add_argument("--jobs", help="comma-separated trainings to run, in that order (default: all, in priority order)")
    ap.add_argument("--min-job-seconds", type=float, default=45)
    ap.add_argument("--trainings-only", action="store_true",
                    help="leave out stage 0 (smoke, speed table, profile, latency): --workers processes")
    ap.add_argument("--workers", type=int, help="with --trainings-only: trainings at once on the GPU (default 1), "
                    "each given the whole time left")
    ap.add_argument("--beyond-seconds", type=float, help="training seconds for the beyond recipe (default: all left)")
    ap.add_argument("--eval-reserve", type=float, default=35, help="seconds kept for evaluation and packing")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--time-limit", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=120, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    job_queue(args.jobs)  # a misspelt job stops here, before any GPU time is spent
    args.data_root = args.data_root or (ROOT.parent / "shared" / "data" if args.dry_run else ROOT / ".devdata")
    if args.job:
        run_job(args)
        return 0

    start = time.perf_counter()
    deadline = start + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out.parent / "device-work"
    args.work.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "device_run.log", start)
    stage_dir = args.work / "stage0"
    stage_dir.mkdir(exist_ok=True)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget, "dry_run": args.dry_run,
               "command": " ".join(sys.argv), "stages": {}}
    try:
        import torch

        summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        summary["torch"] = torch.__version__
        log(f"device {summary['device']}, torch {torch.__version__}, budget {args.budget:.0f} s, out {args.out}")
        if not args.dry_run and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: run with --dry-run on a CPU")
        t = time.perf_counter()
        if args.trainings_only:  # stage 0 ran in an earlier slot: its time goes to the trainings
            workers, args.per_worker_img_s = trainings_only_pool(args.workers)
        else:
            summary["stages"]["smoke"] = smoke(args, log, stage_dir)
            workers = speed(args, log, stage_dir)
            profile(args, log, stage_dir)
            latency(args, log, stage_dir)
        summary["stages"]["stage0_seconds"] = round(time.perf_counter() - t, 1)
    except Exception:
        log("SMOKE FAILED, nothing else runs:\n" + traceback.format_exc())
        summary["stages"]["smoke"] = "failed"
        _finish(args, log, summary)
        return 1
    t = time.perf_counter()
    summary["workers"] = workers
    summary["stages"]["trainings"] = trainings(args, log, deadline - args.eval_reserve / 2, workers)
    summary["stages"]["trainings_seconds"] = round(time.perf_counter() - t, 1)
    tables(args, log)
    _finish(args, log, summary)
    return 0


def _finish(args, log: Log, summary: dict) -> None:
    summary["wall_s"] = round(time.perf_counter() - log.start, 1)
    (args.work / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# device run {summary['date']}", "", f"device: {summary.get('device')}, torch {summary.get('torch')}, "
             f"wall {summary['wall_s']} s of a {summary['budget_s']:.0f} s budget", ""]
    for table in ("table1", "table2"):
        if (args.work / table / "table.md").is_file():
            lines += [(args.work / table / "table.md").read_text(), ""]
    if (args.work / "stage0" / "train_speed.md").is_file():
        lines += [(args.work / "stage0" / "train_speed.md").read_text(), ""]
    lines += ["```json", json.dumps(summary["stages"], indent=1), "```"]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    try:
        pack(args, log)
    except Exception:
        log("packing failed:\n" + traceback.format_exc())
    log(f"done in {summary['wall_s']} s")


if __name__ == "__main__":
    sys.exit(main())
