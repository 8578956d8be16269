"""Every command and code example shown in the README and docs/ is checked here, so the docs cannot drift.

Each shell command in a ```bash block, each `$ command` line of an output block and each ```python block is
either run for real, in a scratch copy of the repository's layout (`../shared/data` reachable as in a
checkout, synthetic images, videos and broken files where the docs name them, `/tmp/...` redirected into it),
or, where running it would take a GPU, the network, a server or minutes of CPU, parsed by the real command
line parser (every option, choice and existing path must still be accepted); `PARSE_ONLY` says why, and which
test runs the same work. Output shown under a `$ command` that is run must appear in what it prints.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer

import resunetpp
import resunetpp.training.loop
from helpers.docs import strip_comment
from helpers.inference import disc_image, write_video
from resunetpp.cli import app
from resunetpp.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
SHARED = ROOT.parent / "shared"

# command prefix -> why it is only parsed (and what runs the same work)
PARSE_ONLY = {
    "python -m pip install": "the set-up: .ci/run runs it (test_docs.py checks it is CI's command)",
    "python -m pytest": "the set-up: this suite",
    "resunetpp serve": "a server that runs until stopped; test_serve.py and test_serve_browser.py start it",
    "RESUNETPP_TOKEN=": "a server; test_serve.py checks the token",
    "resunetpp evaluate --data": "the bundled model on 100 full-size images; test_bundled.py evaluates the same",
    "resunetpp reproduce table1 --out results/table1 --tabulate": "rewrites the committed table; "
                                                                   "test_reproduce.py tabulates returned runs",
    "resunetpp reproduce table": "GPU hours; test_reproduce.py runs the quick reproduction",
    "resunetpp train --model resunetpp --data": "the paper's recipe (GPU hours); test_train.py runs the loop",
    "resunetpp train --resume": "test_train_failures.py kills and resumes a run",
    "resunetpp train --model resunetpp-lite": "distils on a whole dataset (an hour on 2 CPU cores); test_distill.py "
                                              "trains with a teacher",
    "OMP_NUM_THREADS=1 resunetpp train --config configs/lite": "the lite models' CPU training (an hour); "
                                                               "test_distill.py trains with a teacher",
    "torchrun": "several processes; test_train.py's torchrun test runs DDP",
    "resunetpp train --config configs/strong-kvasir.yaml": "the strong recipe (a GPU); test_ema_multi_scale.py, "
                                                           "test_losses_structure.py and test_augment_strong.py "
                                                           "test its switches, test_device_run.py its jobs",
    "resunetpp evaluate --weights runs/strong-kvasir-official": "needs that GPU run; test_official_split.py "
                                                                 "resolves --split official",
    "resunetpp train --data ../shared/data/Kvasir-SEG:": "two whole datasets at full size (GPU hours); "
                                                         "test_multi_data.py trains on two",
    "resunetpp evaluate --weights runs/polyp": "needs that run; test_device_run.py scores the general model",
    "resunetpp data download": "the network; test_data_download.py serves an archive locally",
    "resunetpp data prepare": "a minute per dataset; test_data_cache.py prepares real subsets",
    "python benchmarks/loader.py": "times a full-size training step",
    "bash benchmarks/device_run.sh --budget": "a GPU; test_device_run.py runs the same script with --dry-run",
    "bash benchmarks/device_run.sh --trainings-only": "a GPU; test_device_run.py runs its jobs with --dry-run",
    "bash benchmarks/device_run.sh --dry-run": "test_device_run.py runs it (two minutes)",
    "bash benchmarks/device_run.sh --fetch-data": "a minute; its two `data prepare` commands are parsed",
    "resunetpp video pan.mp4": "a recorded run of an int8 model that benchmarks/latency.py writes",
}


def blocks(doc: str) -> list[tuple[str, str]]:
    """(language, text) of each fenced block of a Markdown file."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", (ROOT / doc).read_text(),
                                                          re.S | re.M)]


def steps(doc: str) -> list[tuple[str, str, list[str]]]:
    """("shell", command, expected output lines) and ("python", code, []) in document order."""
    out = []
    for lang, text in blocks(doc):
        if lang == "python":
            out.append(("python", text, []))
        elif lang == "bash":
            for line in re.sub(r"\\\n\s*", " ", text).splitlines():
                if strip_comment(line):
                    out.append(("shell", strip_comment(line), []))
        elif lang == "":
            for chunk in re.split(r"^(?=\$ )", text, flags=re.M):
                if chunk.startswith("$ "):
                    command, _, shown = chunk[2:].partition("\n")
                    expected = [strip_comment(s) for s in shown.splitlines()]
                    out.append(("shell", command.strip(), [s for s in expected if s and s.strip() != "..."]))
    return out


def parse_only_reason(command: str) -> str | None:
    return next((why for prefix, why in PARSE_ONLY.items() if command.startswith(prefix)), None)


def parse_resunetpp(argv: list[str]) -> None:
    """Parse `resunetpp ARGV` with the real parser (options, choices, types, existing paths), running nothing."""
    command = typer.main.get_command(app)  # typer's own copy of click
    ctx = command.make_context("resunetpp", [argv[0]])
    while hasattr(command, "get_command"):  # a group: descend to the subcommand
        name, argv = argv[0], argv[1:]
        command = command.get_command(ctx, name)
        assert command is not None, f"no command {name!r}"
        if hasattr(command, "get_command"):
            ctx = command.make_context(name, [argv[0]], parent=ctx)
    command.make_context(name, list(argv), parent=ctx)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(command: str) -> None:
    if command.startswith(("python -m pip install", "python -m pytest")):
        assert command.split("#")[0].strip() in (ROOT / ".ci" / "run").read_text()
        return
    if re.match(r"^\w+=", command):  # an environment prefix NAME=...: the command proper starts at `resunetpp`
        command = command[command.index(" resunetpp ") + 1:]
    argv = shlex.split(command)
    if argv[0] == "torchrun":
        argv = argv[argv.index("$(which resunetpp)") + 1:]
        parse_resunetpp(argv)
    elif argv[0] == "resunetpp":
        parse_resunetpp(argv[1:])
    elif argv[:2] == ["bash", "benchmarks/device_run.sh"] and argv[2] == "--fetch-data":
        source, size = argv[3], (argv[4] if len(argv) > 4 else "256")
        script = (ROOT / "benchmarks" / "device_run.sh").read_text()
        prepares = re.findall(r"^\s*(resunetpp data prepare .*)$", script, re.M)
        assert len(prepares) == 2
        for line in prepares:
            line = line.replace("$SRC", source).replace("$SIZE", size).replace("$Q", "90")
            parse_resunetpp(shlex.split(line)[1:])
    elif argv[:2] == ["bash", "benchmarks/device_run.sh"]:
        _script("device_run").parser().parse_args(argv[2:])
    elif argv[:2] == ["python", "benchmarks/loader.py"]:
        _script("loader").parser().parse_args(argv[2:])
    else:
        raise AssertionError(f"no parser for {command!r}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder laid out like a checkout: ../shared beside it, configs/ and benchmarks/ in it, and the
    inputs the docs name (frames/, frame.png, videos, a broken dataset, a folder with broken files)."""
    if not (SHARED / "data" / "Kvasir-SEG").is_dir():
        pytest.skip(f"the docs' commands read the real datasets: {SHARED / 'data'} not found")
    base = tmp_path_factory.mktemp("docs")
    (base / "shared").symlink_to(SHARED)
    ws = base / "repo"
    ws.mkdir()
    for name in ("configs", "benchmarks", "src"):
        (ws / name).symlink_to(ROOT / name)
    rng = np.random.default_rng(0)
    (ws / "frames").mkdir()
    for i, (h, w) in enumerate([(96, 128), (120, 160)]):
        write_image(ws / "frames" / f"frame{i}.png", disc_image(rng, h, w)[0])
    write_image(ws / "frame.png", disc_image(rng, 100, 120)[0])
    write_image(ws / "img1.png", disc_image(rng, 64, 80)[0])
    write_image(ws / "img2.jpg", disc_image(rng, 90, 70)[0])
    write_video(ws / "colonoscopy.mp4", [disc_image(rng, 72, 96)[0] for _ in range(4)], fps=25.0)
    (ws / "mixed").mkdir()
    write_image(ws / "mixed" / "good.png", disc_image(rng, 64, 64)[0])
    (ws / "mixed" / "broken.jpg").write_bytes(b"not a jpeg")
    (ws / "mixed" / "empty.png").write_bytes(b"")
    broken = ws / "tmp" / "broken"  # data.md's /tmp/broken
    (broken / "images").mkdir(parents=True)
    (broken / "masks").mkdir()
    for i in ("1", "3", "5"):
        image, mask = disc_image(rng, 40, 48)
        write_image(broken / "images" / f"{i}.jpg", image)
        write_image(broken / "masks" / f"{i}.png", mask.astype(np.uint8) * 255)
    write_image(broken / "images" / "5.png", disc_image(rng, 40, 48)[0])
    write_image(broken / "images" / "4.jpg", disc_image(rng, 40, 48)[0])
    (broken / "images" / "2.jpg").write_bytes(b"")
    (broken / "masks" / "2.png").write_bytes(b"")
    (broken / "images" / "Thumbs.db").write_bytes(b"\0" * 16)
    # named by parse-only commands, which check that paths exist
    (ws / "pan.mp4").write_bytes(b"")
    (ws / "onnx").mkdir()
    (ws / "onnx" / "resunetpp-int8-fp32.onnx").write_bytes(b"")
    (ws / "runs").mkdir()
    (ws / "runs" / "resunetpp-kvasir").mkdir()
    (ws / "CVC-ClinicDB.zip").write_bytes(b"")
    # the quick training the README and docs/index.md show; other pages call its result runs/kvasir, runs/mine
    run_shell(ws, QUICK, [])
    for name in ("kvasir", "mine"):
        shutil.copytree(ws / "runs" / "quick-cpu", ws / "runs" / name)
    return ws


QUICK = "resunetpp train --config configs/quick-cpu.yaml"


def write_image(path: Path, rgb: np.ndarray) -> None:
    assert cv2.imwrite(str(path), rgb[..., ::-1] if rgb.ndim == 3 else rgb), path


def _env(ws: Path) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT / "tests"), COLUMNS="120", NO_COLOR="1")
    env.pop("CI", None)
    return env


def run_shell(ws: Path, command: str, expected: list[str]) -> None:
    command = command.replace("/tmp/", "tmp/")
    expected = [line.replace("/tmp/", "tmp/") for line in expected]
    code = None
    if m := re.search(r';\s*echo "?(?:exit )?\$\?"?$', command):  # `cmd; echo $?`: the exit code is shown
        command = command[:m.start()]
        code = int(re.search(r"(\d+)$", expected.pop()).group(1))
    res = subprocess.run(["bash", "-c", command], cwd=ws, env=_env(ws), capture_output=True, text=True, timeout=7200)
    printed = res.stdout + res.stderr
    assert res.returncode == (0 if code is None else code), f"{command}: exit {res.returncode}\n{printed[-3000:]}"
    norm = {" ".join(line.split()) for line in printed.splitlines()}
    rows = [line for line in expected if set(line) - set(" ─━┏┓┗┛┡┩└┘┳┻╇┴┬┼╋-")]  # not table rules (widths vary)
    missing = [line for line in rows if " ".join(line.split()) not in norm]
    assert not missing, f"{command}: shown output not printed: {missing}\nprinted:\n{printed[-3000:]}"


def run_python(ws: Path, code: str, namespace: dict, monkeypatch) -> None:
    """One ```python block, in the namespace of the page's earlier blocks (a page reads as one session)."""
    monkeypatch.chdir(ws)

    def train(cfg: TrainConfig, resume=None) -> Path:  # training.md's example: the quick run stands in
        assert isinstance(cfg, TrainConfig) and cfg.model in resunetpp.list_models() and Path(cfg.data).is_dir()
        shutil.copytree(ws / "runs" / "quick-cpu", cfg.out, dirs_exist_ok=True)
        return Path(cfg.out)

    monkeypatch.setattr(resunetpp.training.loop, "train", train)
    exec(compile(code, "<docs>", "exec"), namespace)


def test_every_command_is_checked_and_every_exception_is_still_in_the_docs():
    commands = [text for doc in DOCS for kind, text, _ in steps(doc) if kind == "shell"]
    assert len(commands) > 30 and QUICK in commands
    for prefix in PARSE_ONLY:
        assert any(c.startswith(prefix) for c in commands), f"PARSE_ONLY lists {prefix!r}, no longer in the docs"


def test_parse_catches_a_misspelt_option_and_a_bad_choice(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(Exception, match="No such option: --epoch"):
        parse("resunetpp train --config configs/quick-cpu.yaml --epoch 3")
    with pytest.raises(Exception, match="heavy"):
        parse("resunetpp data show ../shared/data/Kvasir-SEG --augment heavy")
    with pytest.raises(AssertionError, match="no command 'inspect'"):
        parse("resunetpp data inspect ../shared/data/Kvasir-SEG")
    parse("resunetpp data show ../shared/data/Kvasir-SEG --augment paper")


@pytest.mark.parametrize("doc", ["docs/index.md", "README.md", "docs/data.md", "docs/models.md", "docs/training.md",
                                 "docs/evaluation.md", "docs/inference.md", "docs/reproduce.md", "docs/serve.md",
                                 "docs/cli.md", "docs/benchmarks.md", "docs/api.md"])
@pytest.mark.slow
def test_docs_commands_run(doc, workspace, monkeypatch):
    assert set(DOCS) >= {doc}
    ran, namespace = {QUICK}, {"__name__": "docs_example"}
    for kind, text, expected in steps(doc):
        if kind == "python":
            run_python(workspace, text, namespace, monkeypatch)
        elif parse_only_reason(text):
            monkeypatch.chdir(workspace)
            parse(text)
        elif text not in ran:
            run_shell(workspace, text, expected)
            ran.add(text)


def test_the_parametrized_list_names_every_page():
    (names,) = [m.args[1] for m in test_docs_commands_run.pytestmark if m.name == "parametrize"]
    assert sorted(names) == sorted(DOCS)
