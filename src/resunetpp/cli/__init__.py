"""`resunetpp` command line: a thin layer over the library API.

Each command group lives in its own module and registers itself on `app`.
"""

from __future__ import annotations

import typer

from resunetpp.cli import data, infer, models, serve, train
from resunetpp.version import __version__

app = typer.Typer(
    name="resunetpp",
    help="ResUNet++ and its baselines for polyp segmentation in colonoscopy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"resunetpp {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """ResUNet++ and its baselines for polyp segmentation in colonoscopy."""


for module in (models, data, train, infer, serve):
    module.register(app)
