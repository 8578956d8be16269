"""`resunetpp train`'s options are made from `TrainConfig`'s fields, and its settings are layered by the library's
`settings()`: defaults (or the resumed run's) < config file < flags."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

import resunetpp.cli.train as cli_train
from resunetpp.cli import app
from resunetpp.cli.common import ExitCode
from resunetpp.errors import SettingError
from resunetpp.training.config import TrainConfig, setting, settings
from resunetpp.training.loop import NonFiniteError

runner = CliRunner()
FLAGS = [f for f in fields(TrainConfig) if f.metadata["setting"].flag]
# the flags as they were written by hand before they were made from the fields: none may change
FORMS = {"--model", "--data", "--split", "--size", "--epochs", "--batch-size", "--lr", "--optimizer", "--loss",
         "--schedule", "--augment", "--seed", "--device", "--amp", "--out", "--config", "--resume", "--skip-bad",
         "--early-stop", "--limit", "--compile", "--eval-every", "--time-limit", "--sync-bn", "--teacher",
         "--distill-weight", "--init", "--ema", "--multi-scale"}


def options() -> dict:
    """train's options by name (typer's own click Options: some typer versions bring their own click)."""
    return {p.name: p for p in typer.main.get_command(app).commands["train"].params if getattr(p, "opts", None)}


def test_every_flag_setting_is_an_option_with_its_help():
    opts = options()
    for f in FLAGS:
        opt = opts[f.name]
        assert opt.opts == [cli_train.flag_name(f.name)] and opt.default is None, f.name
        assert opt.help.startswith(f.metadata["setting"].help), f.name
    unflagged = {f.name for f in fields(TrainConfig)} - {f.name for f in FLAGS}
    assert unflagged == {"model_kwargs", "weight_decay", "deterministic", "threshold", "check_every", "progress"}
    assert not unflagged & set(opts)


@pytest.mark.parametrize("f", [f for f in FLAGS if f.metadata["setting"].names() or f.metadata["setting"].low
                               is not None], ids=lambda f: f.name)
def test_each_flag_takes_its_setting_s_choices_and_range_at_parse_time(f, tmp_path):
    s, flag = f.metadata["setting"], cli_train.flag_name(f.name)
    bad = "bogus" if s.names() else str(s.low if s.above else s.low - 1)
    r = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), flag, bad])
    assert r.exit_code == ExitCode.USAGE and "Invalid value" in r.output, r.output
    assert all(name in r.output for name in s.names())
    assert not (tmp_path / "r").exists()


def test_the_flags_keep_their_names_and_forms():
    opts = options()
    assert {o.opts[0] for o in opts.values()} - {"--help"} == FORMS
    assert opts["amp"].secondary_opts == ["--no-amp"]  # on, off, or the config's
    assert opts["skip_bad"].is_flag and opts["sync_bn"].is_flag and not opts["skip_bad"].secondary_opts


def test_help_lists_every_flag_with_its_help():
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert r.exit_code == 0
    for flag in FORMS:
        assert flag in r.output
    assert "Global batch size over all processes. Default: 16." in r.output
    assert "Learning rate. Default: 0.0001." in r.output


def test_defaults_then_the_file_then_the_overrides(tmp_path):
    assert settings() == TrainConfig()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"epochs": 5, "batch-size": 4, "optimizer": "nadam"}))
    s = settings(config_file=cfg, overrides={"epochs": 1, "optimizer": None})
    assert (s.epochs, s.batch_size, s.optimizer, s.size) == (1, 4, "nadam", 256)  # None: not given


def test_a_resumed_run_s_settings_replace_the_defaults(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.yaml").write_text(yaml.safe_dump({"epochs": 7, "size": 64, "lr": 0.01,
                                                           "gone_in_this_version": 1}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("size: 32\n")
    s = settings(resume=run, config_file=cfg, overrides={"lr": 0.5})
    assert (s.epochs, s.size, s.lr) == (7, 32, 0.5)
    with pytest.raises(FileNotFoundError, match="not the folder of a training run"):
        settings(resume=tmp_path)


def test_the_cli_passes_file_flags_and_resume_to_the_library(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli_train, "run_train", lambda cfg, resume=None: seen.update(cfg=cfg, resume=resume) or resume)
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.yaml").write_text(yaml.safe_dump({"epochs": 7, "size": 64, "data": "d", "amp": True}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("size: 32\nschedule: cosine\n")
    r = runner.invoke(app, ["train", "--resume", str(run), "--config", str(cfg), "--schedule", "onecycle",
                            "--no-amp", "--skip-bad"])
    assert r.exit_code == 0, r.output
    s = seen["cfg"]
    assert (s.epochs, s.size, s.schedule, s.amp, s.skip_bad, s.data) == (7, 32, "onecycle", False, True, "d")
    assert seen["resume"] == run and f"run folder: {run}" in r.output


def test_a_refused_setting_names_the_flag_only_in_the_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("size: 0\n")
    with pytest.raises(SettingError, match=r"^size must be at least 1, got 0$") as info:
        settings(config_file=cfg, overrides={"data": "d"}).resolved()
    assert info.value.setting == "size"
    r = runner.invoke(app, ["train", "--data", str(tmp_path), "--config", str(cfg), "--out", str(tmp_path / "r")])
    assert r.exit_code == ExitCode.USAGE and "error: size must be at least 1, got 0 (--size)" in r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "r")])
    assert r.exit_code == ExitCode.USAGE and "no training data given" in r.output and "(--data)" in r.output
    assert not (tmp_path / "r").exists()


def test_resume_of_a_folder_without_saved_settings_is_bad_input(tmp_path):
    r = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert r.exit_code == ExitCode.BAD_INPUT
    assert f"{Path(tmp_path) / 'train_config.yaml'}: not found" in r.output and "Traceback" not in r.output


def test_the_library_checks_each_setting_by_its_own_rules():
    assert setting("distill_weight").high == 1 and setting("lr").above
    for name, value, words in (("distill_weight", 2.0, r"distill_weight must lie in \[0, 1\], got 2.0"),
                               ("lr", 0.0, "lr must be above 0, got 0.0"),
                               ("optimizer", "sgd", "unknown optimizer 'sgd'; choose one of adam, adamw, nadam")):
        with pytest.raises(SettingError, match=words):
            TrainConfig(data="d", **{name: value}).resolved()


@pytest.mark.parametrize("has_checkpoint", [True, False])
def test_a_run_stopped_part_way_is_given_the_resume_command_by_the_cli(has_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def stops(cfg, resume=None):
        out.mkdir()
        if has_checkpoint:
            (out / "last.pt").write_bytes(b"")
        raise NonFiniteError("non-finite loss at epoch 2; the last good checkpoint is epoch 1")

    monkeypatch.setattr(cli_train, "run_train", stops)
    r = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(out)])
    assert r.exit_code == ExitCode.PARTIAL and "error: non-finite loss" in r.output
    assert (f"continue with: resunetpp train --resume {out}" in r.output) is has_checkpoint
