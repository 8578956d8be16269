"""`resunetpp models`: the registry's architectures, then the bundled trained weights (found in the package's
weights/ folder, `resunetpp.catalog`), each usable as `--weights NAME`."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from resunetpp.catalog import bundled, default_name
from resunetpp.networks.registry import count_parameters, create_model, list_models, model_info


def register(app: typer.Typer) -> None:
    app.command("models")(models)


def models() -> None:
    """List the architectures (parameters, default loss) and the bundled trained weights (name, architecture,
    dataset, test Dice, size on disk)."""
    console = Console(width=140)
    table = Table(title="resunetpp models")
    for col in ("name", "parameters", "default loss", "description"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for name in list_models():
        info = model_info(name)
        n = count_parameters(create_model(name))
        table.add_row(name, f"{n:,}", info.default_loss, info.description)
    console.print(table)
    weights = bundled()
    table = Table(title="bundled trained weights (--weights NAME; research use only)")
    for col in ("name", "architecture", "dataset", "test Dice", "size"):
        table.add_column(col, justify="right" if col in ("test Dice", "size") else "left")
    for w in weights:
        table.add_row(w.name, w.model or "?", w.dataset or "?", "?" if w.test_dice is None else f"{w.test_dice:.4f}",
                      f"{w.size_mib:.1f} MiB")
    if weights:
        console.print(table)
        typer.echo(f"default (no --weights): {default_name()}; each has a model card: "
                   "resunetpp/weights/NAME/MODEL_CARD.md")
    else:
        typer.echo("no bundled trained weights in this install")
