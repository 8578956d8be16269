"""Training: `train(TrainConfig(...)) -> run_dir`, in the style of nanoGPT's train.py.

The settings live in `resunetpp.training.config.TrainConfig`, the device and process group in
`resunetpp.training.runtime`. `train()` reads top to bottom on one screen: `setup` (data, model, optimiser,
schedule, run folder), then per epoch `train_one_epoch`, `validate` and `checkpoint`. Conventions:

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
- `batch_size` is the global batch: under torchrun each of the N ranks takes batch/N images of its
  own disjoint shard of every epoch's permutation. Batch statistics are per rank unless `sync_bn`
  (SyncBatchNorm, CUDA only); DDP copies rank 0's running statistics to the others at each forward.
- Validation (rank 0): loss and the `resunetpp.evaluation.metrics` at the threshold, mean over images, in fp32
  through `resunetpp.inference.transforms.forward` like `evaluate`. The best val Dice (mean over images) is kept
  as `model.safetensors` + `config.json` (`save_pretrained`).
- The run folder holds `train_config.yaml` (resolved settings), `split.json` (the ids used),
  `metrics.csv`, `tb/` (TensorBoard), `last.pt` (resumable state, written atomically at each validation and
  read back with `torch.load(weights_only=True)`: only tensors and plain types) and `curves.png`.
- A non-finite loss (checked every `check_every` steps without a per-step device sync) or non-finite
  weights stop the run with `NonFiniteError`; nothing of that epoch is written, so the last good
  checkpoint stays as it was.
- Devices: CUDA runs use bf16 autocast, channels_last and the fused Adam; CPU runs float32, the foreach
  Adam and deterministic algorithms, so the same seed gives bit-identical weights, also across a kill
  and a resume.
- Fixed shapes: each epoch drops its last partial batch (at most batch-1 images, a different few each
  epoch), so a compiled or graph-captured step never meets a new shape. `compile` picks
  `torch.compile` of the model ("default", or "reduce-overhead" for CUDA graphs) or eager ("off");
  "auto" (the default) compiles on CUDA where the compilation was measured to repay itself
  (`resolve_compile`: batch >= 64 and >= 60,000 training images; benchmarks/RESULTS.md), never on a CPU.
- Speed: validation, `last.pt` and the logs come every `eval_every` epochs (and after the last one);
  the weights' finiteness is checked with one device sync per validation. `time_limit` (seconds) stops
  after the epoch at which another epoch would not fit, writing a resumable `last.pt`; an epoch's length is
  judged without its first step, which carries the warm-up (cudnn autotuning, compiling).
"""

from __future__ import annotations

import csv
import errno
import math
import os
import pickle
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from tqdm.auto import tqdm

from resunetpp.data import Augment, load_pairs, make_split, save_split
from resunetpp.data.layouts import dataset_name
from resunetpp.errors import SettingError
from resunetpp.evaluation.metrics import METRIC_NAMES, confusion, summarize
from resunetpp.figures import plot_curves
from resunetpp.hub import load_model, save_pretrained, state_mismatch
from resunetpp.inference.transforms import default_normalization, forward, normalize
from resunetpp.networks.registry import create_model
from resunetpp.progress import progress_bar
from resunetpp.training import runtime
from resunetpp.training.config import (  # noqa: F401  (re-exported: the training API in one import)
    AUGMENTS,
    COMPILE_MODES,
    COMPILE_PAYS_FROM,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
    config_from_dict,
    limit_split,
    read_config_file,
    resolve_compile,
    resolve_split,
)
from resunetpp.training.distill import CACHE_NAME, cached_teacher_probs, distillation_loss
from resunetpp.training.ema import WeightEMA
from resunetpp.training.losses import get_loss
from resunetpp.training.runtime import (  # noqa: F401
    normalization_on,
    rng_state,
    seed_all,
    set_rng_state,
    weights_finite,
)
from resunetpp.utils import atomic_path, output_folder

MULTI_SCALES = (0.75, 1.0, 1.25)  # the PraNet lineage's multi-scale training
DATA_SEPARATOR = ":"  # several datasets in one run, as PATH joins folders


class CheckpointError(ValueError):
    """A `last.pt` that can't be resumed: damaged, or holding more than tensors and plain types."""


class CheckpointWriteError(OSError):
    """The run's files could not be written (disk full, ...); the previous ones are intact."""


class NonFiniteError(RuntimeError):
    """The loss or the weights became NaN/inf; the run stopped before writing anything of that epoch."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A `last.pt` read with `torch.load(weights_only=True)`: tensors and plain types only, so a file
    holding other Python objects is refused without running any of it."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors and plain types, so it "
                              "was not written by `resunetpp train` (loading it could run code). Nothing was loaded; "
                              "resume a run folder of your own, or start a new run.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({str(e).splitlines()[0][:120]}). The best model "
                              f"so far is still in {path.parent / 'model.safetensors'}; start a new run (in another "
                              "folder) to train again.") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= set(ckpt):
        raise CheckpointError(f"{path}: not a resunetpp training checkpoint (no model/optimizer/scheduler/epoch)")
    return ckpt


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


def training_step(model, opt, loss_fn, augment, norm: dict[str, torch.Tensor], amp: bool,
                  channels_last: bool, sched=None, ema: WeightEMA | None = None, sizes: tuple[int, ...] = ()):
    """The one training step, for `train` and `benchmarks/train_speed.py`: uint8 batch in, loss (on the
    device, no sync) out. Augment, resize to one of `sizes` (multi-scale; drawn per step), normalise, forward
    (bf16 autocast if `amp`), loss in float32, step, update `ema`. With `soft` (a teacher's uint8
    probabilities), augmented like the masks, `loss_fn` takes it third."""
    def step(images: torch.Tensor, masks: torch.Tensor, soft: torch.Tensor | None = None) -> torch.Tensor:
        x, y, *targets = augment(images, masks, soft)  # uint8 in, float [0, 1] / {0, 1} out
        if sizes:
            x, y, targets = rescale(x, y, targets, sizes[int(torch.randint(len(sizes), ()))])
        x = normalize(x, **norm)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = loss_fn(logits, y, *targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if ema is not None:
            ema.update(model)
        return loss.detach()
    return step


def rescale(x: torch.Tensor, y: torch.Tensor, targets: list[torch.Tensor], size: int):
    """A batch resized to `size` x `size`: images and soft targets bilinearly, masks re-binarised at 0.5."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x, y, targets
    def resize(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t.float(), size=(size, size), mode="bilinear", align_corners=False)
    return resize(x), (resize(y) > 0.5).to(y.dtype), [resize(t).to(t.dtype) for t in targets]


def multi_scale_sizes(size: int, stride: int) -> tuple[int, ...]:
    """The sizes of multi-scale training: `size` x 0.75, 1 and 1.25, each a multiple of `stride`."""
    return tuple(sorted({max(stride, math.floor(size * s / stride + 0.5) * stride) for s in MULTI_SCALES}))


def make_ema(model: torch.nn.Module, decay: float) -> WeightEMA | None:
    """The weights' exponential moving average (buffers too: BatchNorm's statistics), None when `decay` is 0."""
    return WeightEMA(model, decay) if decay else None


def epoch_shard(train_idx: torch.Tensor, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's part of the epoch's permutation (seeded by seed and epoch, the same on every rank):
    disjoint, equal-length shards; the last len % world images of the permutation sit the epoch out."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = train_idx[torch.randperm(len(train_idx), generator=g).to(train_idx.device)]
    return perm[:len(perm) // world * world][rank::world]


@torch.no_grad()
def validate(model, images, masks, cfg: TrainConfig, loss_fn, device, amp: bool = False) -> dict[str, float]:
    """Validation loss and the metrics at the threshold (mean over images). fp32 by default, as
    `evaluate` scores: the val Dice that picks the checkpoint is computed like the test Dice."""
    model.eval()
    norm = normalization_on(device)
    losses, stats = [], []
    for i in range(0, len(images), cfg.batch_size):
        y = masks[i:i + cfg.batch_size]
        logits = forward(model, normalize(images[i:i + cfg.batch_size], **norm), amp)
        losses.append(loss_fn(logits, y).detach() * len(y))  # stays on the device: one sync at the end
        stats.append(confusion(torch.sigmoid(logits.float()) > cfg.threshold, y.bool()))
    s = summarize(torch.cat(stats).cpu())["mean"]
    return {"val_loss": torch.stack(losses).sum().item() / len(images), **{f"val_{k}": s[k] for k in METRIC_NAMES}}


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class Run:
    """Everything one training run holds between its steps."""
    cfg: TrainConfig
    rt: runtime.Runtime
    out: Path
    images: torch.Tensor                    # uint8 (N, 3, H, W) on the device: train + val pairs
    masks: torch.Tensor
    train_idx: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    model: torch.nn.Module                  # what steps run (DDP- and/or compile-wrapped)
    raw_model: torch.nn.Module              # what is saved
    opt: torch.optim.Optimizer
    sched: Any
    loss_fn: Any
    step: Any                               # training_step(...)
    steps: int                              # per epoch, per rank
    rank_batch: int
    checkpoint_config: dict[str, Any]
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "dice": -1.0})
    saved_epoch: int = 0
    epoch_seconds: float = 0.0              # the last epoch's time without its first step (train_one_epoch)
    tb: Any = None
    log: Any = print
    soft: torch.Tensor | None = None        # uint8 (N, 1, H, W) teacher probabilities x 255, when distilling
    ema: WeightEMA | None = None            # the averaged weights, when `ema`: what is validated and saved

    @property
    def kept_model(self) -> torch.nn.Module:
        """What validation scores and the best checkpoint saves: the averaged weights, or the trained ones."""
        return self.raw_model if self.ema is None else self.ema.module


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> Path:
    """Train a model with the settings of `cfg` (module docstring: the recipe, the data, the run folder).

    Args:
        cfg: the settings; `cfg.resolved()` fills the model-dependent defaults and checks every choice.
        resume: a run folder to continue from its `last.pt` (then `cfg.out` is not used).

    Returns:
        The run folder: the best model (`model.safetensors` + `config.json`), `last.pt`, `metrics.csv`,
        `train_config.yaml`, `split.json`, `tb/` and `curves.png`.

    Raises:
        FileNotFoundError, FileExistsError: `resume` holds no `last.pt`; `cfg.out` already holds one.
        SettingError, ValueError: a setting that does not fit the data, the model or the processes.
        CheckpointError: `last.pt` is damaged or holds more than tensors and plain types.
        CheckpointWriteError, NonFiniteError: the run's files could not be written; the loss or weights
            became NaN/inf. Both leave the last good checkpoint intact.
    """
    cfg = cfg.resolved()
    out = run_folder(cfg, resume)
    rt = runtime.start(cfg)
    log = (lambda msg: tqdm.write(msg)) if rt.master else (lambda msg: None)
    run = None
    try:
        run = setup(cfg, rt, out, bool(resume), log)
        # a bar on a terminal, a plain line every 30 s in a log (RESUNETPP_PROGRESS=tty|log|off forces one)
        bar = progress_bar(total=cfg.epochs * run.steps, initial=run.start_epoch * run.steps, unit="step",
                           disable=not (rt.master and cfg.progress), dynamic_ncols=True, desc="train")
        clock, before = time.perf_counter(), (run.history[-1].get("elapsed", 0.0) if run.history else 0.0)
        for epoch in range(run.start_epoch + 1, cfg.epochs + 1):
            bar.set_description(f"epoch {epoch}/{cfg.epochs}")
            t0 = time.perf_counter()
            train_loss = train_one_epoch(run, epoch, bar)
            seconds = time.perf_counter() - t0
            out_of_time = agree(rt, cfg.time_limit is not None and epoch < cfg.epochs
                                and time.perf_counter() - clock + run.epoch_seconds > cfg.time_limit)
            if not (epoch % cfg.eval_every == 0 or epoch == cfg.epochs or out_of_time):
                continue
            if not weights_finite(run.raw_model, rt.ddp):
                raise NonFiniteError(f"non-finite weights after epoch {epoch}: training stopped. The last good "
                                     f"checkpoint in {out} is intact; try a lower learning rate (lr).")
            stop = out_of_time
            if rt.master:
                row = epoch_row(run, epoch, train_loss, seconds, t0, clock, before)
                checkpoint(run, row, epoch)
                bar.set_postfix(loss=f"{train_loss:.4f}", val_dice=f"{row['val_dice']:.4f}",
                                img_s=f"{row['img_per_s']:.1f}")
                stop = should_stop(run, epoch, out_of_time)
            if agree(rt, stop):  # rank 0 decides; also keeps the ranks in step while it validates
                break
        bar.close()
        finish(run)
        if rt.ddp:
            dist.barrier()  # leave together: a rank tearing down while another still works can abort gloo
        return out
    except KeyboardInterrupt:
        log(interrupted(out, run.saved_epoch if run else 0))
        raise
    finally:
        runtime.stop(rt)


def epoch_row(run: Run, epoch: int, train_loss: float, seconds: float, t0: float, clock: float,
              before: float) -> dict[str, Any]:
    """Rank 0: the epoch's row of `metrics.csv`: lr, losses, the validation metrics and the timings (`seconds`
    with validation, since `t0`; `elapsed` over all the run's sessions: `before` this one, which began at
    `clock`)."""
    return {"epoch": epoch, "lr": run.opt.param_groups[0]["lr"], "train_loss": train_loss,
            **validate(run.kept_model, run.val_x, run.val_y, run.cfg, run.loss_fn, run.rt.device),
            "seconds": round(time.perf_counter() - t0, 3),
            "img_per_s": round(run.steps * run.cfg.batch_size / seconds, 2),
            "elapsed": round(before + time.perf_counter() - clock, 3)}


def interrupted(out: Path, saved: int) -> str:
    """The log line of a run stopped by Ctrl-C: where it can be resumed from, if anywhere."""
    if not saved:
        return "interrupted: no epoch was checkpointed yet"
    return f"interrupted: the last checkpoint is {out / 'last.pt'} (epoch {saved}); resume the run in {out} to continue"


def run_folder(cfg: TrainConfig, resume: str | os.PathLike | None) -> Path:
    """Where the run lives: `resume` (which must hold a `last.pt`), else `cfg.out` (which must not)."""
    out = Path(resume or cfg.out)
    if resume and not (out / "last.pt").is_file():
        raise FileNotFoundError(f"{out / 'last.pt'}: nothing to resume (no checkpoint in {out})")
    if not resume and (out / "last.pt").exists():
        raise FileExistsError(f"{out} already holds a run (last.pt); resume it, or choose another output folder")
    return output_folder(out, create=False)  # a file in the way is said now, not after loading the data


def should_stop(run: Run, epoch: int, out_of_time: bool) -> bool:
    """Rank 0: whether the run ends after this validated epoch (time limit or early stop), said in the log."""
    cfg = run.cfg
    if out_of_time:
        run.log(f"time limit: stopped after epoch {epoch} of {cfg.epochs} ({cfg.time_limit:g} s); "
                f"resume the run in {run.out} to continue")
        return True
    if cfg.early_stop and epoch - run.best["epoch"] >= cfg.early_stop:
        run.log(f"early stop: no better val Dice for {cfg.early_stop} epochs (best {run.best['dice']:.4f} "
                f"at epoch {run.best['epoch']})")
        return True
    return False


def agree(rt: runtime.Runtime, flag: bool) -> bool:
    """Rank 0's verdict on every rank (one small broadcast under DDP)."""
    if not rt.ddp:
        return bool(flag)
    t = torch.tensor([float(flag)], device=rt.device)
    dist.broadcast(t, 0)
    return bool(t.item())


# ---------------------------------------------------------------------------------------------- setup


def setup(cfg: TrainConfig, rt: runtime.Runtime, out: Path, resume: bool, log) -> Run:
    """Data (split ids, pairs as uint8 tensors on the device), model, loss, optimiser, schedule, and the run
    folder; from `out/last.pt` when resuming."""
    if cfg.batch_size % rt.world:
        raise SettingError(f"batch size {cfg.batch_size} is not divisible by the {rt.world} processes", "batch_size")
    data = load_data(cfg, rt, log)
    raw_model = build_model(cfg, rt, resume)
    model = distribute(raw_model, rt)
    steps, rank_batch = plan_steps(cfg, rt, len(data.train_idx))
    compile_mode = resolve_compile(cfg.compile, rt.cuda, cfg.epochs * steps * cfg.batch_size, rank_batch)
    if compile_mode != "off":
        model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    soft = None
    if cfg.teacher:  # once, before the first epoch; cached in the run folder for resumes
        soft = cached_teacher_probs(cfg.teacher, data.images, data.ids, out / CACHE_NAME, rt.master)
    loss_fn, opt, sched, step, ema = optimisation(cfg, rt, model, raw_model, steps)
    run = Run(cfg, rt, out, data.images, data.masks, data.train_idx, data.images[data.val_idx],
              data.masks[data.val_idx].float(), model, raw_model, opt, sched, loss_fn, step, steps, rank_batch,
              checkpoint_config(cfg, data), log=log, soft=soft, ema=ema)
    if resume:
        restore(run, out / "last.pt")
    if rt.master:  # rank 0 writes everything
        write_run_files(run, data, compile_mode, resume)
    return run


@dataclass
class Data:
    """The run's pairs as uint8 tensors on the device, and the split that picked them."""
    name: str
    ids: list[str]
    split: dict[str, Any]                   # the ids used: those of the split that loaded
    split_source: str
    images: torch.Tensor                    # uint8 (N, 3, H, W): train + val pairs
    masks: torch.Tensor
    train_idx: torch.Tensor
    val_idx: torch.Tensor


def load_data(cfg: TrainConfig, rt: runtime.Runtime, log) -> Data:
    """The split's train and val pairs (a seeded 80/10/10 split of the good pairs for an unknown dataset),
    without the pairs that fail the check under `skip_bad`. Several datasets (`data` joined by ':') are
    loaded each with its own split (`split` entries joined by ':', one for all or one each) and trained on
    together; their ids become "<dataset>/<id>"."""
    sources, splits = cfg.data.split(DATA_SEPARATOR), (cfg.split or "").split(DATA_SEPARATOR)
    if len(sources) == 1:
        return load_one(cfg, rt, log)
    if len(splits) not in (1, len(sources)):
        raise SettingError(f"split {cfg.split!r}: {len(splits)} entries for {len(sources)} datasets; give one for "
                           "all or one each, joined by ':'", "split")
    parts = [load_one(replace(cfg, data=d, split=s or None), rt, log)
             for d, s in zip(sources, splits * len(sources) if len(splits) == 1 else splits)]
    return join_data(parts, cfg.seed)


def join_data(parts: list[Data], seed: int) -> Data:
    """Datasets loaded apart, as one: ids "<dataset>/<id>", each part's split kept, the name "a+b" (as
    `resunetpp.data.dataset_part` reads them back)."""
    names = [d.name for d in parts]
    if len(set(names)) < len(names):
        raise SettingError(f"data: the same dataset twice ({', '.join(names)})", "data")
    offsets = [0]
    for d in parts[:-1]:
        offsets.append(offsets[-1] + len(d.ids))
    split = {"dataset": "+".join(names), "seed": seed,
             **{p: [f"{d.name}/{k}" for d in parts for k in d.split[p]] for p in ("train", "val", "test")}}
    return Data("+".join(names), [f"{d.name}/{k}" for d in parts for k in d.ids], split,
                "; ".join(f"{d.name}: {d.split_source}" for d in parts),
                torch.cat([d.images for d in parts]), torch.cat([d.masks for d in parts]),
                torch.cat([d.train_idx + o for d, o in zip(parts, offsets)]),
                torch.cat([d.val_idx + o for d, o in zip(parts, offsets)]))


def load_one(cfg: TrainConfig, rt: runtime.Runtime, log) -> Data:
    """One dataset's train and val pairs (`load_data`)."""
    split, split_source = resolve_split(cfg, dataset_name(cfg.data))
    if split is not None:
        split = limit_split(split, cfg.limit)
    wanted = None if split is None else [*split["train"], *split["val"]]
    pairs = load_pairs(cfg.data, ids=wanted, size=cfg.size, skip_bad=cfg.skip_bad, progress=rt.master)
    if split is None:
        split = limit_split({"dataset": pairs.name, "seed": cfg.seed, **make_split(pairs.ids, seed=cfg.seed)},
                            cfg.limit)
    index = {k: i for i, k in enumerate(pairs.ids)}
    skipped = [k for k in [*split["train"], *split["val"]] if k not in index]
    if skipped:
        log(f"skip_bad: left out {len(skipped)} pair(s) that fail the check: {', '.join(map(str, skipped))}")
    split = {**split, **{part: [k for k in split[part] if k in index] for part in ("train", "val")}}
    if not split["train"] or not split["val"]:
        raise ValueError(f"{cfg.data}: the split leaves no training or no validation images")
    device = rt.device
    return Data(pairs.name, [str(k) for k in pairs.ids], split, split_source, pairs.images.to(device),
                pairs.masks.to(device), torch.tensor([index[k] for k in split["train"]], device=device),
                torch.tensor([index[k] for k in split["val"]], device=device))


def build_model(cfg: TrainConfig, rt: runtime.Runtime, resume: bool) -> torch.nn.Module:
    """The network to train (seeded: the same seed gives the same weights), on the device: from `cfg.init`'s
    weights when fine-tuning, with SyncBatchNorm under `sync_bn`, channels_last on CUDA."""
    seed_all(cfg.seed)
    try:
        model = create_model(cfg.model, **cfg.model_kwargs).to(rt.device)
    except TypeError as e:  # a misspelt model_kwargs key
        raise SettingError(f"model_kwargs {cfg.model_kwargs}: not options of {cfg.model} ({e})",
                           "model_kwargs") from None
    if getattr(model, "in_channels", 3) != 3:
        raise SettingError(f"model_kwargs {cfg.model_kwargs}: training reads RGB images, so {cfg.model} must take "
                           f"3 input channels, not {model.in_channels}", "model_kwargs")
    if cfg.init and not resume:  # a resumed run's last.pt replaces these weights anyway
        init_weights(model, cfg.init, cfg.model)
    if cfg.size % model.total_stride:
        raise SettingError(f"size {cfg.size} is not a multiple of {cfg.model}'s total stride {model.total_stride}",
                           "size")
    if cfg.sync_bn:
        if not (rt.ddp and rt.cuda):
            raise SettingError("sync_bn needs torchrun with several CUDA processes (torch's SyncBatchNorm runs "
                               "on GPUs only; one process has nothing to synchronise)", "sync_bn")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state_dict keys as BatchNorm2d
    if rt.cuda:
        model = model.to(memory_format=torch.channels_last)
    return model


def init_weights(model: torch.nn.Module, source: str, name: str) -> None:
    """Copy the weights of `source` (a bundled model's name or a run folder) into `model` (fine-tuning)."""
    donor = load_model(source)
    if donor.spec.model != name:
        raise SettingError(f"init {source}: holds a {donor.spec.model}, not a {name}; start from weights of the "
                           "same architecture", "init")
    problem = state_mismatch(model.state_dict(), donor.state_dict())
    if problem:
        raise SettingError(f"init {source}: its weights do not fit {name} {donor.spec.model_kwargs}: {problem}",
                           "init")
    model.load_state_dict(donor.state_dict())


def distribute(model: torch.nn.Module, rt: runtime.Runtime) -> torch.nn.Module:
    """`model` under DistributedDataParallel when torchrun started several processes, else itself."""
    if not rt.ddp:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.cuda else None)


def plan_steps(cfg: TrainConfig, rt: runtime.Runtime, n_train: int) -> tuple[int, int]:
    """(steps per epoch, batch per process): each process takes an equal shard of the training images; the
    last partial batch is dropped, so every step has the same shape."""
    shard_len = n_train // rt.world
    if shard_len == 0:
        raise ValueError(f"{n_train} training image(s) cannot be shared by {rt.world} processes")
    rank_batch = cfg.batch_size // rt.world
    steps = shard_len // rank_batch
    if steps == 0:
        raise SettingError(f"batch size {cfg.batch_size} is larger than the {n_train} training images", "batch_size")
    return steps, rank_batch


def optimisation(cfg: TrainConfig, rt: runtime.Runtime, model: torch.nn.Module, raw_model: torch.nn.Module,
                 steps: int):
    """(validation loss, optimiser, schedule, training step, weight EMA or None); the step's loss adds the
    teacher's term when distilling."""
    loss_fn = get_loss(cfg.loss)
    train_loss_fn = distillation_loss(loss_fn, cfg.distill_weight) if cfg.teacher else loss_fn
    opt = make_optimizer(cfg, raw_model.parameters(), rt.device)
    sched = make_scheduler(cfg, opt, cfg.epochs * steps)
    ema = make_ema(raw_model, cfg.ema)
    sizes = multi_scale_sizes(cfg.size, raw_model.total_stride) if cfg.multi_scale else ()
    step = training_step(model, opt, train_loss_fn, Augment(cfg.augment).to(rt.device),
                         normalization_on(rt.device), rt.amp, channels_last=rt.cuda, sched=sched, ema=ema,
                         sizes=sizes)
    return loss_fn, opt, sched, step, ema


def checkpoint_config(cfg: TrainConfig, data: Data) -> dict[str, Any]:
    """The `config.json` of the run's best model, less its metrics (the model spec and its provenance)."""
    split = data.split
    config = {
        "model": cfg.model, "model_kwargs": cfg.model_kwargs, "input_size": [cfg.size, cfg.size],
        "normalization": default_normalization(), "threshold": cfg.threshold, "dataset": data.name,
        "split": {"file": "split.json", "source": data.split_source,
                  "seed": split.get("seed"), **{k: len(split[k]) for k in ("train", "val", "test")}},
        "training": {k: getattr(cfg, k) for k in ("loss", "optimizer", "lr", "batch_size", "schedule",
                                                  "augment", "seed", "epochs")},
    }
    if cfg.init:
        config["training"]["init"] = str(cfg.init)
    if cfg.ema:
        config["training"]["ema"] = cfg.ema
    if cfg.multi_scale:
        config["training"]["multi_scale"] = list(MULTI_SCALES)
    if cfg.teacher:
        config["training"]["distillation"] = {"teacher": str(cfg.teacher), "weight": cfg.distill_weight}
    return config


def restore(run: Run, path: Path) -> None:
    """Continue `run` from its `last.pt`: weights, optimiser, schedule, history, best epoch and RNG states."""
    ckpt = load_checkpoint(path)
    run.raw_model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    if run.ema is not None and "ema" in ckpt:  # without one (ema switched on at the resume) it starts afresh
        run.ema.load_state_dict(ckpt["ema"])
    run.start_epoch, run.history, run.best = ckpt["epoch"], ckpt["history"], ckpt["best"]
    run.saved_epoch = run.start_epoch
    set_rng_state(ckpt["rng"])
    run.log(f"resuming {run.out} after epoch {run.start_epoch} (best val Dice {run.best['dice']:.4f} at epoch "
            f"{run.best['epoch']})")


def write_run_files(run: Run, data: Data, compile_mode: str, resume: bool) -> None:
    """Rank 0: the run folder with `train_config.yaml` (the resolved settings), `split.json` and TensorBoard."""
    # tensorboard is heavy to import (and pulls in its own dependencies): only when a run starts
    from torch.utils.tensorboard import SummaryWriter

    cfg, rt, out = run.cfg, run.rt, output_folder(run.out)
    settings = {**asdict(cfg), "out": str(out), "resolved_device": str(rt.device), "amp": rt.amp,
                "deterministic": rt.deterministic, "world_size": rt.world, "dataset": data.name,
                "steps_per_epoch": run.steps, "compiled": compile_mode}
    with atomic_path(out / "train_config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(settings, sort_keys=False))
    save_split(data.split, out / "split.json")
    run.tb = SummaryWriter(str(out / "tb"), purge_step=run.start_epoch + 1 if resume else None)


# ---------------------------------------------------------------------------------------------- epochs


def train_one_epoch(run: Run, epoch: int, bar) -> float:
    """One pass over this rank's shard; returns the mean training loss (over all ranks). The losses stay on
    the device, checked for NaN/inf every `check_every` steps (each check is one sync)."""
    cfg, rt = run.cfg, run.rt
    shard = epoch_shard(run.train_idx, cfg.seed, epoch, rt.rank, rt.world)
    runtime.seed_all(cfg.seed * 100_003 + epoch * 101 + rt.rank)  # augmentation randomness, same after a resume
    run.model.train()
    losses = torch.zeros(run.steps, device=rt.device)
    t0 = time.perf_counter()
    for step in range(run.steps):
        idx = shard[step * run.rank_batch:(step + 1) * run.rank_batch]
        losses[step] = run.step(run.images[idx], run.masks[idx], None if run.soft is None else run.soft[idx])
        if step == 0 and run.steps > 1 and cfg.time_limit is not None:
            losses[0].item()  # one sync per epoch: a session's first step carries the warm-up (cudnn autotuning)
            t0 = time.perf_counter()
        if (step + 1) % cfg.check_every == 0 or step + 1 == run.steps:
            done = losses[:step + 1].clone()
            if rt.ddp:
                dist.all_reduce(done)
                done /= rt.world
            done = done.cpu()
            if not torch.isfinite(done).all():
                bad = int((~torch.isfinite(done)).nonzero()[0])
                raise NonFiniteError(
                    f"non-finite loss ({done[bad].item()}) at epoch {epoch}, step {bad + 1}/{run.steps}: "
                    f"training stopped. The last good checkpoint in {run.out} (epoch {epoch - 1}) is intact; "
                    "try a lower learning rate (lr) or another loss.")
            bar.update((epoch - 1) * run.steps + step + 1 - bar.n)
            bar.set_postfix(loss=f"{done.mean():.4f}")
    # what the next epoch will take, for `time_limit`: the steps after the first (timed only under a
    # limit), scaled to the whole epoch
    run.epoch_seconds = (time.perf_counter() - t0) * run.steps / max(run.steps - 1, 1)
    return done.mean().item()


def checkpoint(run: Run, row: dict[str, Any], epoch: int) -> None:
    """Rank 0: the best model so far (`model.safetensors` + `config.json`), `last.pt`, `metrics.csv` and
    TensorBoard. Every file is written atomically: a failed write leaves the previous one whole."""
    out = run.out
    run.history.append(row)
    best_before, wrote_last = dict(run.best), False
    try:
        if row["val_dice"] > run.best["dice"]:
            run.best = {"epoch": epoch, "dice": row["val_dice"]}
            metrics = {k[4:]: v for k, v in row.items() if k.startswith("val_")}
            save_pretrained(run.kept_model, out, {**run.checkpoint_config, "metrics": {"val": metrics},
                                                  "best_epoch": epoch})
        with atomic_path(out / "last.pt") as tmp:
            torch.save({"model": run.raw_model.state_dict(), "optimizer": run.opt.state_dict(),
                        "scheduler": run.sched.state_dict(), "epoch": epoch, "best": run.best,
                        "history": run.history, "rng": rng_state(), "config": asdict(run.cfg),
                        **({"ema": run.ema.state_dict()} if run.ema is not None else {})}, tmp)
        wrote_last = True
        write_metrics_csv(out / "metrics.csv", run.history)
    except (OSError, RuntimeError, SafetensorError) as e:
        best = run.best if run.best["epoch"] != best_before["epoch"] and (out / "model.safetensors").is_file() \
            else best_before
        raise CheckpointWriteError(write_failure(out, epoch, e, epoch if wrote_last else run.saved_epoch,
                                                 best["epoch"])) from None
    run.saved_epoch = epoch
    for k, v in row.items():
        if k != "epoch":
            run.tb.add_scalar(k.replace("val_", "val/").replace("train_", "train/"), v, epoch)
    run.tb.flush()


def write_failure(out: Path, epoch: int, error: BaseException, resumable: int, best_epoch: int) -> str:
    """The one line of a failed checkpoint write: its real cause, which epoch's files are intact, and advice
    that works (resuming only when a `last.pt` exists to resume from)."""
    text = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        free = None
    full = (getattr(error, "errno", None) == errno.ENOSPC or "no space left" in text.lower()
            or (free is not None and free < 16 * 2**20))
    cause = f"no space left on device ({text})" if full else text
    best = f"model.safetensors holds the best model (epoch {best_epoch})" if best_epoch else ""
    fix = "free some space" if full else "fix the cause"
    if resumable:
        kept = f"The files of epoch {resumable} are intact (last.pt{'; ' + best if best else ''})"
        advice = f"{fix}, then resume the run in {out}"
    else:
        kept = "No last.pt was written yet, so there is nothing to resume" + (f"; {best}" if best else "")
        advice = f"{fix}, then start the run again in an empty folder"
    return f"{out}: could not write the checkpoint of epoch {epoch}: {cause}. {kept}; {advice}"


def finish(run: Run) -> None:
    if not run.rt.master:
        return
    run.tb.close()
    if run.history:
        plot_curves(run.history, run.out / "curves.png")
    run.log(f"done: best val Dice {run.best['dice']:.4f} at epoch {run.best['epoch']}; model in {run.out}")
