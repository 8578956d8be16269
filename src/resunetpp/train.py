"""Training: `train(TrainConfig(...)) -> run_dir`, in the style of nanoGPT's train.py.

All settings live in `TrainConfig`; `train()` reads top to bottom: data, model, optimiser, then one
loop over epochs (shuffle, augment, step; validate; checkpoint). Conventions:

- Paper recipe (the defaults): Adam, lr 1e-4, batch 16, 256x256, 120 epochs, `paper` augmentation,
  each model's default loss from the registry (`dice` for ResUNet++ and ResUNet-mod, `mse` for
  ResUNet, `bce` for U-Net), and SGDR: cosine annealing with warm restarts, stepped every batch,
  T_0 = ceil(total steps / 15) and T_mult = 2: four cycles of 1:2:4:8 units, the last one ending at (or, when
  15 does not divide the steps, just after) the last step, so it never restarts at the end (for 120 epochs:
  restarts after epochs 8, 24 and 56), annealing to 1% of the lr.
  `cosine` (one cycle), `onecycle` and `constant` are the alternatives, all stepped per batch.
- Data: `load_pairs` once into uint8 tensors on the device; per epoch a permutation seeded by
  (seed, epoch); batch slices; `Augment` on the batch (global RNG reseeded by (seed, epoch, rank) at
  each epoch start); `normalize`. No DataLoader workers: the whole set sits in memory.
- `--batch-size` is the global batch: under torchrun each of the N ranks takes batch/N images of its
  own disjoint shard of every epoch's permutation. Batch statistics are per rank (no SyncBatchNorm);
  DDP copies rank 0's running statistics to the others at each forward.
- Validation (rank 0): loss and the `resunetpp.metrics` at the threshold, mean over images. The best
  val Dice (mean over images) is kept as `model.safetensors` + `config.json` (`save_pretrained`).
- The run folder holds `train_config.yaml` (resolved settings), `split.json` (the ids used),
  `metrics.csv`, `tb/` (TensorBoard), `last.pt` (resumable state, written atomically each epoch and
  read back with `torch.load(weights_only=True)`: only tensors and plain types) and `curves.png`.
- A non-finite loss (checked every `check_every` steps without a per-step device sync) or non-finite
  weights stop the run with `NonFiniteError`; nothing of that epoch is written, so the last good
  checkpoint stays as it was.
- Devices: CUDA runs use bf16 autocast, channels_last and the fused Adam; CPU runs float32, the foreach
  Adam and deterministic algorithms, so the same seed gives bit-identical weights, also across a kill
  and `--resume`.
- Fixed shapes: each epoch drops its last partial batch (at most batch-1 images, a different few each
  epoch), so a compiled or graph-captured step never meets a new shape. `compile` picks
  `torch.compile` of the model ("default", or "reduce-overhead" for CUDA graphs) or eager ("off");
  "auto" (the default) compiles on CUDA when the run is long enough to repay the compilation, as
  measured on an H200 (benchmarks/RESULTS.md: 1.71x the eager img/s after a 47 s warm-up, which pays
  from about `COMPILE_PAYS_FROM` training images on), and never on a CPU.
- Speed: validation, `last.pt` and the logs come every `eval_every` epochs (and after the last one);
  the weights' finiteness is checked with one device sync per validation. `time_limit` (seconds) stops
  after the epoch at which another epoch would not fit, writing a resumable `last.pt`.
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm.auto import tqdm

from .hub import save_pretrained
from .losses import LOSSES, get_loss
from .metrics import METRIC_NAMES, confusion, summarize
from .preprocess import default_normalization, normalize
from .registry import create_model, model_info
from .utils import atomic_path

OPTIMIZERS = ("adam", "adamw", "nadam")
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")
COMPILE_PAYS_FROM = 60_000  # images: 47 s / (1/546 - 1/1084 s per image), H200, ResUNet++ at 256, rounded up
SCHEDULES = ("sgdr", "cosine", "constant", "onecycle")
AUGMENTS = ("paper", "light", "none")


@dataclass
class TrainConfig:
    model: str = "resunetpp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = ""                      # dataset folder or prepared cache
    split: str | None = None            # split JSON; None: the committed split of a known dataset, else a new one
    out: str = "runs/resunetpp"
    size: int = 256
    epochs: int = 120
    batch_size: int = 16                # global, over all ranks
    lr: float = 1e-4
    weight_decay: float | None = None   # None: 0.01 for adamw, 0 otherwise
    optimizer: str = "adam"
    loss: str | None = None             # None: the model's default loss
    schedule: str = "sgdr"
    augment: str = "paper"
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    amp: bool | None = None             # None: bf16 autocast on CUDA, off on CPU
    deterministic: bool | None = None   # None: on for CPU, off (cudnn.benchmark) for CUDA
    early_stop: int = 0                 # patience in epochs without a better val Dice; 0: off
    limit: int | None = None            # only the first N train / val / test ids
    skip_bad: bool = False              # train on the good pairs of a dataset that fails the check
    threshold: float = 0.5
    check_every: int = 50               # steps between non-finite-loss checks (each one is a device sync)
    eval_every: int = 1                 # epochs between validations (and last.pt); the last epoch always
    compile: str = "auto"               # auto | off | default | reduce-overhead (CUDA graphs) | max-autotune
    time_limit: float | None = None     # seconds: stop (resumably) before an epoch that would not fit
    sync_bn: bool = False               # SyncBatchNorm across DDP ranks (CUDA only): for small per-GPU batches
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """A copy with the None defaults filled in and every choice checked."""
        cfg = TrainConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        cfg.loss = cfg.loss or model_info(cfg.model).default_loss  # KeyError listing the models
        for name, value, choices in (("loss", cfg.loss, tuple(LOSSES)), ("optimizer", cfg.optimizer, OPTIMIZERS),
                                     ("schedule", cfg.schedule, SCHEDULES), ("augment", cfg.augment, AUGMENTS),
                                     ("compile", cfg.compile, COMPILE_MODES)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if cfg.weight_decay is None:
            cfg.weight_decay = 0.01 if cfg.optimizer == "adamw" else 0.0
        for name in ("size", "epochs", "batch_size", "check_every", "eval_every"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
        if not cfg.data:
            raise ValueError("no training data given (--data DIR_OR_CACHE)")
        return cfg


class CheckpointError(ValueError):
    """A `last.pt` that can't be resumed: damaged, or holding more than tensors and plain types."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A `last.pt` read with `torch.load(weights_only=True)`: tensors and plain types only, so a file
    holding other Python objects is refused without running any of it."""
    import pickle
    import zipfile

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors and plain types, so it "
                              "was not written by `resunetpp train` (loading it could run code). Nothing was loaded; "
                              "resume a run folder of your own, or start a new run.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({str(e).splitlines()[0][:120]}). The best model "
                              f"so far is still in {path.parent / 'model.safetensors'}; start a new run (another "
                              "--out) to train again.") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= set(ckpt):
        raise CheckpointError(f"{path}: not a resunetpp training checkpoint (no model/optimizer/scheduler/epoch)")
    return ckpt


class CheckpointWriteError(OSError):
    """The run's files could not be written (disk full, ...); the previous ones are intact."""


class NonFiniteError(RuntimeError):
    """The loss or the weights became NaN/inf; the run stopped before writing anything of that epoch."""


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """TrainConfig from a mapping (a YAML/TOML file's content), refusing unknown keys by name."""
    known = {f.name for f in fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return TrainConfig(**values)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a .yaml/.yml, .toml or .json file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                raise ValueError(f"{path}: TOML configs need Python 3.11+ (tomllib); use YAML instead") from None
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            import yaml  # JSON is YAML

            values = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"{path}: unknown config format {path.suffix!r}; use .yaml, .toml or .json")
    except (ValueError, TypeError) as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a valid config file ({e})") from None
    except Exception as e:  # yaml.YAMLError and friends
        raise ValueError(f"{path}: not a valid config file ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    return values


# ---------------------------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
    return device


def make_optimizer(cfg: TrainConfig, params, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """One fused kernel per step on CUDA (NAdam has no fused form: foreach), the foreach loop on CPU."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "nadam": torch.optim.NAdam}[cfg.optimizer]
    impl = {"fused": True} if torch.device(device).type == "cuda" and cfg.optimizer != "nadam" else {"foreach": True}
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **impl)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int):
    S = torch.optim.lr_scheduler
    if cfg.schedule == "sgdr":  # four cycles 1:2:4:8; ceil: a floor would restart for the last few steps
        return S.CosineAnnealingWarmRestarts(opt, T_0=math.ceil(total_steps / 15), T_mult=2, eta_min=cfg.lr * 0.01)
    if cfg.schedule == "cosine":
        return S.CosineAnnealingLR(opt, T_max=total_steps, eta_min=cfg.lr * 0.01)
    if cfg.schedule == "onecycle":
        return S.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps)
    return S.LambdaLR(opt, lambda step: 1.0)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain types, so `torch.load(weights_only=True)` reads it."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def dataset_name(data: str | os.PathLike) -> str:
    """"kvasir-seg", "cvc-clinicdb" (also for a prepared cache of them) or the folder's own name."""
    from .data.layouts import locate

    return locate(data).name


def resolve_split(cfg: TrainConfig, name: str) -> tuple[dict[str, Any] | None, str]:
    """(split, where it came from): --split FILE, else the committed split of a known dataset, else
    (None, "made"): the caller makes a seeded 80/10/10 split of the ids it finds."""
    from .data import default_split, load_split

    if cfg.split:
        return load_split(cfg.split), str(cfg.split)
    if name in ("kvasir-seg", "cvc-clinicdb"):
        return load_split(default_split(name)), f"committed {name} split"
    return None, f"made by make_split(seed={cfg.seed})"


def limit_split(split: dict[str, Any], limit: int | None) -> dict[str, Any]:
    if not limit:
        return dict(split)
    return {**split, **{k: list(split[k])[:limit] for k in ("train", "val", "test")}}


def normalization_on(device: torch.device) -> dict[str, torch.Tensor]:
    """default_normalization() as tensors on `device`: given lists, `normalize` would copy them to the
    GPU on every batch, and each such copy synchronises the device."""
    return {k: torch.tensor(v, device=device) for k, v in default_normalization().items()}


@torch.no_grad()
def validate(model, images, masks, cfg: TrainConfig, loss_fn, device, amp) -> dict[str, float]:
    """Validation loss and the metrics at the threshold (mean over images)."""
    model.eval()
    norm = normalization_on(device)
    losses, stats = [], []
    for i in range(0, len(images), cfg.batch_size):
        x = normalize(images[i:i + cfg.batch_size], **norm)
        y = masks[i:i + cfg.batch_size]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        losses.append(loss_fn(logits, y).detach() * len(x))  # stays on the device: one sync at the end
        stats.append(confusion(torch.sigmoid(logits.float()) > cfg.threshold, y.bool()))
    s = summarize(torch.cat(stats).cpu())["mean"]
    return {"val_loss": torch.stack(losses).sum().item() / len(images), **{f"val_{k}": s[k] for k in METRIC_NAMES}}


def training_step(model, opt, loss_fn, augment, norm: dict[str, torch.Tensor], amp: bool,
                  channels_last: bool, sched=None):
    """The one training step, for `train` and `benchmarks/train_speed.py`: uint8 batch in, loss (on the
    device, no sync) out. Augment, normalise, forward (bf16 autocast if `amp`), loss in float32, step."""
    def step(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        x, y = augment(images, masks)  # uint8 in, float [0, 1] / {0, 1} out
        x = normalize(x, **norm)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        return loss.detach()
    return step


def epoch_shard(train_idx: torch.Tensor, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's part of the epoch's permutation (seeded by seed and epoch, the same on every rank):
    disjoint, equal-length shards; the last len % world images of the permutation sit the epoch out."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = train_idx[torch.randperm(len(train_idx), generator=g).to(train_idx.device)]
    return perm[:len(perm) // world * world][rank::world]


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


def weights_finite(model: torch.nn.Module, ddp: bool = False) -> bool:
    """All parameters finite, with one device sync (one foreach norm: NaN/inf anywhere makes it non-finite).
    Under DDP the ranks agree on the verdict, so none of them waits on another that stopped."""
    params = [p.detach() for p in model.parameters()]
    ok = torch.isfinite(torch.stack(torch._foreach_norm(params)).sum()).float().reshape(1)
    if ddp:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


# ---------------------------------------------------------------------------------------------- training


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> Path:
    """Train a model; returns the run folder. `resume` continues the run in that folder from last.pt."""
    from .data import Augment, load_pairs, make_split, save_split

    cfg = cfg.resolved()
    out = Path(resume or cfg.out)
    if resume and not (out / "last.pt").is_file():
        raise FileNotFoundError(f"{out / 'last.pt'}: nothing to resume (no checkpoint in {out})")
    if not resume and (out / "last.pt").exists():
        raise FileExistsError(f"{out} already holds a run (last.pt); pass --resume {out} or choose another --out")

    # -- distributed (torchrun sets the env vars) and device
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        device, rank, world = resolve_device(cfg.device), 0, 1
    master = rank == 0
    cuda = device.type == "cuda"
    amp = cuda if cfg.amp is None else cfg.amp
    deterministic = (not cuda) if cfg.deterministic is None else cfg.deterministic
    if deterministic and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was_deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
    log = (lambda msg: tqdm.write(msg)) if master else (lambda msg: None)
    saved_epoch = 0

    try:
        if cfg.batch_size % world:
            raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = cuda and not deterministic
        # -- data: split ids, then the pairs as uint8 tensors on the device
        split, split_source = resolve_split(cfg, dataset_name(cfg.data))
        if split is not None:
            split = limit_split(split, cfg.limit)
        wanted = None if split is None else [*split["train"], *split["val"]]
        pairs = load_pairs(cfg.data, ids=wanted, size=cfg.size, skip_bad=cfg.skip_bad, progress=master)
        if split is None:  # an unknown dataset: a seeded 80/10/10 split of the good pairs
            split = limit_split({"dataset": pairs.name, "seed": cfg.seed, **make_split(pairs.ids, seed=cfg.seed)},
                                cfg.limit)
        index = {k: i for i, k in enumerate(pairs.ids)}
        skipped = [k for k in [*split["train"], *split["val"]] if k not in index]
        if skipped:
            log(f"--skip-bad: left out {len(skipped)} pair(s) that fail the check: {', '.join(map(str, skipped))}")
        split = {**split, **{part: [k for k in split[part] if k in index] for part in ("train", "val")}}
        if not split["train"] or not split["val"]:
            raise ValueError(f"{cfg.data}: the split leaves no training or no validation images")
        images = pairs.images.to(device)
        masks = pairs.masks.to(device)
        train_idx = torch.tensor([index[k] for k in split["train"]], device=device)
        val_idx = torch.tensor([index[k] for k in split["val"]], device=device)
        val_x, val_y = images[val_idx], masks[val_idx].float()
        augment = Augment(cfg.augment).to(device)
        norm = normalization_on(device)

        # -- model, loss, optimiser, schedule
        seed_all(cfg.seed)
        try:
            model = create_model(cfg.model, **cfg.model_kwargs).to(device)
        except TypeError as e:  # a misspelt model_kwargs key
            raise ValueError(f"model_kwargs {cfg.model_kwargs}: not options of {cfg.model} ({e})") from None
        if cfg.size % model.total_stride:
            raise ValueError(f"--size {cfg.size} is not a multiple of {cfg.model}'s total stride {model.total_stride}")
        if cfg.sync_bn:
            if not (ddp and cuda):
                raise ValueError("--sync-bn needs torchrun with several CUDA processes (torch's SyncBatchNorm runs "
                                 "on GPUs only; one process has nothing to synchronise)")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state_dict keys as BatchNorm2d
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        raw_model = model
        if ddp:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        loss_fn = get_loss(cfg.loss)
        opt = make_optimizer(cfg, raw_model.parameters(), device)
        shard_len = len(train_idx) // world
        if shard_len == 0:
            raise ValueError(f"{len(train_idx)} training image(s) cannot be shared by {world} processes")
        rank_batch = cfg.batch_size // world
        steps = shard_len // rank_batch  # the last partial batch is dropped: fixed shapes
        if steps == 0:
            raise ValueError(f"batch size {cfg.batch_size} is larger than the {len(train_idx)} training images")
        compile_mode = cfg.compile
        if compile_mode == "auto":
            compile_mode = "default" if cuda and cfg.epochs * steps * cfg.batch_size >= COMPILE_PAYS_FROM else "off"
        if compile_mode != "off":
            model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
        sched = make_scheduler(cfg, opt, cfg.epochs * steps)
        start_epoch, history, best = 0, [], {"epoch": 0, "dice": -1.0}
        if resume:
            ckpt = load_checkpoint(out / "last.pt")
            raw_model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt["best"]
            set_rng_state(ckpt["rng"])
            log(f"resuming {out} after epoch {start_epoch} (best val Dice {best['dice']:.4f} at epoch {best['epoch']})")

        # -- run folder (rank 0 writes everything)
        if master:
            import yaml

            out.mkdir(parents=True, exist_ok=True)
            settings = {**asdict(cfg), "out": str(out), "resolved_device": str(device), "amp": amp,
                        "deterministic": deterministic, "world_size": world, "dataset": pairs.name,
                        "steps_per_epoch": steps, "compiled": compile_mode}
            with atomic_path(out / "train_config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(settings, sort_keys=False))
            save_split(split, out / "split.json")
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tb"), purge_step=start_epoch + 1 if resume else None)
        checkpoint_config = {
            "model": cfg.model, "model_kwargs": cfg.model_kwargs, "input_size": [cfg.size, cfg.size],
            "normalization": default_normalization(), "threshold": cfg.threshold, "dataset": pairs.name,
            "split": {"file": "split.json", "source": split_source,
                      "seed": split.get("seed"), **{k: len(split[k]) for k in ("train", "val", "test")}},
            "training": {k: getattr(cfg, k) for k in ("loss", "optimizer", "lr", "batch_size", "schedule",
                                                      "augment", "seed", "epochs")},
        }
        step_fn = training_step(model, opt, loss_fn, augment, norm, amp, channels_last=cuda, sched=sched)
        bar = tqdm(total=cfg.epochs * steps, initial=start_epoch * steps, disable=not (master and cfg.progress),
                   unit="step", dynamic_ncols=True)

        # -- the loop
        run_start, elapsed_before = time.perf_counter(), (history[-1].get("elapsed", 0.0) if history else 0.0)
        saved_epoch = start_epoch
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            bar.set_description(f"epoch {epoch}/{cfg.epochs}")
            shard = epoch_shard(train_idx, cfg.seed, epoch, rank, world)
            seed_all(cfg.seed * 100_003 + epoch * 101 + rank)  # augmentation randomness, same after a resume
            model.train()
            step_losses = torch.zeros(steps, device=device)
            t0, seen = time.perf_counter(), 0
            for step in range(steps):
                idx = shard[step * rank_batch:(step + 1) * rank_batch]
                step_losses[step] = step_fn(images[idx], masks[idx])
                seen += len(idx) * world
                if (step + 1) % cfg.check_every == 0 or step + 1 == steps:
                    done = step_losses[:step + 1].clone()
                    if ddp:
                        dist.all_reduce(done)
                        done /= world
                    done = done.cpu()
                    if not torch.isfinite(done).all():
                        bad = int((~torch.isfinite(done)).nonzero()[0])
                        raise NonFiniteError(
                            f"non-finite loss ({done[bad].item()}) at epoch {epoch}, step {bad + 1}/{steps}: "
                            f"training stopped. The last good checkpoint in {out} (epoch {epoch - 1}) is intact; "
                            "try a lower --lr or another --loss.")
                    bar.update((epoch - 1) * steps + step + 1 - bar.n)
                    bar.set_postfix(loss=f"{done.mean():.4f}", val_dice=f"{history[-1]['val_dice']:.4f}"
                                    if history else "-", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
            train_seconds = time.perf_counter() - t0
            spent = time.perf_counter() - run_start
            next_end = spent + (time.perf_counter() - t0)  # after one more epoch like this one
            out_of_time = torch.tensor([float(cfg.time_limit is not None and epoch < cfg.epochs
                                              and next_end > cfg.time_limit)])
            if ddp:  # rank 0's clock decides, so every rank stops after the same epoch
                out_of_time = out_of_time.to(device)
                dist.broadcast(out_of_time, 0)
            out_of_time = bool(out_of_time.item())
            if not (epoch % cfg.eval_every == 0 or epoch == cfg.epochs or out_of_time):
                continue
            if not weights_finite(raw_model, ddp):
                raise NonFiniteError(f"non-finite weights after epoch {epoch}: training stopped. The last good "
                                     f"checkpoint in {out} is intact; try a lower --lr.")

            stop = torch.zeros(1, device=device)
            if master:
                row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": done.mean().item(),
                       **validate(raw_model, val_x, val_y, cfg, loss_fn, device, amp),
                       "seconds": round(time.perf_counter() - t0, 3),
                       "img_per_s": round(steps * cfg.batch_size / train_seconds, 2),
                       "elapsed": round(elapsed_before + time.perf_counter() - run_start, 3)}
                history.append(row)
                try:  # every file is written atomically: a failed write leaves the previous one whole
                    if row["val_dice"] > best["dice"]:
                        best = {"epoch": epoch, "dice": row["val_dice"]}
                        metrics = {k[4:]: v for k, v in row.items() if k.startswith("val_")}
                        save_pretrained(raw_model, out, {**checkpoint_config, "metrics": {"val": metrics},
                                                         "best_epoch": epoch})
                    with atomic_path(out / "last.pt") as tmp:
                        torch.save({"model": raw_model.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "epoch": epoch, "best": best,
                                    "history": history, "rng": rng_state(), "config": asdict(cfg)}, tmp)
                    write_metrics_csv(out / "metrics.csv", history)
                except (OSError, RuntimeError, SafetensorError) as e:
                    raise CheckpointWriteError(
                        f"{out}: could not write the checkpoint of epoch {epoch} ({str(e).splitlines()[0][:160]}). "
                        f"The files of epoch {saved_epoch or 'none'} are intact; free some space, then continue "
                        f"with: resunetpp train --resume {out}") from None
                saved_epoch = epoch
                for k, v in row.items():
                    if k != "epoch":
                        tb.add_scalar(k.replace("val_", "val/").replace("train_", "train/"), v, epoch)
                tb.flush()
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_dice=f"{row['val_dice']:.4f}",
                                img_s=f"{row['img_per_s']:.1f}")
                if out_of_time:
                    log(f"time limit: stopped after epoch {epoch} of {cfg.epochs} ({cfg.time_limit:g} s); "
                        f"continue with: resunetpp train --resume {out}")
                    stop += 1
                elif cfg.early_stop and epoch - best["epoch"] >= cfg.early_stop:
                    log(f"early stop: no better val Dice for {cfg.early_stop} epochs (best {best['dice']:.4f} "
                        f"at epoch {best['epoch']})")
                    stop += 1
            if ddp:
                dist.broadcast(stop, 0)  # also keeps the ranks in step while rank 0 validates
            if stop.item():
                break
        bar.close()
        if master:
            tb.close()
            if history:
                from .figures import plot_curves

                plot_curves(history, out / "curves.png")
            log(f"done: best val Dice {best['dice']:.4f} at epoch {best['epoch']}; model in {out}")
        return out
    except KeyboardInterrupt:
        if master:
            where = (f"the last checkpoint is {out / 'last.pt'} (epoch {saved_epoch}); continue with: "
                     f"resunetpp train --resume {out}") if saved_epoch else "no epoch was checkpointed yet"
            log(f"interrupted: {where}")
        raise
    finally:
        torch.use_deterministic_algorithms(was_deterministic[0], warn_only=was_deterministic[1])
        if ddp and dist.is_initialized():
            dist.destroy_process_group()
