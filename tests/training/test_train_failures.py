"""Training's failure paths end in one line and the README's exit code, and lose no finished work."""

from __future__ import annotations

import pickle

import pytest
import torch
import yaml
from typer.testing import CliRunner

import resunetpp.training.loop as T
from helpers.training import TINY, tiny, write_discs
from resunetpp.cli import app

runner = CliRunner()


class NotATensor:  # pickled into a fake last.pt: torch.load(weights_only=True) must refuse it
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_discs(tmp_path_factory.mktemp("fail") / "discs")


def cli_train(data, out, *extra):
    args = ["train", "--data", str(data), "--out", str(out), "--model", "resunetpp", "--size", "32",
            "--batch-size", "4", "--lr", "3e-3", "--augment", "light", "--epochs", "2", "--device", "cpu", *extra]
    cfg = out.parent / f"{out.name}-kwargs.yaml"
    cfg.write_text(yaml.safe_dump({"model_kwargs": TINY, "progress": False}))
    return runner.invoke(app, [*args, "--config", str(cfg)])


def one_line_error(r):
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    return errors[0]


@pytest.fixture
def finished_run(data, tmp_path):
    r = cli_train(data, tmp_path / "run")
    assert r.exit_code == 0, r.output
    return tmp_path / "run"


def test_resume_refuses_a_pickle_payload_without_unsafe_advice(finished_run):
    with open(finished_run / "last.pt", "wb") as f:
        pickle.dump({"model": NotATensor()}, f)
    r = runner.invoke(app, ["train", "--resume", str(finished_run)])
    assert r.exit_code == 3
    line = one_line_error(r)
    assert "last.pt: refused" in line and "weights_only=False" not in r.output


def test_resume_names_a_truncated_checkpoint(finished_run):
    blob = (finished_run / "last.pt").read_bytes()
    (finished_run / "last.pt").write_bytes(blob[:len(blob) // 2])
    r = runner.invoke(app, ["train", "--resume", str(finished_run)])
    assert r.exit_code == 3
    line = one_line_error(r)
    assert "last.pt: damaged" in line and "model.safetensors" in line


def test_misspelt_model_kwargs_is_one_usage_line(data, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model_kwargs": {"filterz": [8]}}))
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--config", str(cfg),
                            "--device", "cpu", "--size", "32"])
    assert r.exit_code == 2
    assert "filterz" in one_line_error(r)


def test_ctrl_c_says_where_the_checkpoint_is(data, tmp_path, monkeypatch):
    real, calls = T.training_step, {"n": 0}

    def interrupting(*a, **k):
        step = real(*a, **k)

        def wrapped(images, masks, *rest):
            calls["n"] += 1
            if calls["n"] > 5:  # an epoch here is 4 steps: interrupt inside epoch 2
                raise KeyboardInterrupt
            return step(images, masks, *rest)
        return wrapped

    monkeypatch.setattr(T, "training_step", interrupting)
    r = cli_train(data, tmp_path / "run")
    assert r.exit_code == 130, r.output
    assert f"last checkpoint is {tmp_path / 'run' / 'last.pt'} (epoch 1)" in r.output
    assert f"resume the run in {tmp_path / 'run'} to continue" in r.output
    assert T.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_disk_full_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if obj.get("epoch") == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(T.torch, "save", full_disk)
    r = cli_train(data, tmp_path / "run")
    assert r.exit_code == 1
    line = one_line_error(r)
    assert "No space left on device" in line and "epoch 1 are intact" in line and "resume the run in" in line
    monkeypatch.setattr(T.torch, "save", real_save)
    assert T.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    assert not list((tmp_path / "run").glob("*.tmp*")), "a partial file was left behind"
    r = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert T.load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_sync_bn_without_several_cuda_processes_is_a_usage_error(data, tmp_path):
    r = cli_train(data, tmp_path / "run", "--sync-bn")
    assert r.exit_code == 2
    assert "sync_bn needs torchrun with several CUDA processes" in one_line_error(r)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_nan_weights_on_one_ddp_rank_stop_every_rank_with_one_clear_error(data, tmp_path):
    """Ranks hold the same parameters but only their own state; if one rank's weights turn NaN, all ranks
    must agree to stop (an all-reduced verdict), not leave the others waiting in a collective forever."""
    import os
    import subprocess
    import sys

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch, resunetpp.training.loop as T\n"
        "    real = T.weights_finite\n"
        "    def poisoned(model, ddp=False):\n"
        "        with torch.no_grad():\n"
        "            next(model.parameters()).view(-1)[0] = float('nan')\n"
        "        return real(model, ddp)\n"
        "    T.weights_finite = poisoned\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model_kwargs": TINY, "size": 32, "epochs": 2, "batch_size": 4,
                                   "augment": "none", "progress": False}))
    script = tmp_path / "cli.py"
    script.write_text("from resunetpp.cli import app\napp()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "train",
         "--data", str(data), "--config", str(cfg), "--device", "cpu", "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=3600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("error: non-finite weights after epoch 1") == 2, out[-3000:]  # each rank, the same line
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "ddp" / "last.pt").exists()  # nothing of the bad epoch was written


def test_a_model_for_other_than_three_channels_is_refused_before_training(data, tmp_path):
    """The networks take `in_channels`, but training reads RGB images: a grey model is refused by name."""
    with pytest.raises(ValueError, match="training reads RGB images, so resunetpp must take 3 input channels, not 1"):
        T.train(tiny(data, tmp_path / "run", model_kwargs={**TINY, "in_channels": 1}))
    assert not (tmp_path / "run" / "last.pt").exists()
