"""The bundled trained weights: their model card's test figures are what `evaluate` recomputes on this CPU."""

from __future__ import annotations

import json

import pytest

from resunetpp.evaluation.evaluator import evaluate
from resunetpp.hub import bundled_weights

pytestmark = pytest.mark.slow  # every bundled model over its dataset's real test images


@pytest.mark.parametrize("name, dataset, images", [("resunetpp-kvasir-seg", "kvasir_dir", 100),
                                                   ("resunetpp-cvc-clinicdb", "clinicdb_dir", 61),
                                                   ("resunetpp-lite-kvasir-seg", "kvasir_dir", 100),
                                                   ("resunetpp-lite-cvc-clinicdb", "clinicdb_dir", 61)])
def test_bundled_model_scores_what_its_model_card_says(name, dataset, images, request):
    data = request.getfixturevalue(dataset)
    folder = bundled_weights(name)
    card = (folder / "MODEL_CARD.md").read_text()
    claimed = json.loads((folder / "config.json").read_text())["metrics"]["test"]
    result = evaluate(name, data, split="test", device="cpu", progress=False)
    assert result.summary["images"] == images
    got = result.summary["mean"]
    for k in ("dice", "iou", "recall", "precision"):
        assert got[k] == pytest.approx(claimed[k], abs=2e-4), k  # the card's 4 decimals, and CPU-to-CPU noise
        assert f"{claimed[k]:.4f}" in card, f"the model card does not show the {k} of config.json"
    assert got["dice"] == pytest.approx(claimed["dice"], abs=5e-4)
    # the paper-comparable mIoU and the per-polyp figures the card states
    assert result.summary["miou_keras"] == pytest.approx(claimed["miou_keras"], abs=1e-3)
    assert f"**{claimed['miou_keras']:.4f}**" in card
    detection = result.summary["detection"]
    assert detection["polyps"] == claimed["detection"]["polyps"]
    assert detection["sensitivity_iou50"] == pytest.approx(claimed["detection"]["sensitivity_iou50"], abs=1e-3)
    assert f"found {claimed['detection']['sensitivity_iou50']:.1%} at IoU >= 0.5" in card
    assert "Not a medical device" in card and "research" in card
