"""What the README and docs/ claim, checked against the code where it can be, without the datasets:

* weights ship: every bundled model (found in the package's weights/ folder) is named in the README and in
  docs/models.md with the test Dice of its config.json and the size on disk the README states; no page says
  that none ship;
* examples: every `resunetpp ...` line in a ```bash block parses with the real command line (commands,
  options, choices; a path that only exists beside a checkout may be missing here), and none points
  `--weights` at a runs/ folder that its page has not trained first (the bundled names work everywhere);
* the pages' other checkable statements: the CVC-ClinicDB evaluate command, the video codec, the quick CPU
  run's duration, the page's post-processing, site/ ignored.

tests/docs/test_docs_commands.py runs the same commands for real where the datasets are present.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from helpers.docs import strip_comment
from resunetpp.catalog import bundled
from resunetpp.cli import app

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]


def text(page: str) -> str:
    return (ROOT / page).read_text()


def bash_lines(page: str) -> list[str]:
    """The command lines of a page's ```bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text(page), re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = strip_comment(line).strip()
            if line:
                out.append(line)
    return out


def resunetpp_argv(line: str) -> list[str] | None:
    if re.match(r"^\w+=", line):  # NAME=value resunetpp ...
        line = line[line.index(" resunetpp ") + 1:] if " resunetpp " in line else ""
    if line.startswith("torchrun "):
        argv = shlex.split(line)
        return argv[argv.index("$(which resunetpp)") + 1:]
    return shlex.split(line)[1:] if line.startswith("resunetpp ") else None


def parse(argv: list[str]) -> None:
    """Parse `resunetpp ARGV` with the real parser, running nothing."""
    command = typer.main.get_command(app)
    ctx = command.make_context("resunetpp", [argv[0]], resilient_parsing=True)
    name = "resunetpp"
    while hasattr(command, "get_command"):
        name, argv = argv[0], argv[1:]
        sub = command.get_command(ctx, name)
        assert sub is not None, f"no command {name!r}"
        command = sub
        if hasattr(command, "get_command"):
            ctx = command.make_context(name, [argv[0]], parent=ctx, resilient_parsing=True)
    try:
        command.make_context(name, list(argv), parent=ctx)
    except click.BadParameter as e:
        if "does not exist" not in str(e):  # a path beside a checkout (../shared/data) is fine missing here
            raise


def test_weights_ship_and_the_pages_say_so():
    weights = bundled()
    assert weights, "no bundled weights found in src/resunetpp/weights"
    readme, models = text("README.md"), text("docs/models.md")
    for w in weights:
        assert w.test_dice is not None, w.name
        for page, body in (("README.md", readme), ("docs/models.md", models)):
            assert f"`{w.name}`" in body, f"{page} does not name the bundled {w.name}"
            assert f"{w.test_dice:.4f}" in body, f"{page}: {w.name}'s test Dice {w.test_dice:.4f} not stated"
    sizes = {f"{w.size_mib:.1f} MiB" for w in weights}
    claimed = set(re.findall(r"(\d+\.\d) MiB each", readme))
    assert claimed and {f"{c} MiB" for c in claimed} <= sizes, (claimed, sizes)
    for page in PAGES:
        body = text(page).lower()
        for stale in ("none ship", "no weights ship", "weights do not ship", "come with a later release"):
            assert stale not in body, f"{page} says {stale!r}, but {len(weights)} bundled models ship"


def test_every_documented_command_parses_with_the_cli():
    checked = 0
    for page in PAGES:
        for line in bash_lines(page):
            argv = resunetpp_argv(line)
            if argv:
                try:
                    parse(argv)
                except (click.ClickException, AssertionError) as e:
                    raise AssertionError(f"{page}: `{line}` does not parse: {e}") from None
                checked += 1
    assert checked > 30


def test_examples_use_bundled_names_not_runs_a_newcomer_lacks():
    for page in PAGES:
        trained = set()
        for line in bash_lines(page):
            argv = resunetpp_argv(line) or []
            if argv[:1] == ["train"]:
                if "--out" in argv:
                    trained.add(argv[argv.index("--out") + 1])
                if "--config" in argv:
                    trained.add("runs/" + Path(argv[argv.index("--config") + 1]).stem)
            for flag in ("--weights", "-w"):
                if flag in argv and argv[argv.index(flag) + 1].startswith("runs/"):
                    run = argv[argv.index(flag) + 1]
                    assert run in trained, f"{page}: `{line}` needs {run}, which the page never trains; " \
                                           "use a bundled name (resunetpp models)"


def test_the_other_checkable_statements():
    evaluation = text("docs/evaluation.md")
    cvc = [w.name for w in bundled() if w.dataset == "cvc-clinicdb"]
    for name in cvc:  # the CVC-ClinicDB evaluate command is in the docs, not only its model card
        assert any(f"--weights {name}" in line and "CVC-ClinicDB" in line and line.startswith("resunetpp evaluate")
                   for line in bash_lines("docs/evaluation.md")), evaluation[:300]
    inference = text("docs/inference.md")
    assert "H.264" in inference and "writes an\nmp4v" not in inference and "mp4v overlay video" not in inference
    try:
        import tempfile

        import av  # noqa: F401

        from resunetpp.inference.video import H264, open_writer

        with tempfile.TemporaryDirectory() as tmp:
            writer, codec, notice = open_writer(Path(tmp) / "x.mp4", 25.0, (64, 48))
            writer.release()
        assert codec == H264 and not notice  # what the docs promise, where PyAV is installed
    except ImportError:
        pass
    training = text("docs/training.md")
    assert "under a minute" not in training  # the quick CPU run took 3-8 minutes on 2 cores
    serve = text("docs/serve.md")
    assert "min_area" in serve and "no polyp found" in serve
    assert "site/" in (ROOT / ".gitignore").read_text().split()


@pytest.mark.parametrize("page", PAGES)
def test_no_page_points_at_a_missing_repository_file(page):
    """Backticked repository paths (src/..., tests/..., benchmarks/..., configs/..., tools/...) exist."""
    for path in set(re.findall(r"`((?:src|tests|benchmarks|configs|tools)/[\w./-]+\.\w+)`", text(page))):
        assert (ROOT / path).exists(), f"{page} names {path}, which does not exist"
