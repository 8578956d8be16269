"""The bundled trained weights: their model card's test Dice is what `evaluate` recomputes on this CPU."""

from __future__ import annotations

import json

import pytest

from resunetpp.evaluate import evaluate
from resunetpp.hub import bundled_weights


def test_bundled_kvasir_model_scores_what_its_model_card_says(kvasir_dir, tmp_path):
    folder = bundled_weights()
    card = (folder / "MODEL_CARD.md").read_text()
    claimed = json.loads((folder / "config.json").read_text())["metrics"]["test"]
    result = evaluate(None, kvasir_dir, split="test", device="cpu", progress=False)  # None: the bundled model
    assert result.summary["images"] == 100
    got = result.summary["mean"]
    for k in ("dice", "iou", "recall", "precision"):
        assert round(got[k], 3) == round(claimed[k], 3), k
        assert f"{claimed[k]:.4f}" in card, f"the model card does not show the {k} of config.json"
    assert got["dice"] == pytest.approx(claimed["dice"], abs=5e-4)
    assert "Not a medical device" in card and "research" in card
