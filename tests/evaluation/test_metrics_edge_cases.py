"""Metrics edge cases: denominators of exactly 1, per-image
accuracy in a batch, and summarize's refusal. (A new file beside tests/evaluation/test_metrics.py.)"""

from __future__ import annotations

import pytest
import torch

from resunetpp.evaluation.metrics import confusion, scores, summarize


def _counts(*rows):
    return torch.tensor(rows, dtype=torch.long)


def test_a_denominator_of_one_is_a_real_ratio_not_the_empty_mask_rule():
    # one true pixel found, one false alarm: recall tp / (tp + fn) = 1 / 1, precision 1 / 2
    s = scores(_counts((1, 1, 0, 2)))
    assert s["recall"].item() == 1.0 and s["precision"].item() == 0.5
    assert s["dice"].item() == pytest.approx(2 / 3) and s["iou"].item() == pytest.approx(1 / 2)
    # one missed pixel, nothing predicted: precision 0/0 with errors -> 0, recall 0 / 1 = 0
    s = scores(_counts((0, 0, 1, 3)))
    assert s["precision"].item() == 0.0 and s["recall"].item() == 0.0 and s["dice"].item() == 0.0
    # a one-pixel image, correctly background: accuracy tn / 1 = 1, background IoU 1 / 1
    s = scores(_counts((0, 0, 0, 1)))
    assert s["accuracy"].item() == 1.0 and s["miou_2class"].item() == 1.0 and s["dice"].item() == 1.0
    # a one-pixel image, a false alarm: accuracy 0 / 1, every foreground score 0
    s = scores(_counts((0, 1, 0, 0)))
    assert s["accuracy"].item() == 0.0 and s["miou_2class"].item() == 0.0
    assert all(s[k].item() == 0.0 for k in ("dice", "iou", "recall", "precision", "f2"))


def test_accuracy_is_per_image_in_a_batch():
    pred = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    truth = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    truth[0, 0, 0, 0] = True  # image 0: 3 of 4 pixels right; image 1: all 4
    stats = confusion(pred, truth)
    assert stats.tolist() == [[0, 0, 1, 3], [0, 0, 0, 4]]
    s = scores(stats)
    assert s["accuracy"].tolist() == [0.75, 1.0]
    assert summarize(stats)["pooled"]["accuracy"] == 7 / 8
    assert summarize(stats)["mean"]["accuracy"] == (0.75 + 1.0) / 2


def test_summarize_refuses_no_images_with_its_message():
    for bad in (torch.zeros(0, 4, dtype=torch.long), torch.zeros(4, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"^summarize needs counts of at least one image, shape \(N, 4\)$"):
            summarize(bad)
