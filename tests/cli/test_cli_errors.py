"""Bad input never gives a traceback: one `error:` line and the exit code of docs/cli.md's table, from the one
mapping in resunetpp.cli.common; numeric options are checked at parse time in every command."""

from __future__ import annotations

import errno

import pytest
import torch
import yaml
from typer.testing import CliRunner

import resunetpp.training.loop as T
from helpers.training import TINY, write_discs
from resunetpp import create_model, save_pretrained
from resunetpp.cli import app
from resunetpp.cli.common import ExitCode, exit_code

runner = CliRunner()


def one_line(r) -> str:
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.output
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_pretrained(create_model("unet", filters=(4, 4, 4, 4, 4)), tmp_path_factory.mktemp("w") / "run",
                           {"model": "unet", "model_kwargs": {"filters": [4, 4, 4, 4, 4]}, "input_size": [32, 32]})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_discs(tmp_path_factory.mktemp("errs") / "discs")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["predict", "video", "serve", "evaluate"])
def test_cuda_without_cuda_is_one_usage_line(command, ckpt, tmp_path, data):
    args = {"predict": ["predict", str(tmp_path), "--out", str(tmp_path / "o")],
            "video": ["video", "0", "--out", str(tmp_path / "o.mp4")],
            "serve": ["serve"], "evaluate": ["evaluate", "--data", str(data)]}[command]
    r = runner.invoke(app, [*args, "--weights", str(ckpt), "--device", "cuda"])
    assert r.exit_code == ExitCode.USAGE and "CUDA is not available" in one_line(r)
    r = runner.invoke(app, [*args, "--weights", str(ckpt), "--device", "tpu"])
    assert r.exit_code == ExitCode.USAGE and "unknown device 'tpu'" in one_line(r)


def test_data_split_out_onto_a_folder_or_an_unwritable_path(data, tmp_path, monkeypatch):
    (tmp_path / "folder").mkdir()
    r = runner.invoke(app, ["data", "split", str(data), "--out", str(tmp_path / "folder")])
    assert r.exit_code == ExitCode.BAD_INPUT
    assert one_line(r) == f"error: cannot write {tmp_path / 'folder'}: it is a folder; give a file name"
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, ["data", "split", str(data), "--out", str(tmp_path / "file" / "split.json")])
    assert r.exit_code == ExitCode.BAD_INPUT
    assert one_line(r) == (f"error: cannot write {tmp_path / 'file' / 'split.json'}: {tmp_path / 'file'} is a file, "
                           "not a folder")
    import resunetpp.cli.data as D  # the command's own name for the library's save_split

    def read_only(*a, **k):  # root writes anywhere, so the read-only disk is simulated
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro" / "split.json"))

    monkeypatch.setattr(D, "save_split", read_only)
    r = runner.invoke(app, ["data", "split", str(data), "--out", str(tmp_path / "ro" / "split.json")])
    assert r.exit_code == ExitCode.BAD_INPUT and "Permission denied" in one_line(r)


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(command, ckpt, data, tmp_path, monkeypatch):
    import resunetpp.evaluation.evaluator as E

    def no_loading(*a, **k):
        raise AssertionError("the data was loaded before --out was checked")

    monkeypatch.setattr(E, "load_pairs", no_loading)
    monkeypatch.setattr(T, "load_data", no_loading)
    (tmp_path / "file").write_text("x")
    args = {"train": ["train", "--data", str(data), "--epochs", "1"],
            "evaluate": ["evaluate", "--data", str(data), "--weights", str(ckpt)]}[command]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "file")])
    assert r.exit_code == ExitCode.BAD_INPUT
    assert one_line(r) == (f"error: {tmp_path / 'file'}: exists and is a file, not a folder; choose another output "
                           "folder (nothing was written)")
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "file" / "run")])
    assert r.exit_code == ExitCode.BAD_INPUT and f"because {tmp_path / 'file'} is a file" in one_line(r)
    assert (tmp_path / "file").read_text() == "x"
    if command == "evaluate":  # weights that are a plain file: said as such, not as the default --out under them
        r = runner.invoke(app, ["evaluate", "--data", str(data), "--weights", str(tmp_path / "file")])
        assert r.exit_code == ExitCode.BAD_INPUT and "expected a run folder" in one_line(r)


def test_a_config_value_of_the_wrong_type_names_file_and_setting(data, tmp_path):
    cfg = tmp_path / "c.yaml"
    for text, words in (("epochs: three\n", "setting 'epochs': must be an integer, got 'three'"),
                        ("lr: fast\n", "setting 'lr': must be a number"),
                        ("batch_size: 2.5\n", "setting 'batch_size': must be an integer")):
        cfg.write_text(text)
        r = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--config", str(cfg)])
        assert r.exit_code == ExitCode.USAGE and f"{cfg}: {words}" in one_line(r)
        assert not (tmp_path / "r").exists()


def test_export_opset_out_of_range_fails_and_writes_nothing(ckpt, tmp_path):
    r = runner.invoke(app, ["export", "--weights", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--opset", "99"])
    assert r.exit_code == ExitCode.USAGE and "opset 99" in one_line(r) and "nothing was exported" in r.output
    assert not list(tmp_path.glob("*.onnx")) and not (tmp_path / "config.json").exists()
    r = runner.invoke(app, ["export", "--weights", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--opset", "16"])
    assert r.exit_code == ExitCode.USAGE and not list(tmp_path.glob("*.onnx"))


def test_a_replaced_opset_is_refused(ckpt, tmp_path, monkeypatch):
    import onnx

    import resunetpp.inference.export as E

    real = onnx.load_from_string

    def older(blob):  # an exporter that quietly gives another opset than asked
        proto = real(blob)
        for o in proto.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = 17
        return proto

    monkeypatch.setattr(E.onnx if hasattr(E, "onnx") else onnx, "load_from_string", older)
    with pytest.raises(E.OpsetError, match="produced opset 17, not the requested 18"):
        E.export_onnx(ckpt, tmp_path / "m.onnx", opset=18, exporter="legacy")
    assert not (tmp_path / "m.onnx").exists()


NUMERIC = [
    ["evaluate", "--data", "D", "--limit", "0"],
    ["evaluate", "--data", "D", "--batch-size", "0"],
    ["evaluate", "--data", "D", "--threshold", "nan"],
    ["predict", "D", "--out", "O", "--batch-size", "0"],
    ["predict", "D", "--out", "O", "--threshold", "nan"],
    ["predict", "D", "--out", "O", "--min-area", "inf"],
    ["video", "D", "--out", "O.mp4", "--max-frames", "0"],
    ["train", "--data", "D", "--epochs", "0"],
    ["train", "--data", "D", "--batch-size", "0"],
    ["train", "--data", "D", "--lr", "0"],
    ["train", "--data", "D", "--lr", "nan"],
    ["train", "--data", "D", "--eval-every", "0"],
    ["train", "--data", "D", "--limit", "0"],
    ["train", "--data", "D", "--time-limit", "-1"],
    ["reproduce", "table1", "--epochs", "0"],
    ["reproduce", "table1", "--batch-size", "0"],
    ["export", "--out", "O.onnx", "--calib-count", "0"],
    ["serve", "--max-queue-s", "0"],
    ["serve", "--infer-batch", "0"],
    ["serve", "--stream-idle-s", "nan"],
    ["data", "show", "D", "--n", "0"],
    ["data", "prepare", "D", "--out", "O", "--quality", "0"],
]


@pytest.mark.parametrize("args", NUMERIC, ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_numeric_options_are_checked_at_parse_time(args, tmp_path):
    args = [a.replace("D", str(tmp_path / "nothing")).replace("O", str(tmp_path / "out")) if a in ("D", "O", "O.mp4",
            "O.onnx") else a for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code == ExitCode.USAGE, r.output
    assert "Traceback" not in r.output and "Invalid value" in r.output
    assert not (tmp_path / "out").exists()


def test_one_mapping_for_typed_errors():
    from resunetpp.data.layouts import DataLayoutError
    from resunetpp.device import DeviceError
    from resunetpp.inference.export import OpsetError, ParityError
    from resunetpp.io import ImageReadError
    from resunetpp.spec import ModelError, ModelSpecError

    assert exit_code(ModelSpecError("c.json", "threshold", "bad")) == ExitCode.BAD_INPUT
    assert exit_code(ModelError("w: damaged")) == ExitCode.BAD_INPUT
    assert exit_code(ImageReadError("a.png", "bad")) == ExitCode.BAD_INPUT
    assert exit_code(DataLayoutError("d: no layout")) == ExitCode.BAD_INPUT
    assert exit_code(IsADirectoryError(21, "Is a directory")) == ExitCode.BAD_INPUT
    assert exit_code(DeviceError("cuda")) == ExitCode.USAGE
    assert exit_code(OpsetError("opset 99")) == ExitCode.USAGE
    assert exit_code(ValueError("x")) == ExitCode.USAGE
    assert exit_code(ValueError("x"), plain=ExitCode.BAD_INPUT) == ExitCode.BAD_INPUT
    assert exit_code(ParityError("x")) == ExitCode.PARTIAL
    assert exit_code(T.CheckpointWriteError("x")) == ExitCode.PARTIAL
    assert exit_code(T.CheckpointError("x")) == ExitCode.BAD_INPUT


def _train(data, out, *extra, progress=False):
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump({"model_kwargs": TINY, "progress": progress}))
    return runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--model", "resunetpp", "--size", "32",
                               "--batch-size", "4", "--augment", "light", "--epochs", "2", "--device", "cpu",
                               "--config", str(cfg), *extra])


def test_full_disk_at_the_first_checkpoint_advises_no_resume(data, tmp_path, monkeypatch):
    def full(obj, f, *a, **k):  # torch's own words for a full disk: no errno
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/12: file write failed")

    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(T.torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 4096))
    r = _train(data, tmp_path / "run")
    assert r.exit_code == ExitCode.PARTIAL
    line = one_line(r)
    assert "could not write the checkpoint of epoch 1: no space left on device" in line
    assert "No last.pt was written yet, so there is nothing to resume" in line
    assert "model.safetensors holds the best model (epoch 1)" in line  # it was written before last.pt failed
    assert "--resume" not in r.output and "epoch none" not in line  # no last.pt: no resume advised


def test_full_disk_message_names_the_intact_epoch():
    from pathlib import Path

    msg = T.write_failure(Path("/tmp"), 3, OSError(errno.ENOSPC, "No space left on device"), 2, 2)
    assert "epoch 3: no space left on device" in msg and "The files of epoch 2 are intact" in msg
    assert msg.endswith("/tmp") and "--" not in msg  # the library names no flag; the CLI adds the command


def test_train_progress_follows_resunetpp_progress_log(data, tmp_path, monkeypatch):
    monkeypatch.setenv("RESUNETPP_PROGRESS", "log")
    r = _train(data, tmp_path / "run", progress=True)
    assert r.exit_code == 0, r.output
    import re

    assert "\r" not in r.output  # no bar redrawn with carriage returns
    assert re.search(r"^epoch 2/2: (\d+)/\1 step \(100%\)$", r.output, re.M), r.output  # a plain line at the end
