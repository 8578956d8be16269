"""evaluate: native-size scoring recomputed by hand, --native refused on a cache, JSON and text split files.

(Beside tests/evaluation/test_evaluate.py.)
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers.inference import SIZE, disc_image, save_disc_checkpoint
from resunetpp import load_model
from resunetpp.cli import app
from resunetpp.data.cache import prepare_cache
from resunetpp.evaluation.evaluator import evaluate

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint at 32x32 and a folder dataset of 6 disc images of 48x40 (resized for the model)."""
    root = tmp_path_factory.mktemp("ev")
    ckpt = save_disc_checkpoint(root / "run")
    data = root / "discs"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(30)
    for i in range(6):
        image, mask = disc_image(rng, 48, 40)
        cv2.imwrite(str(data / "images" / f"{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(data / "masks" / f"{i}.png"), mask.astype(np.uint8) * 255)
    return ckpt, data


def _by_hand(ckpt, data, ids):
    """Per-image Dice at each mask's own size, computed without resunetpp's data, metrics or evaluation code:
    cv2 reads, INTER_AREA down to 32x32, the model, sigmoid, bilinear back up, threshold 0.5, numpy counts."""
    model = load_model(ckpt)
    out = []
    for i in ids:
        rgb = cv2.cvtColor(cv2.imread(str(data / "images" / f"{i}.png")), cv2.COLOR_BGR2RGB)
        truth = cv2.imread(str(data / "masks" / f"{i}.png"), cv2.IMREAD_GRAYSCALE) > 127
        small = cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        with torch.no_grad():
            p = torch.sigmoid(model(torch.from_numpy(small).permute(2, 0, 1)[None].float() / 255))[0, 0].numpy()
        pred = cv2.resize(p, truth.shape[::-1], interpolation=cv2.INTER_LINEAR) > 0.5
        tp = (pred & truth).sum()
        out.append((2 * tp / (pred.sum() + truth.sum()), int(tp), int((pred & ~truth).sum())))
    return out


def test_native_size_scores_equal_a_recomputation_by_hand(setup):
    ckpt, data = setup
    native = evaluate(ckpt, data, split="all", native=True, progress=False)
    assert native.settings["scored_at"] == "native mask size"
    ids = [r["id"] for r in native.per_image]
    assert ids == [str(i) for i in range(6)]
    expected = _by_hand(ckpt, data, ids)
    for row, (d, tp, fp) in zip(native.per_image, expected):
        assert row["tp"] + row["fp"] + row["fn"] + row["tn"] == 48 * 40
        assert abs(row["tp"] - tp) <= 1 and abs(row["fp"] - fp) <= 1  # (equal here; a last-bit rounding apart)
        assert row["dice"] == pytest.approx(d, abs=2e-3)
    assert native.summary["mean"]["dice"] == pytest.approx(np.mean([e[0] for e in expected]), abs=1e-3)
    assert 0.8 < native.summary["mean"]["dice"] < 1  # a real prediction, not an empty or a full mask
    at_input = evaluate(ckpt, data, split="all", progress=False)
    assert all(r["tp"] + r["fp"] + r["fn"] + r["tn"] == SIZE * SIZE for r in at_input.per_image)


def test_native_is_refused_on_a_prepared_cache(setup, tmp_path):
    ckpt, data = setup
    cache = prepare_cache(data, tmp_path / "cache", size=32, progress=False)
    with pytest.raises(ValueError, match="native-size scoring needs the original dataset folder, not a prepared cache"):
        evaluate(ckpt, cache, split="all", native=True, progress=False)
    assert evaluate(ckpt, cache, split="all", progress=False).summary["images"] == 6  # without --native it runs
    r = runner.invoke(app, ["evaluate", "--weights", str(ckpt), "--data", str(cache), "--split", "all", "--native",
                            "--out", str(tmp_path / "rep")])
    assert r.exit_code == 2 and "native-size scoring needs the original dataset folder" in r.output
    assert not (tmp_path / "rep").exists()


def test_json_and_text_split_files(setup, tmp_path):
    ckpt, data = setup
    split = tmp_path / "s.json"
    split.write_text(json.dumps({"dataset": "discs", "train": ["0", "1"], "val": ["2"], "test": ["5", "3"]}))
    res = evaluate(ckpt, data, split=str(split), progress=False)
    assert [r["id"] for r in res.per_image] == ["5", "3"]  # the file's "test" list, in its order
    assert res.settings["split"] == f"test of {split}"
    ids = tmp_path / "ids.txt"
    ids.write_text("# polyps to check\n4\n\n1\n")
    res = evaluate(ckpt, data, split=str(ids), progress=False)
    assert [r["id"] for r in res.per_image] == ["4", "1"] and res.settings["split"] == str(ids)
    assert [r["id"] for r in evaluate(ckpt, data, split=str(split), limit=1, progress=False).per_image] == ["5"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": [], "val": [], "test": ["1"]}')
    with pytest.raises(ValueError, match="bad.json: the train list is empty"):
        evaluate(ckpt, data, split=str(bad), progress=False)
    with pytest.raises(ValueError, match="no split known for dataset 'discs'; use split 'all' or a split file"):
        evaluate(ckpt, data, split="test", progress=False)
