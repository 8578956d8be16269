"""`resunetpp train`, `resunetpp evaluate` and `resunetpp reproduce`: thin layers over
`resunetpp.training.loop`, `resunetpp.evaluation.evaluator` and `resunetpp.training.reproduce`.

`train`'s options are made from `TrainConfig`'s fields: each field whose `Setting` is a flag becomes
`--name-with-dashes`, with the field's help, choices and range; the settings' precedence (defaults or the
resumed run's, then `--config FILE`, then the flags) is `resunetpp.training.config.settings`.
"""

from __future__ import annotations

import inspect
import os
import shlex
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, get_type_hints

import typer
from rich.console import Console
from rich.table import Table

from resunetpp.cli.common import ExitCode, choices, errors, number
from resunetpp.data.layouts import dataset_name
from resunetpp.evaluation.evaluator import PROTOCOLS
from resunetpp.evaluation.evaluator import evaluate as run_evaluate
from resunetpp.evaluation.metrics import BENCHMARK_NAMES, METRIC_NAMES
from resunetpp.hub import DEFAULT_PRETRAINED, list_pretrained
from resunetpp.inference.segmenter import MIN_AREA
from resunetpp.training.config import TrainConfig, settings
from resunetpp.training.loop import train as run_train
from resunetpp.training.reproduce import MODELS
from resunetpp.training.reproduce import reproduce as run_reproduce

Protocol = choices("Protocol", PROTOCOLS)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("reproduce")(reproduce)


def flag_name(name: str) -> str:
    """The flag of a `TrainConfig` field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def _value_type(f: Field) -> type:
    """The type a field's flag parses: its annotation without None, or a str Enum of its choices."""
    names = f.metadata["setting"].names()
    if names:
        return choices(f.name.title().replace("_", ""), names)  # choices are the library's own names
    hint = get_type_hints(TrainConfig)[f.name]
    kinds = [t for t in getattr(hint, "__args__", (hint,)) if t is not type(None)]
    return kinds[0]


def _default_text(f: Field) -> str:
    """" Default: 256." for a field with a default worth showing; a None default is told by the help itself."""
    if f.default is MISSING or f.default is None or f.default is False or f.default == "":
        return ""
    return f" Default: {f.default:g}." if isinstance(f.default, float) else f" Default: {f.default}."


def _option(f: Field) -> inspect.Parameter:
    """The typer option of a `TrainConfig` field. It defaults to None (not given), so the config file and
    the resumed run show through; the help shows the library's default instead."""
    s = f.metadata["setting"]
    kind = _value_type(f)
    flag = flag_name(f.name)
    if kind is bool and f.default is None:  # on, off, or not given: --amp/--no-amp
        flag = f"{flag}/--no-{flag[2:]}"
    checks: dict[str, Any] = {}
    if kind is int:
        checks = {"min": s.low, "max": s.high}
    elif kind is float and (s.low is not None or s.high is not None):
        checks = {"callback": number(s.low, s.high, above=s.above)}  # finite, in range
        if not s.above:
            checks.update(min=s.low, max=s.high)  # shown in the help as a range
    option = typer.Option(None, flag, help=s.help + _default_text(f), show_default=False,
                          **{k: v for k, v in checks.items() if v is not None})
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None)


FLAG_FIELDS = [f for f in fields(TrainConfig) if f.metadata["setting"].flag]
SETTING_FLAGS = {f.name: flag_name(f.name) for f in FLAG_FIELDS}  # for the messages of refused settings


def _with_setting_options(command):
    """`command`'s own parameters, then an option for each `TrainConfig` field that is a flag, gathered in
    its `**flags`."""
    own = [p for p in inspect.signature(command).parameters.values() if p.kind is not p.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*own, *map(_option, FLAG_FIELDS)], return_annotation=None)
    return command


@_with_setting_options
def train(
    config: Path | None = typer.Option(None, "--config", help="YAML, TOML or JSON file of settings (the same "
                                       "names, e.g. batch_size: 8); flags override it."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this folder from its last.pt, "
                                       "with its settings (flags and --config override them)."),
    **flags: Any,
) -> None:
    """Train a model (paper recipe by default). Works as is under `torchrun --nproc_per_node=N`."""
    flags = {k: v.value if hasattr(v, "value") else v for k, v in flags.items()}  # choices are str Enums
    with errors(flags=SETTING_FLAGS):
        cfg = settings(resume=resume, config_file=config, overrides=flags)
    out = Path(resume or cfg.out)
    try:
        with errors(flags=SETTING_FLAGS):
            run = run_train(cfg, resume=resume)
    except KeyboardInterrupt:  # train() has said where the last checkpoint is
        _advise_resume(out)
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except typer.Exit as e:
        if e.exit_code == ExitCode.PARTIAL:  # stopped part-way: a NaN loss, a full disk
            _advise_resume(out)
        raise
    if _first_process():
        typer.echo(f"run folder: {run}")


def _first_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun, print once


def _advise_resume(out: Path) -> None:
    """The command that continues a stopped run, when it has a checkpoint to continue from."""
    if (out / "last.pt").is_file() and _first_process():
        typer.echo(f"continue with: resunetpp train --resume {out}", err=True)


def evaluate(
    weights: Path | None = typer.Option(None, "--weights", help="Run folder (config.json + model.safetensors) or a "
                                        "bundled model's name. Default: the bundled ResUNet++ (Kvasir-SEG)."),
    data: Path = typer.Option(..., "--data", help="Dataset folder or prepared cache (any dataset)."),
    split: str = typer.Option("test", help="test | val | train | all | official | grouped (the test part of the "
                              "committed published or leak-free split) | a split JSON | a text file of ids."),
    out: Path | None = typer.Option(None, "--out", help="Report folder (default WEIGHTS/eval/DATASET-SPLIT)."),
    threshold: float | None = typer.Option(None, callback=number(0, 1), help="Override config.json's threshold."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    batch_size: int = typer.Option(16, min=1, help="Images per forward pass."),
    limit: int | None = typer.Option(None, min=1, help="Only the first N ids of the split."),
    native: bool = typer.Option(False, "--native", help="Score at each mask's original size."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out pairs that fail the dataset check."),
    protocol: Protocol = typer.Option(Protocol("default"), "--protocol", help="polyp-benchmark adds mDice, mIoU, wFm, "
                                      "Sm, meanEm, maxEm, MAE by PySODMetrics, at each mask's original size."),
    min_area: float = typer.Option(0.0, min=0.0, max=0.99, callback=number(0, 0.99),
                                   help="Drop predicted components smaller than this "
                                   "fraction of the image first, as predict/video/serve do "
                                   f"({MIN_AREA} there); 0 = the paper's protocol."),
) -> None:
    """Score a trained model: Dice, IoU, recall, precision, F2, accuracy, 2-class mIoU (mean and pooled), the
    paper's Keras mIoU, per-polyp detection; `--protocol polyp-benchmark` adds the benchmark's columns."""
    with errors():
        if out is None:  # beside a run; bundled models' reports go under runs/eval/, not into the package
            own = weights is not None and str(weights) not in list_pretrained()
            base = weights / "eval" if own else Path("runs") / "eval" / str(weights or DEFAULT_PRETRAINED)
            out = base / f"{dataset_name(data)}-{Path(split).stem}"
        result = run_evaluate(weights, data, split=split, out=out, threshold=threshold, device=device,
                              batch_size=batch_size, limit=limit, native=native, skip_bad=skip_bad,
                              protocol=protocol.value, min_area=min_area)
    s = result.settings
    table = Table(title=f"{s['model']} on {s['dataset']} ({s['split']}, {result.summary['images']} images)")
    for col in ("metric", "mean over images", "pooled"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for k in METRIC_NAMES:
        table.add_row(k, f"{result.summary['mean'][k]:.4f}", f"{result.summary['pooled'][k]:.4f}")
    table.add_row("miou_keras (the paper's mIoU)", "", f"{result.summary['miou_keras']:.4f}")
    console = Console(width=120)
    console.print(table)
    if "benchmark" in result.summary:
        bench = Table(title="polyp benchmark (PySODMetrics, original mask size)")
        for k in BENCHMARK_NAMES:
            bench.add_column(k, justify="right")
        bench.add_row(*(f"{result.summary['benchmark'][k]:.4f}" for k in BENCHMARK_NAMES))
        console.print(bench)
    d = result.summary["detection"]
    typer.echo(f"detection: {d['polyps']} polyps; sensitivity {d['sensitivity_iou50']:.3f} at IoU >= 0.5, "
               f"{d['sensitivity_any']:.3f} at any overlap; false-positive components per image "
               f"{d['fp_per_image_iou50']:.2f} (IoU < 0.5), {d['fp_per_image_any']:.2f} (no overlap); "
               f"per-polyp Dice median {d['polyp_dice_median']:.3f}")
    typer.echo(f"reports: {out}")


def reproduce(
    table: str = typer.Argument(..., help="table1 (Kvasir-SEG) or table2 (CVC-ClinicDB)."),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (default ../shared/data/<dataset>)."),
    epochs: int | None = typer.Option(None, min=1, help="Epochs per model (default 120; 2 with --quick)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default runs/reproduce-<table>)."),
    quick: bool = typer.Option(False, "--quick", help="64x64, 2 epochs, 16 ids per split: a CPU pipeline check."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    size: int | None = typer.Option(None, min=1, help="Override the input size."),
    limit: int | None = typer.Option(None, min=1, help="Override the number of ids per split."),
    batch_size: int | None = typer.Option(None, min=1, help="Override the batch size."),
    models: str | None = typer.Option(None, help="Comma-separated subset of unet,resunet,resunet-mod,resunetpp."),
    grouped: bool | None = typer.Option(None, "--grouped/--no-grouped", help="Also train and test on the leak-free "
                                        "split (default: table2 yes, by sequence; table1 no)."),
    tabulate: bool = typer.Option(False, "--tabulate", help="Train nothing: tabulate the runs already in --out "
                                  "(a run without weights by its own eval/metrics.json)."),
) -> None:
    """Train the paper's four models and write table.md, results.json and fig3.png."""
    # the command as given (rebuilt from the parsed options, so it is right however the CLI was invoked)
    given = {"--data": data, "--epochs": epochs, "--out": out, "--quick": quick, "--device": device, "--size": size,
             "--limit": limit, "--batch-size": batch_size, "--models": models,
             **({} if grouped is None else {"--grouped" if grouped else "--no-grouped": True}), "--tabulate": tabulate}
    command = ["resunetpp", "reproduce", table]
    for flag, value in given.items():
        if value is True:
            command.append(flag)
        elif value not in (None, False) and not (flag == "--device" and value == "auto"):
            command += [flag, str(value)]
    with errors():
        chosen = tuple(m.strip() for m in models.split(",")) if models else MODELS
        path = run_reproduce(table, data=data, out=out, epochs=epochs, quick=quick, device=device, size=size,
                             limit=limit, batch_size=batch_size, models=chosen, command=shlex.join(command),
                             grouped=grouped, train_runs=not tabulate)
    typer.echo((path / "table.md").read_text())
    typer.echo(f"outputs: {path}")
