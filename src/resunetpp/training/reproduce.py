"""Reproduce the paper's Tables I (Kvasir-SEG) and II (CVC-ClinicDB) and its Fig. 3.

`reproduce("table1", out=DIR)` trains the four models (U-Net, ResUNet, ResUNet-mod, ResUNet++) with
the paper's recipe (`TrainConfig` defaults: Adam 1e-4, batch 16, 256x256, 120 epochs, SGDR, `paper`
augmentation; each model its registry default loss) on the committed 80/10/10 split, evaluates each
best-on-validation model on the test split and writes, in `out`:

- `table.md`: Dice, IoU (foreground), mIoU (2-class), mIoU (Keras: the paper's), recall and precision per
  model, means over test images, beside the paper's numbers. With `grouped` (the default for Table II) each
  model is there twice: on the committed random split (the paper's protocol) and on the dataset's leak-free
  split (`GROUPED`: CVC-ClinicDB by sequence, Kvasir-SEG by near-duplicate group; `<folder>/<model>/` runs);
- `results.json`: device, torch version, date, wall time, the command, per-model metrics (mean and
  pooled) and settings;
- `fig3.png`: test images, ground truth and the four models' masks (the paper's Fig. 3); each run keeps
  its masks of those images (`fig3_masks.png`), so a run that comes back without weights is still drawn;
- one run folder per model (`out/<model>/`) with its `eval/` reports. A finished run is reused and an
  unfinished one resumed, so an interrupted reproduction continues where it stopped.

`quick=True` keeps the models exact but shrinks the rest (64x64, 2 epochs, the first 16 ids of each
split) so the whole pipeline runs on a CPU in minutes; its numbers say nothing about the paper.

The paper's numbers (`PAPER`) are its Tables I and II; tests/training/test_reproduce.py checks each row against the
paper's text.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from resunetpp.data import load_pairs
from resunetpp.data.splits import grouped_split_path
from resunetpp.device import resolve_device
from resunetpp.evaluation.evaluator import evaluate, read_metrics, resolve_ids
from resunetpp.figures import plot_fig3
from resunetpp.hub import load_model
from resunetpp.inference.transforms import predict_probs
from resunetpp.networks.registry import count_parameters, create_model
from resunetpp.training.config import TrainConfig
from resunetpp.training.loop import load_checkpoint, train
from resunetpp.utils import atomic_path, write_json

MODELS = ("unet", "resunet", "resunet-mod", "resunetpp")
DISPLAY = {"unet": "U-Net", "resunet": "ResUNet", "resunet-mod": "ResUNet-mod", "resunetpp": "ResUNet++"}
TABLES = {
    "table1": {"title": "Table I", "dataset": "Kvasir-SEG", "folder": "Kvasir-SEG"},
    "table2": {"title": "Table II", "dataset": "CVC-ClinicDB", "folder": "CVC-ClinicDB"},
}
# (dice, miou, recall, precision) of the paper's Tables I and II
PAPER = {
    "table1": {"unet": (0.7147, 0.4334, 0.6306, 0.9222), "resunet": (0.5144, 0.4364, 0.5041, 0.7292),
               "resunet-mod": (0.7909, 0.4287, 0.6909, 0.8713), "resunetpp": (0.8133, 0.7927, 0.7064, 0.8774)},
    "table2": {"unet": (0.6419, 0.4711, 0.6756, 0.6868), "resunet": (0.4510, 0.4570, 0.5775, 0.5614),
               "resunet-mod": (0.7788, 0.4545, 0.6683, 0.8877), "resunetpp": (0.7955, 0.7962, 0.7022, 0.8785)},
}
QUICK = {"size": 64, "epochs": 2, "limit": 16, "batch_size": 8}
# the leak-free split of each table: (row label, run folder, what it keeps together). Table II's by default:
# the random split puts 59 of its 61 test frames beside a frame of their video; Kvasir-SEG's leaks 1 pair of 1000.
GROUPED = {"table1": ("by near-duplicates", "by-near-duplicates", "near-duplicate images in one part"),
           "table2": ("by sequence", "by-sequence", "whole videos in one part")}
FIG3_ROWS = 4
FIG3_MASKS = "fig3_masks.png"  # a run's masks of the fig3 images, stacked top to bottom; their ids in the PNG text


def default_data(table: str) -> Path:
    """../shared/data/<dataset> relative to the working directory, or an error saying how to get it."""
    path = Path("..") / "shared" / "data" / TABLES[table]["folder"]
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"{TABLES[table]['dataset']} not found at {path}; give its folder (data), or download it first "
        f"(`resunetpp data download {TABLES[table]['dataset'].lower()}`; research use only)")


def _paper_row(table: str, model: str) -> dict[str, Any]:
    return dict(zip(("dice", "miou", "recall", "precision"), PAPER[table][model]))


def table_markdown(table: str, results: dict[str, dict[str, Any]], note: str = "",
                   grouped: dict[str, dict[str, Any]] | None = None) -> str:
    """Our test-split means beside the paper's numbers; `grouped`: the same models trained and tested on the
    table's leak-free split (`GROUPED`), as extra rows."""
    t = TABLES[table]
    lines = [f"# {t['title']}: {t['dataset']} (test split)", ""]
    if note:
        lines += [note, ""]
    lines += ["| model | split | epochs | Dice | IoU (fg) | mIoU (2-class) | mIoU (Keras) | recall | precision "
              "| paper DSC | paper mIoU | paper recall | paper precision |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = [(model, r, "random") for model, r in results.items()]
    label, _, kept = GROUPED[table]
    rows += [(model, r, label) for model, r in (grouped or {}).items()]
    for model, r, split in rows:
        m = r["metrics"]["mean"]
        keras = r["metrics"].get("miou_keras")
        p = _paper_row(table, model)
        done, planned = r.get("epochs_done"), r.get("settings", {}).get("epochs")
        epochs = f"{done}" if done == planned else f"{done} of {planned} (stopped)"
        lines.append(f"| {DISPLAY[model]} | {split} | {epochs} | {m['dice']:.4f} | {m['iou']:.4f} | "
                     f"{m['miou_2class']:.4f} | {'' if keras is None else f'{keras:.4f}'} | "
                     f"{m['recall']:.4f} | {m['precision']:.4f} | {p['dice']:.4f} | {p['miou']:.4f} | "
                     f"{p['recall']:.4f} | {p['precision']:.4f} |")
    lines += ["", "Ours: means over test images at threshold 0.5, computed at the training input size; mIoU (Keras) "
              "is pooled over the test set. The paper's mIoU is a 2-class Keras MeanIoU fed with probabilities, "
              "so only p == 1.0 counts as polyp: compare it with our mIoU (Keras) column, not with mIoU (2-class) "
              "(docs/evaluation.md)."]
    if grouped:
        lines += ["", f"Split `random`: the committed 80/10/10 split, as the paper's. Split `{label}`: "
                  f"`{grouped_split_path(t['dataset']).name}`, {kept}; its scores are the leak-free ones "
                  "(docs/evaluation.md, \"Splits without leaks\")."]
    return "\n".join(lines) + "\n"


def reproduce(table: str, data: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
              epochs: int | None = None, quick: bool = False, device: str = "auto", size: int | None = None,
              limit: int | None = None, batch_size: int | None = None, models: tuple[str, ...] = MODELS,
              seed: int = 0, progress: bool = True, command: str | None = None, time_limit: float | None = None,
              train_runs: bool = True, overrides: dict[str, Any] | None = None, grouped: bool | None = None,
              random_split: bool = True) -> Path:
    """Train and evaluate the models of `table` ("table1" or "table2"); returns the output folder.

    `time_limit` (seconds, per model) stops a training resumably; `train_runs=False` trains nothing and
    tabulates the runs already in `out` as they are (a stopped one is marked with its epochs; one without
    weights, as a GPU campaign returns them, by its own `eval/metrics.json`, and left out of fig3.png);
    `overrides` are further `TrainConfig` settings (e.g. eval_every, compile); `grouped` also trains and
    tests every model on the leak-free split (None: Table II only); `random_split=False` leaves out the
    committed random split (a GPU campaign trains the two splits as separate jobs)."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; choose table1 (Kvasir-SEG) or table2 (CVC-ClinicDB)")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; the paper's are {', '.join(MODELS)}")
    out = Path(out or f"runs/reproduce-{table}{'-quick' if quick else ''}")
    settings = shared_settings(quick, size=size, epochs=epochs, limit=limit, batch_size=batch_size)
    plan = Plan(table, Path(data) if data is not None else default_data(table), models, settings,
                {"seed": seed, "device": device, "progress": progress, "time_limit": time_limit}, overrides or {},
                train_runs)
    dev = resolve_device(device)
    start = time.perf_counter()
    results = run_models(plan, out, None) if random_split else {}
    grouped = table == "table2" if grouped is None else grouped
    leak_free = run_models(plan, out / GROUPED[table][1], str(grouped_split_path(TABLES[table]["dataset"]))) \
        if grouped else {}
    wall = time.perf_counter() - start
    if not results and not leak_free:
        raise FileNotFoundError(f"{out}: no runs of {', '.join(models)} to tabulate")

    note = (f"Quick run ({settings['size']}x{settings['size']}, {settings['epochs']} epochs, first "
            f"{settings['limit']} ids of each split): a pipeline check, not a reproduction." if quick else "")
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(table_markdown(table, results, note, leak_free))
    drawn = tuple(m for m in results if (out / m / "model.safetensors").is_file() or (out / m / FIG3_MASKS).is_file())
    if drawn:
        ids, _ = resolve_ids(plan.data, "test", out / drawn[0], settings["limit"])
        plot_fig3_for(out, plan.data, drawn, ids[:FIG3_ROWS], dev, TABLES[table]["dataset"])
    write_json(out / "results.json", {
        "table": table, "dataset": TABLES[table]["dataset"], "data": str(plan.data), "quick": quick,
        **machine(dev), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 1), "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": settings, "models": results,
        **({"models_grouped": leak_free, "grouped_split": GROUPED[table][0]} if leak_free else {})})
    return out


@dataclass(frozen=True)
class Plan:
    """What every model of a reproduction shares: the table, the data, the models and their settings."""
    table: str
    data: Path
    models: tuple[str, ...]
    settings: dict[str, Any]        # size, epochs, limit, batch_size: also written to results.json
    train_settings: dict[str, Any]  # seed, device, progress, time_limit
    overrides: dict[str, Any]       # further TrainConfig settings
    train_runs: bool


def shared_settings(quick: bool, **given: int | None) -> dict[str, Any]:
    """Size, epochs, limit and batch size of every model: the paper's (`TrainConfig` defaults), or `QUICK`'s,
    then those `given` (None: not given)."""
    base = TrainConfig()
    settings = {"size": base.size, "epochs": base.epochs, "limit": None, "batch_size": base.batch_size}
    if quick:
        settings.update(QUICK)
    settings.update({k: v for k, v in given.items() if v is not None})
    return settings


def machine(dev: torch.device) -> dict[str, str]:
    """The device of a reproduction in words, with the torch and Python versions, for results.json."""
    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
    else:
        device_name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return {"device": str(dev), "device_name": device_name, "torch": torch.__version__,
            "python": platform.python_version()}


def run_models(plan: Plan, base: Path, split_file: str | None) -> dict[str, dict[str, Any]]:
    """Train (or resume) each model of `plan` in `base/<model>` on `split_file` (None: the committed random
    split) and evaluate it on the test split; the results of the models that have a run, by name."""
    found: dict[str, dict[str, Any]] = {}
    for model in plan.models:
        extra = {"split": split_file} if split_file else {}
        run = base / model
        cfg = TrainConfig(model=model, data=str(plan.data), out=str(run), **plan.train_settings, **plan.settings,
                          **extra, **plan.overrides)
        done = _finished_epochs(run)
        if plan.train_runs and (done is None or done < cfg.epochs):
            train(cfg, resume=run if done is not None else None)
        elif done is None:
            continue  # nothing to tabulate for this model
        found[model] = model_result(plan, run, cfg, split_file)
    return found


def model_result(plan: Plan, run: Path, cfg: TrainConfig, split_file: str | None) -> dict[str, Any]:
    """One model's entry of results.json: its test metrics, best epoch, timings, size and settings."""
    best = json.loads((run / "config.json").read_text())
    if (run / "model.safetensors").is_file():
        summary = evaluate(run, plan.data, split="test", out=run / "eval", device=plan.train_settings["device"],
                           limit=plan.settings["limit"], progress=plan.train_settings["progress"]).summary
    else:  # a run that came back from another machine without its weights: its own test report
        summary = read_metrics(run / "eval" / "metrics.json")
    return {"metrics": {"mean": summary["mean"], "pooled": summary["pooled"],
                        "miou_keras": summary.get("miou_keras"), "detection": summary.get("detection")},
            "test_images": summary["images"], "best_epoch": best.get("best_epoch"),
            "val": best.get("metrics", {}).get("val"), "train_seconds": _train_seconds(run),
            "epochs_done": _finished_epochs(run),
            "parameters": count_parameters(create_model(best["model"], **best["model_kwargs"])),
            "settings": {**{k: v for k, v in asdict(cfg.resolved()).items() if k != "progress"},
                         **({"split": f"resunetpp/splits/{Path(split_file).name}"}  # no local path
                            if split_file else {})},
            "paper": _paper_row(plan.table, cfg.model)}


def _finished_epochs(run: Path) -> int | None:
    """Epochs completed by the run in `run` (from last.pt; for a run returned without it, the last epoch
    in metrics.csv), or None when there is no run yet."""
    if (run / "last.pt").is_file():
        return int(load_checkpoint(run / "last.pt")["epoch"])
    rows = _metrics_rows(run)
    return int(rows[-1]["epoch"]) if rows and (run / "eval" / "metrics.json").is_file() else None


def _metrics_rows(run: Path) -> list[dict[str, str]]:
    try:
        with open(run / "metrics.csv") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _train_seconds(run: Path) -> float | None:
    """Training wall time of the run over all its sessions (the last `elapsed` in metrics.csv)."""
    rows = _metrics_rows(run)
    return float(rows[-1]["elapsed"]) if rows and rows[-1].get("elapsed") else None


def plot_fig3_for(out: Path, data: Path, models: tuple[str, ...], ids: list[str], device: torch.device,
                  dataset: str) -> Path | None:
    """fig3.png from the runs in `out`: the given test ids, ground truth and each model's mask, predicted
    by its weights (and kept in its `fig3_masks.png`) or, for a run without weights, read from that file.
    A model with neither, or whose kept masks are of other images or another size, is left out."""
    preds = {}
    loaded = {}  # input size -> pairs: the models usually share one, and loading scans the whole dataset
    for model in models:
        run = out / model
        size = tuple(json.loads((run / "config.json").read_text())["input_size"])
        if size not in loaded:
            loaded[size] = load_pairs(data, ids=ids, size=size, progress=False)
        pairs = loaded[size]
        if (run / "model.safetensors").is_file():
            net = load_model(run, device)
            cfg = net.pretrained_config
            masks = (predict_probs(net, pairs.images, cfg["normalization"], device) > cfg["threshold"]).cpu()
            _save_fig3_masks(run / FIG3_MASKS, masks, pairs.ids)
        else:
            masks = _read_fig3_masks(run / FIG3_MASKS, pairs.ids, size)
            if masks is None:
                continue
        preds[DISPLAY[model]] = masks
    if not preds:
        return None
    return plot_fig3(pairs.images, pairs.masks, preds, out / "fig3.png", row_labels=pairs.ids,
                     title=f"{dataset}: test images")


def _save_fig3_masks(path: Path, masks: torch.Tensor, ids: list[str]) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("ids", json.dumps(list(ids)))
    stacked = (masks[:, 0].reshape(-1, masks.shape[-1]).to(torch.uint8) * 255).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(stacked).save(tmp, format="PNG", pnginfo=info)


def _read_fig3_masks(path: Path, ids: list[str], size: tuple[int, int]) -> torch.Tensor | None:
    """The masks kept in `path` as (K, 1, H, W) bool, or None when missing or not of these ids at this size."""
    if not path.is_file():
        return None
    with Image.open(path) as im:
        if json.loads(im.text.get("ids", "[]")) != list(ids) or im.size != (size[1], size[0] * len(ids)):
            return None
        return torch.from_numpy(np.array(im.convert("L")) > 127).reshape(len(ids), 1, *size)
