"""`resunetpp models`: the registry as a table."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("models")(models)


def models() -> None:
    """List the available models with their parameter counts and default losses."""
    from rich.console import Console
    from rich.table import Table

    from ..registry import count_parameters, create_model, list_models, model_info

    table = Table(title="resunetpp models")
    for col in ("name", "parameters", "default loss", "description"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for name in list_models():
        info = model_info(name)
        n = count_parameters(create_model(name))
        table.add_row(name, f"{n:,}", info.default_loss, info.description)
    Console(width=140).print(table)
