"""`resunetpp models` lists the bundled trained weights found in the package's weights/ folder, not a fixed list."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

import resunetpp.catalog as catalog
from resunetpp.cli import app

runner = CliRunner()


def test_models_lists_every_bundled_weights_folder_with_its_facts():
    found = catalog.bundled()
    names = [w.name for w in found]
    assert names[0] == catalog.default_name() and "resunetpp-cvc-clinicdb" in names
    r = runner.invoke(app, ["models"], env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    for w in found:
        cfg = json.loads((w.folder / "config.json").read_text())
        assert w.model == cfg["model"] and w.dataset == cfg["dataset"]
        assert w.test_dice == cfg["metrics"]["test"]["dice"]
        assert w.size_bytes == (w.folder / "model.safetensors").stat().st_size
        row = next(line for line in r.output.splitlines() if f" {w.name} " in line)
        assert all(v in row for v in (w.model, w.dataset, f"{w.test_dice:.4f}", f"{w.size_mib:.1f} MiB")), row


def test_a_new_weights_folder_is_listed_without_code_changes(tmp_path, monkeypatch):
    src = catalog.bundled()[0].folder
    root = tmp_path / "weights"
    shutil.copytree(src, root / src.name)
    new = root / "resunetpp-lite-kvasir-seg"
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"\0" * 1234)
    (new / "config.json").write_text(json.dumps({"model": "resunetpp-lite", "dataset": "kvasir-seg",
                                                 "metrics": {"test": {"dice": 0.8123}}}))
    (root / "not-weights").mkdir()  # a folder without weights is not listed
    monkeypatch.setattr(catalog.hub, "WEIGHTS_DIR", root)
    r = runner.invoke(app, ["models"], env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "resunetpp-lite-kvasir-seg" in line)
    assert "resunetpp-lite " in row and "0.8123" in row and "0.0 MiB" in row
    assert "not-weights" not in r.output
