"""Evaluation: reports, metric consistency, thresholds, splits, native size, cross-dataset, real data."""

import csv
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as C
from typer.testing import CliRunner

from helpers.training import TINY, write_discs
from resunetpp import load_model
from resunetpp.cli import app
from resunetpp.evaluation.evaluator import evaluate
from resunetpp.evaluation.metrics import BENCHMARK_NAMES, METRIC_NAMES
from resunetpp.training.loop import TrainConfig, train

runner = CliRunner()



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = write_discs(root / "discs", n=24)
    run = train(TrainConfig(model="resunetpp", model_kwargs=TINY, data=str(data), out=str(root / "run"), size=32,
                            epochs=3, batch_size=4, lr=3e-3, augment="light", progress=False))
    return data, run


def test_reports_and_consistency(trained, tmp_path):
    data, run = trained
    res = evaluate(run, data, split="test", out=tmp_path / "ev", progress=False)
    split = json.loads((run / "split.json").read_text())
    assert [r["id"] for r in res.per_image] == split["test"]  # the run's own test split
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(m["mean"]) == set(m["pooled"]) == set(METRIC_NAMES)
    assert m["images"] == len(split["test"]) and m["settings"]["scored_at"] == "model input size"
    with open(tmp_path / "ev" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == split["test"]
    assert float(rows[0]["dice"]) == pytest.approx(res.per_image[0]["dice"])
    md = (tmp_path / "ev" / "metrics.md").read_text()
    assert "| dice |" in md and "| miou_2class |" in md

    # the same numbers from a second implementation: OpenCV reads the files (32x32: no resizing), the model's
    # forward by hand (normalisation mean 0, std 1), torchmetrics scores
    model = load_model(run)
    assert model.pretrained_config["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3}
    images = np.stack([cv2.imread(str(data / "images" / f"{i}.png"))[:, :, ::-1] for i in split["test"]])
    truth = torch.from_numpy(np.stack([cv2.imread(str(data / "masks" / f"{i}.png"), cv2.IMREAD_GRAYSCALE) > 127
                                       for i in split["test"]])).long()
    assert truth.flatten(1).any(1).all()  # every test image has a polyp: no empty-mask convention involved
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255))[:, 0]
    pred = (probs > 0.5).long()
    tm = _torchmetrics_scores(pred, truth)
    for name in METRIC_NAMES:
        assert res.summary["mean"][name] == pytest.approx(tm["mean"][name], abs=1e-6), name
        assert res.summary["pooled"][name] == pytest.approx(tm["pooled"][name], abs=1e-6), name
        assert [r[name] for r in res.per_image] == pytest.approx(tm["per_image"][name], abs=1e-6), name
    # the paper's Keras MeanIoU(2): class = int(p), so only p == 1.0 is polyp; pooled over the set, mean of 2 classes
    keras = C.multiclass_jaccard_index((probs >= 1.0).long().flatten(), truth.flatten(), num_classes=2).item()
    assert res.summary["miou_keras"] == pytest.approx(keras, abs=1e-6) and m["miou_keras"] == res.summary["miou_keras"]
    d = m["detection"]
    assert d["images"] == 2 and d["polyps"] == sum(r["polyps"] for r in rows_as_ints(rows, "polyps"))
    assert sum(d["polyp_dice_histogram"]["counts"]) == d["polyps"]
    assert "miou_keras" in md and "Per-polyp Dice histogram" in md and "sensitivity, IoU >= 0.5" in md
    assert (tmp_path / "ev" / "polyp_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _torchmetrics_scores(pred: torch.Tensor, truth: torch.Tensor) -> dict:
    """Per image, their mean and pooled over all pixels, by torchmetrics (not resunetpp.evaluation.metrics)."""
    def one(p, t):
        return {"dice": C.binary_f1_score(p, t).item(), "iou": C.binary_jaccard_index(p, t).item(),
                "recall": C.binary_recall(p, t).item(), "precision": C.binary_precision(p, t).item(),
                "f2": C.binary_fbeta_score(p, t, beta=2.0).item(), "accuracy": C.binary_accuracy(p, t).item(),
                "miou_2class": C.multiclass_jaccard_index(p, t, num_classes=2, average="macro").item()}

    rows = [one(p.flatten(), t.flatten()) for p, t in zip(pred, truth)]
    per_image = {k: [r[k] for r in rows] for k in METRIC_NAMES}
    return {"per_image": per_image, "mean": {k: float(np.mean(v)) for k, v in per_image.items()},
            "pooled": one(pred.flatten(), truth.flatten())}


def test_polyp_dice_figure_draws_the_histogram_and_the_found_line(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from resunetpp import figures
    from resunetpp.evaluation.metrics import summarize_detection

    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig) or path)
    rows = [{"polyps": 2, "found_iou50": 1, "found_any": 2, "fp_iou50": 0, "fp_any": 0, "polyp_dice": [0.05, 0.93]},
            {"polyps": 1, "found_iou50": 0, "found_any": 0, "fp_iou50": 1, "fp_any": 1, "polyp_dice": [0.0]}]
    figures.plot_polyp_dice(summarize_detection(rows), tmp_path / "p.png")
    (fig,) = kept
    (ax,) = fig.axes
    heights = [round(b.get_height()) for b in ax.patches]
    assert len(heights) == 10 and heights[0] == 2 and heights[9] == 1 and sum(heights) == 3
    assert [round(b.get_x(), 2) for b in ax.patches][:2] == [0.0, 0.1]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == pytest.approx([2 / 3, 2 / 3])
    assert ax.get_title() == "3 polyps: found 33.3% at IoU >= 0.5, 66.7% at any overlap"
    plt.close(fig)


def test_min_area_drops_components_before_scoring(trained, tmp_path):
    data, run = trained
    plain = evaluate(run, data, split="test", progress=False)
    assert plain.settings["min_area"] == 0.0 and plain.summary["mean"]["recall"] > 0.3
    assert evaluate(run, data, split="test", progress=False, min_area=0.0).summary == plain.summary
    # every disc covers less than half of its image: at min_area 0.5 nothing is left to score
    none = evaluate(run, data, split="test", progress=False, min_area=0.5)
    assert none.settings["min_area"] == 0.5 and none.summary["mean"]["recall"] == 0.0
    assert none.summary["detection"]["sensitivity_any"] == 0.0 and none.summary["detection"]["fp_per_image_any"] == 0
    assert none.summary["miou_keras"] == plain.summary["miou_keras"]  # the paper's metric reads probabilities
    r = runner.invoke(app, ["evaluate", "--weights", str(run), "--data", str(data), "--min-area", "0.5",
                            "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["settings"]["min_area"] == 0.5
    r = runner.invoke(app, ["evaluate", "--weights", str(run), "--data", str(data), "--protocol", "pranet"])
    assert r.exit_code == 2 and "pranet" in r.output


def rows_as_ints(rows, key):
    return [{key: int(r[key])} for r in rows]


def test_polyp_benchmark_protocol(trained, tmp_path):
    data, run = trained
    res = evaluate(run, data, split="test", out=tmp_path / "b", progress=False, protocol="polyp-benchmark")
    b = res.summary["benchmark"]
    assert set(b) == set(BENCHMARK_NAMES) and all(0 <= b[k] <= 1.01 for k in b)
    assert "Polyp benchmark" in (tmp_path / "b" / "metrics.md").read_text()
    with pytest.raises(ValueError, match="unknown protocol 'pranet'"):
        evaluate(run, data, protocol="pranet", progress=False)
    r = runner.invoke(app, ["evaluate", "--weights", str(run), "--data", str(data), "--protocol", "polyp-benchmark",
                            "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert "maxEm" in r.output and "sensitivity" in r.output and "miou_keras" in r.output


def test_threshold_override_and_from_config(trained, tmp_path):
    data, run = trained
    never = evaluate(run, data, split="all", threshold=1.0, progress=False)  # sigmoid < 1: nothing predicted
    assert never.summary["images"] == 24
    assert never.summary["mean"]["dice"] == 0 and never.summary["mean"]["recall"] == 0
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["threshold"] = 1e-30  # everything is polyp (0 itself is refused: thresholds lie strictly inside (0, 1))
    (copy / "config.json").write_text(json.dumps(cfg))
    always = evaluate(copy, data, split="all", progress=False)
    assert always.settings["threshold"] == 1e-30
    assert always.summary["pooled"]["recall"] == 1.0 and always.summary["pooled"]["precision"] < 0.5


def test_split_choices(trained, tmp_path):
    data, run = trained
    split = json.loads((run / "split.json").read_text())
    val = evaluate(run, data, split="val", progress=False)
    assert [r["id"] for r in val.per_image] == split["val"]
    ids = tmp_path / "ids.txt"
    ids.write_text("# a subset\n5\n7\n")
    sub = evaluate(run, data, split=str(ids), progress=False)
    assert [r["id"] for r in sub.per_image] == ["5", "7"]
    assert evaluate(run, data, split="all", limit=3, progress=False).summary["images"] == 3
    other = write_discs(tmp_path / "rings", n=6, seed=5)  # another dataset: no split of its own
    with pytest.raises(ValueError, match="no split known for dataset 'rings'"):
        evaluate(run, other, split="test", progress=False)
    cross = evaluate(run, other, split="all", progress=False)  # cross-dataset: same call, other data
    assert cross.settings["dataset"] == "rings" and cross.settings["trained_on"] == "discs"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate(run, data, split=str(tmp_path / "nope.json"), progress=False)


def test_native_size_scoring(trained, tmp_path):
    _, run = trained
    big = write_discs(tmp_path / "big", n=4, size=48, seed=3)  # resized to the model's 32x32
    at_input = evaluate(run, big, split="all", progress=False)
    native = evaluate(run, big, split="all", native=True, progress=False)
    assert native.settings["scored_at"] == "native mask size"
    assert all(r["tp"] + r["fp"] + r["fn"] + r["tn"] == 48 * 48 for r in native.per_image)
    assert all(r["tp"] + r["fp"] + r["fn"] + r["tn"] == 32 * 32 for r in at_input.per_image)
    # the scores themselves are recomputed by hand at native size in test_evaluate_native_size_and_split_files.py


def test_cli_evaluate(trained, tmp_path):
    data, run = trained
    r = runner.invoke(app, ["evaluate", "--weights", str(run), "--data", str(data), "--split", "val",
                            "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert "miou_2class" in r.output and (tmp_path / "cli" / "metrics.json").is_file()
    r = runner.invoke(app, ["evaluate", "--weights", str(run), "--data", str(data)])
    assert r.exit_code == 0, r.output
    assert (run / "eval" / "discs-test" / "metrics.md").is_file()
    r = runner.invoke(app, ["evaluate", "--weights", str(tmp_path / "missing"), "--data", str(data)])
    assert r.exit_code == 3 and "missing" in r.output  # bad input (README exit-code table)


def test_real_data_and_cross_dataset(trained, kvasir_dir, clinicdb_dir, tmp_path):
    _, run = trained  # a 32x32 disc model: the point is the plumbing (resizing, layouts, splits), not the score
    kv = evaluate(run, kvasir_dir, split="test", limit=4, out=tmp_path / "kv", progress=False)
    assert kv.settings["dataset"] == "kvasir-seg" and "committed kvasir-seg split" in kv.settings["split"]
    assert kv.summary["images"] == 4 and all(r["tp"] + r["fp"] + r["fn"] + r["tn"] == 32 * 32 for r in kv.per_image)
    cvc = evaluate(run, clinicdb_dir, split="test", limit=3, native=True, progress=False)
    assert cvc.settings["dataset"] == "cvc-clinicdb"
    assert all(r["tp"] + r["fp"] + r["fn"] + r["tn"] == 384 * 288 for r in cvc.per_image)
