"""`resunetpp train`, `resunetpp evaluate` and `resunetpp reproduce`: thin layers over
`resunetpp.training.loop`, `resunetpp.evaluation.evaluator` and `resunetpp.training.reproduce`.

Settings precedence for `train`: the library defaults (the paper's recipe), then `--config FILE`
(YAML or TOML with the same names, e.g. `batch_size: 8`), then the flags given on the command line.
`--resume RUN` starts from that run's `train_config.yaml` instead of the defaults.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import typer

from resunetpp.cli.common import ExitCode, choices, errors, number
from resunetpp.evaluation.evaluator import PROTOCOLS
from resunetpp.inference.segmenter import MIN_AREA
from resunetpp.networks.registry import list_models
from resunetpp.training.config import AUGMENTS, COMPILE_MODES, OPTIMIZERS, SCHEDULES
from resunetpp.training.losses import LOSSES

# the choices are the library's own tuples: a model, loss or schedule added there is offered here at once
Model = choices("Model", list_models())
Loss = choices("Loss", tuple(LOSSES))
Optimizer = choices("Optimizer", OPTIMIZERS)
Schedule = choices("Schedule", SCHEDULES)
AugmentPreset = choices("AugmentPreset", AUGMENTS)
Compile = choices("Compile", COMPILE_MODES)
Protocol = choices("Protocol", PROTOCOLS)

def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("reproduce")(reproduce)


def train(
    model: Model | None = typer.Option(None, help="Registry name (default resunetpp)."),
    data: str | None = typer.Option(None, "--data", help="Dataset folder or prepared cache."),
    split: str | None = typer.Option(None, help="Split JSON (default: the committed split of a known dataset)."),
    size: int | None = typer.Option(None, min=1, help="Square input size (default 256)."),
    epochs: int | None = typer.Option(None, min=1, help="Epochs (default 120)."),
    batch_size: int | None = typer.Option(None, min=1, help="Global batch size over all processes (default 16)."),
    lr: float | None = typer.Option(None, callback=number(0, above=True), help="Learning rate (default 1e-4)."),
    optimizer: Optimizer | None = typer.Option(None, help="Default adam."),
    loss: Loss | None = typer.Option(None, help="Default: the model's own loss."),
    schedule: Schedule | None = typer.Option(None, help="Default sgdr."),
    augment: AugmentPreset | None = typer.Option(None, help="Default paper."),
    seed: int | None = typer.Option(None, min=0, help="Random seed (default 0)."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N (default auto)."),
    amp: bool | None = typer.Option(None, "--amp/--no-amp", help="bf16 autocast (default on for CUDA, off for CPU)."),
    out: str | None = typer.Option(None, "--out", help="Run folder (default runs/resunetpp)."),
    config: Path | None = typer.Option(None, "--config", help="YAML or TOML file of settings; flags override it."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this folder from its last.pt."),
    skip_bad: bool | None = typer.Option(None, "--skip-bad", help="Train on the good pairs of a failing dataset."),
    early_stop: int | None = typer.Option(None, "--early-stop", min=0, help="Patience in epochs (0: off)."),
    limit: int | None = typer.Option(None, min=1, help="Use only the first N train/val/test ids."),
    compile: Compile | None = typer.Option(None, "--compile", help="torch.compile the model (reduce-overhead: CUDA "
                                           "graphs); default auto: on CUDA for long runs."),
    eval_every: int | None = typer.Option(None, "--eval-every", min=1, help="Validate and write last.pt every N "
                                          "epochs (default 1; the last epoch always)."),
    time_limit: float | None = typer.Option(None, "--time-limit", callback=number(0, above=True),
                                            help="Seconds: stop resumably before an epoch that would not fit."),
    sync_bn: bool | None = typer.Option(None, "--sync-bn", help="SyncBatchNorm across torchrun's CUDA processes."),
    teacher: str | None = typer.Option(None, "--teacher", help="Distil from this model (a bundled name or run "
                                       "folder): its probabilities join the masks as targets."),
    distill_weight: float | None = typer.Option(None, "--distill-weight", min=0.0, max=1.0,
                                                help="Share of the teacher's term in the loss (default 0.5)."),
    init: str | None = typer.Option(None, "--init", help="Start from these weights (a bundled name or run "
                                    "folder) instead of random ones: fine-tuning."),
) -> None:
    """Train a model (paper recipe by default). Works as is under `torchrun --nproc_per_node=N`."""
    flags = {"model": model, "data": data, "split": split, "size": size, "epochs": epochs, "batch_size": batch_size,
             "lr": lr, "optimizer": optimizer, "loss": loss, "schedule": schedule, "augment": augment, "seed": seed,
             "device": device, "amp": amp, "out": out, "skip_bad": skip_bad, "early_stop": early_stop, "limit": limit,
             "compile": compile, "eval_every": eval_every, "time_limit": time_limit,
             "sync_bn": sync_bn, "teacher": teacher, "distill_weight": distill_weight,
             "init": init}
    flags = {k: v.value if hasattr(v, "value") else v for k, v in flags.items()}  # choices are str Enums
    try:
        with errors():
            run = _run_train(flags, config, resume)
    except KeyboardInterrupt:  # train() has said where the last checkpoint is
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        typer.echo(f"run folder: {run}")


def _run_train(flags: dict, config: Path | None, resume: Path | None) -> Path:
    """Settings: the defaults (or the resumed run's), then the config file, then the flags; then train."""
    from resunetpp.training.loop import TrainConfig, config_from_dict, read_config_file
    from resunetpp.training.loop import train as run_train

    values: dict = {}
    if resume is not None:
        saved = resume / "train_config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"{saved}: not found; --resume takes a run folder written by `resunetpp train`")
        known = TrainConfig.__dataclass_fields__
        values = {k: v for k, v in read_config_file(saved).items() if k in known}
    if config is not None:
        values.update(read_config_file(config))
    values.update({k: v for k, v in flags.items() if v is not None})
    cfg = config_from_dict(values, str(config or "settings"))
    return run_train(cfg, resume=resume)


def evaluate(
    weights: Path | None = typer.Option(None, "--weights", help="Run folder (config.json + model.safetensors) or a "
                                        "bundled model's name. Default: the bundled ResUNet++ (Kvasir-SEG)."),
    data: Path = typer.Option(..., "--data", help="Dataset folder or prepared cache (any dataset)."),
    split: str = typer.Option("test", help="test | val | train | all | a split JSON | a text file of ids."),
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
    from rich.console import Console
    from rich.table import Table

    from resunetpp.data.layouts import dataset_name
    from resunetpp.evaluation.evaluator import evaluate as run_evaluate
    from resunetpp.evaluation.metrics import BENCHMARK_NAMES, METRIC_NAMES

    with errors():
        from resunetpp.hub import DEFAULT_PRETRAINED, list_pretrained

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
    from resunetpp.training.reproduce import MODELS
    from resunetpp.training.reproduce import reproduce as run_reproduce

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
