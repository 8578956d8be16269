from typer.testing import CliRunner

from resunetpp import __version__
from resunetpp.cli import app

runner = CliRunner()


def test_help_and_version():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "models" in r.output
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_models_table():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0, r.output
    for text in ("resunetpp", "4,062,993", "unet", "31,031,745", "resunet-mod", "mse"):
        assert text in r.output
