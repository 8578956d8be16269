"""Failure paths of predict / evaluate / the CLI: one clear line naming the path, the README's exit
codes (0 ok, 1 partial, 2 usage, 3 bad input, 130 interrupted), and nothing already written lost."""

from __future__ import annotations

import csv
import errno
import json
import os

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.inference import disc_image, save_disc_checkpoint
from resunetpp import inference
from resunetpp.cli import app
from resunetpp.cli.common import ExitCode
from resunetpp.inference import predict

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_disc_checkpoint(tmp_path_factory.mktemp("ckpt") / "run")


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        cv2.imwrite(str(src / f"{i}.png"), disc_image(rng, 40, 48)[0])
    return src


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _one_clean_line(r, *needles: str) -> str:
    assert "Traceback" not in r.output, r.output
    lines = _errors(r.output)
    assert len(lines) == 1, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _rows(out):
    with open(out / "predictions.csv") as fh:
        return list(csv.DictReader(fh))


def test_exit_code_table_is_the_readme_one():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 130]
    table = (__import__("pathlib").Path(__file__).parents[2] / "docs" / "cli.md").read_text()  # the docs' table
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 130 |"):
        assert code in table


def test_predict_out_is_an_existing_file(tmp_path, images, ckpt):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    r = runner.invoke(app, ["predict", str(images), "-w", str(ckpt), "--out", str(target)])
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    _one_clean_line(r, str(target), "is a file", "output folder")
    assert target.read_text() == "keep me"  # nothing already written is lost


def test_predict_out_under_a_file(tmp_path, images, ckpt):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(app, ["predict", str(images), "-w", str(ckpt), "--out", str(blocker / "sub" / "out")])
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    _one_clean_line(r, str(blocker / "sub" / "out"), f"{blocker} is a file")


def test_predict_out_not_writable(tmp_path, images, ckpt, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the kernel's answer happen
        real_open = open

        def fake_open(path, *args, **kwargs):
            if str(path).startswith(str(locked)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)

        real_mkdir = predict.Path.mkdir

        def fake_mkdir(self, *args, **kwargs):
            if str(self).startswith(str(locked)) and self != locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(predict, "open", fake_open, raising=False)
        monkeypatch.setattr(predict.Path, "mkdir", fake_mkdir)
    else:
        locked.chmod(0o500)
    r = runner.invoke(app, ["predict", str(images), "-w", str(ckpt), "--out", str(locked)])
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    _one_clean_line(r, str(locked / "predictions.csv"), "Permission denied", "output folder")
    r = runner.invoke(app, ["predict", str(images), "-w", str(ckpt), "--out", str(locked / "new")])
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    _one_clean_line(r, str(locked / "new"), "permission denied")


def test_predict_disk_full_stops_with_reason_and_leaves_no_mask_for_failed_rows(tmp_path, images, ckpt, monkeypatch):
    real = predict._write_bytes

    def write(path, data, written):
        if path.parts[-2] == "overlays" and path.name == "2.png":  # the mask of 2.png is written, then ENOSPC
            written.append(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[:10])  # a partial file, as a full disk leaves one
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, written)

    monkeypatch.setattr(predict, "_write_bytes", write)
    out = tmp_path / "out"
    r = runner.invoke(app, ["predict", str(images), "-w", str(ckpt), "--out", str(out), "-b", "1"])
    assert r.exit_code == ExitCode.PARTIAL, r.output
    _one_clean_line(r, "2.png", str(out), "No space left on device", "Free some space")
    assert "2 image(s) segmented" in r.output and "1 failed, 1 not done" in r.output
    rows = {os.path.basename(row["input"]): row for row in _rows(out)}
    assert set(rows) == {"0.png", "1.png", "2.png"}
    assert "No space left on device" in rows["2.png"]["error"]
    for name in ("0.png", "1.png"):  # what was written before stays
        assert (out / "masks" / name).is_file() and (out / "overlays" / name).is_file()
    assert not (out / "masks" / "2.png").exists() and not (out / "overlays" / "2.png").exists()


def test_write_error_reason_is_shown_and_row_files_removed(tmp_path, images, ckpt, monkeypatch):
    real = predict._write_bytes

    def write(path, data, written):
        if path.parts[-2] == "overlays" and path.name == "1.png":
            written.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path, data, written)

    monkeypatch.setattr(predict, "_write_bytes", write)
    out = tmp_path / "out"
    r = runner.invoke(app, ["predict", str(images), "-w", str(ckpt), "--out", str(out)])
    assert r.exit_code == ExitCode.PARTIAL, r.output
    line = _one_clean_line(r, "1.png", os.strerror(errno.EIO))
    assert "OpenCV could not write" not in line
    assert not (out / "masks" / "1.png").exists()
    assert (out / "masks" / "3.png").is_file()  # a plain write error does not stop the run


def test_ctrl_c_in_predict_prints_the_summary(tmp_path, images, ckpt, monkeypatch):
    calls = {"n": 0}
    real = inference.Segmenter.probabilities

    def probabilities(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(inference.Segmenter, "probabilities", probabilities)
    out = tmp_path / "out"
    r = runner.invoke(app, ["predict", str(images), "-w", str(ckpt), "--out", str(out), "-b", "1"])
    assert r.exit_code == ExitCode.INTERRUPTED, r.output
    assert "Traceback" not in r.output
    assert "interrupted: 2 image(s) segmented" in r.output and "2 not done" in r.output and str(out) in r.output
    assert len(_rows(out)) == 2 and sorted(p.name for p in (out / "masks").iterdir()) == ["0.png", "1.png"]


def test_weights_not_matching_their_config_is_one_line(tmp_path, images, ckpt):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_kwargs"] = {"filters": [16, 16, 16, 16, 16]}
    (run / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["predict", str(images), "-w", str(run), "--out", str(tmp_path / "out")])
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    line = _one_clean_line(r, str(run / "model.safetensors"), "of another shape", "more")
    assert len(line) < 600 and len(r.output.splitlines()) == 1


def test_model_kwargs_typo_in_config_is_one_line(tmp_path, images, ckpt):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_kwargs"] = {"filterz": [8]}
    (run / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["predict", str(images), "-w", str(run), "--out", str(tmp_path / "out")])
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    _one_clean_line(r, str(run / "config.json"), "filterz")


@pytest.mark.parametrize("command", ["predict", "export", "video"])
def test_missing_weights_say_not_found(tmp_path, images, command):
    missing = tmp_path / "no-such-run"
    args = {"predict": ["predict", str(images), "--out", str(tmp_path / "o")],
            "export": ["export", "--out", str(tmp_path / "m.onnx")],
            "video": ["video", "0", "--out", str(tmp_path / "v.mp4")]}[command]
    r = runner.invoke(app, [*args, "--weights", str(missing)])
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    _one_clean_line(r, str(missing), "not found")


def test_evaluate_refuses_a_threshold_outside_0_1_in_the_library(tmp_path, ckpt):
    from resunetpp.evaluation.evaluator import evaluate

    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\]"):
            evaluate(ckpt, tmp_path / "no-data", threshold=bad)
    with pytest.raises(ValueError, match="threshold"):
        inference.Segmenter(ckpt, threshold=1.5)


def test_usage_errors_exit_2(tmp_path, images, ckpt):
    r = runner.invoke(app, ["predict", str(images), "-w", str(ckpt), "--out", str(tmp_path / "o"),
                            "--backend", "tensorrt"])
    assert r.exit_code == ExitCode.USAGE
    r = runner.invoke(app, ["predict", str(images), "-w", str(ckpt), "--out", str(tmp_path / "o"),
                            "--threshold", "1.5"])
    assert r.exit_code == ExitCode.USAGE


def test_choices_come_from_the_library_tuples_and_device_defaults_to_auto(ckpt):
    import inspect

    from resunetpp.cli import infer as cli_infer
    from resunetpp.inference.crf import CRF_MODES
    from resunetpp.inference.export import CALIB_METHODS, EXPORTERS

    for enum, values in ((cli_infer.Backend, inference.BACKENDS), (cli_infer.Precision, inference.PRECISIONS),
                         (cli_infer.CrfMode, CRF_MODES), (cli_infer.ProbFormat, predict.PROB_FORMATS),
                         (cli_infer.Exporter, EXPORTERS), (cli_infer.CalibMethod, CALIB_METHODS)):
        assert tuple(m.value for m in enum) == tuple(values)
    for fn in (cli_infer.predict, cli_infer.video):
        assert inspect.signature(fn).parameters["device"].default.default == "auto"
    seg = inference.Segmenter(ckpt)  # the library's default is auto too
    assert seg._run.device.type == ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        inference.Segmenter(ckpt, device="gpu0")


def test_help_shows_no_bool_metavar():
    for args in (["predict", "--help"], ["data", "check", "--help"], ["export", "--help"]):
        r = runner.invoke(app, args, env={"COLUMNS": "160"})
        assert r.exit_code == 0
        assert "<bool>" not in r.output and "list[" not in r.output, r.output


def test_progress_off_a_tty_is_plain_lines(capsys, monkeypatch):
    from resunetpp.progress import LogProgress, progress_bar

    monkeypatch.delenv("RESUNETPP_PROGRESS", raising=False)
    bar = progress_bar(range(5), desc="work", unit="img")  # pytest's stderr is not a terminal
    assert isinstance(bar, LogProgress)
    bar.every = 0.0
    assert list(bar) == list(range(5))
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1] == "work: 5/5 img (100%)"
    monkeypatch.setenv("RESUNETPP_PROGRESS", "off")
    list(progress_bar(range(3), desc="quiet"))
    assert capsys.readouterr().err == ""
