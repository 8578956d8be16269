"""`resunetpp reproduce --quick` on a small subset of the real data (skips without ../shared/data)."""

import csv
import importlib.resources
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from resunetpp.cli import app
from resunetpp.training.reproduce import MODELS, PAPER, default_data, table_markdown

runner = CliRunner()



@pytest.mark.slow
def test_quick_table1_writes_every_output(kvasir_dir, tmp_path):
    out = tmp_path / "t1"
    # the exact models (U-Net's 31 M parameters included) at 32x32 on 8 ids per split, one epoch
    args = ["reproduce", "table1", "--data", str(kvasir_dir), "--out", str(out), "--quick", "--size", "32",
            "--limit", "8", "--epochs", "1", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    table = (out / "table.md").read_text()
    for name in ("U-Net", "ResUNet", "ResUNet-mod", "ResUNet++", "0.8133", "0.7927", "0.7147", "Quick run"):
        assert name in table
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == list(MODELS)
    assert "models_grouped" not in res and not (out / "by-near-duplicates").exists()  # Table I: only if asked
    assert res["device"] == "cpu" and res["torch"] == torch.__version__ and res["wall_seconds"] > 0
    assert "reproduce table1" in res["command"] and res["settings"] == {"size": 32, "epochs": 1, "limit": 8,
                                                                         "batch_size": 8}
    unet = res["models"]["unet"]
    assert unet["parameters"] == 31_031_745 and unet["settings"]["loss"] == "bce"
    assert res["models"]["resunet"]["settings"]["loss"] == "mse"
    assert res["models"]["resunetpp"]["settings"]["loss"] == "dice" and unet["test_images"] == 8
    for model in MODELS:
        assert (out / model / "model.safetensors").is_file()
        assert (out / model / "eval" / "metrics.json").is_file()
    with Image.open(out / "fig3.png") as im:
        assert im.width > im.height > 100  # 4 rows x 6 columns
        full_width, full_height = im.size

    # a second call reuses the finished runs instead of training again (and reports their training time)
    trained = res["models"]["resunetpp"]["train_seconds"]
    stamp = (out / "resunetpp" / "last.pt").stat().st_mtime_ns
    r = runner.invoke(app, [*args, "--models", "resunetpp"])
    assert r.exit_code == 0, r.output
    again = json.loads((out / "results.json").read_text())["models"]["resunetpp"]
    assert again["train_seconds"] == trained > 0 and again["epochs_done"] == 1
    assert (out / "resunetpp" / "last.pt").stat().st_mtime_ns == stamp

    # runs returned without weights (as a GPU campaign returns the baselines) are tabulated from their reports
    dice = again["metrics"]["mean"]["dice"]
    (out / "resunetpp" / "model.safetensors").unlink()
    (out / "fig3.png").unlink()
    r = runner.invoke(app, [*args, "--tabulate"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == list(MODELS) and res["models"]["resunetpp"]["metrics"]["mean"]["dice"] == dice
    assert res["models"]["resunetpp"]["parameters"] == 4_062_993 and "--tabulate" in res["command"]
    assert f"{dice:.4f}" in (out / "table.md").read_text()
    assert not (out / "resunetpp" / "model.safetensors").exists()  # nothing was trained again
    with Image.open(out / "fig3.png") as im:  # ResUNet++ still drawn, from the masks its run kept
        assert im.size == (full_width, full_height)
    kept = Image.open(out / "resunetpp" / "fig3_masks.png")
    assert kept.size == (32, 4 * 32) and len(json.loads(kept.text["ids"])) == 4
    assert set(np.unique(np.array(kept))) <= {0, 255}
    # without its kept masks (or with masks of other images) the run is left out of the figure
    (out / "resunetpp" / "fig3_masks.png").unlink()
    r = runner.invoke(app, [*args, "--tabulate"])
    assert r.exit_code == 0, r.output
    with Image.open(out / "fig3.png") as im:
        assert 100 < im.height < im.width < full_width  # one column fewer: the three models that have weights


@pytest.mark.parametrize("table, flag, label, split_file", [
    ("table2", [], "by sequence", "cvc-clinicdb-by-sequence.json"),
    ("table1", ["--grouped"], "by near-duplicates", "kvasir-seg-by-near-duplicates.json")])
@pytest.mark.slow
def test_leak_free_rows_train_and_test_on_the_grouped_split(table, flag, label, split_file, kvasir_dir, clinicdb_dir,
                                                            tmp_path):
    data = {"table1": kvasir_dir, "table2": clinicdb_dir}[table]
    out = tmp_path / table
    r = runner.invoke(app, ["reproduce", table, "--data", str(data), "--out", str(out), "--quick", "--size", "32",
                            "--limit", "6", "--batch-size", "2", "--epochs", "1", "--device", "cpu",
                            "--models", "resunetpp", *flag])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    folder = {"table1": "by-near-duplicates", "table2": "by-sequence"}[table]
    grouped = json.loads((importlib.resources.files("resunetpp") / "splits" / split_file).read_text())
    # the grouped run trained on the grouped split's ids and was tested on its test ids, not the random split's
    assert json.loads((out / folder / "resunetpp" / "split.json").read_text())["train"] == grouped["train"][:6]
    tested = [row["id"] for row in csv.DictReader(open(out / folder / "resunetpp" / "eval" / "per_image.csv"))]
    assert tested == grouped["test"][:6]
    random_tested = [row["id"] for row in csv.DictReader(open(out / "resunetpp" / "eval" / "per_image.csv"))]
    assert random_tested != tested
    assert res["grouped_split"] == label and list(res["models_grouped"]) == ["resunetpp"]
    table_md = (out / "table.md").read_text()
    assert "| ResUNet++ | random |" in table_md and f"| ResUNet++ | {label} |" in table_md and split_file in table_md
    assert res["models_grouped"]["resunetpp"]["metrics"]["mean"]["dice"] == pytest.approx(
        json.loads((out / folder / "resunetpp" / "eval" / "metrics.json").read_text())["mean"]["dice"])


def test_default_data_error_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="resunetpp data download cvc-clinicdb"):
        default_data("table2")
    r = runner.invoke(app, ["reproduce", "table3"])
    assert r.exit_code == 2 and "unknown table 'table3'" in r.output  # a usage error (README exit codes)


def test_table_markdown_lists_ours_beside_the_paper():
    fake = {m: {"metrics": {"mean": {"dice": 0.5, "iou": 0.4, "miou_2class": 0.6, "recall": 0.7, "precision": 0.8}}}
            for m in MODELS}
    md = table_markdown("table2", fake)
    assert "CVC-ClinicDB" in md and md.count("| 0.5000 | 0.4000 | 0.6000 |  | 0.7000 | 0.8000 |") == 4
    assert "| 0.7955 | 0.7962 | 0.7022 | 0.8785 |" in md and "| 0.6419 | 0.4711 | 0.6756 | 0.6868 |" in md


PAPER_TEXT = Path(__file__).resolve().parents[3] / "shared" / "paper" / "resunetpp-ism2019.md"
NAMES = {"ResUNet++": "resunetpp", "ResUNet-mod": "resunet-mod", "ResUNet": "resunet", "U-Net": "unet"}


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason=f"the paper's text is not at {PAPER_TEXT}")
def test_paper_rows_are_the_papers_tables():
    # Tables I and II as the paper prints them: "Method<TAB>Dice<TAB>mIoU<TAB>Recall<TAB>Precision" rows
    text = PAPER_TEXT.read_text()
    tables = {}
    for table, heading in (("table1", "TABLE I "), ("table2", "TABLE II ")):
        block = text[text.index(heading):].split("Method\t", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
        rows = [re.sub(r"</?b>", "", line).split("\t") for line in block]
        tables[table] = {NAMES[r[0]]: tuple(float(v) for v in r[1:]) for r in rows}
    assert tables == PAPER


def test_kept_fig3_masks_round_trip_and_refuse_other_images_or_sizes(tmp_path):
    from resunetpp.training.reproduce import _read_fig3_masks, _save_fig3_masks

    masks = torch.rand(3, 1, 8, 6) > 0.5
    path = tmp_path / "fig3_masks.png"
    _save_fig3_masks(path, masks, ["a", "b", "c"])
    assert torch.equal(_read_fig3_masks(path, ["a", "b", "c"], (8, 6)), masks)
    assert _read_fig3_masks(path, ["a", "b", "d"], (8, 6)) is None  # other images
    assert _read_fig3_masks(path, ["a", "b", "c"], (6, 8)) is None  # another input size
    assert _read_fig3_masks(tmp_path / "none.png", ["a"], (8, 6)) is None
