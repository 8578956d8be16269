import pytest
import torch
from torchmetrics.classification import BinaryFBetaScore, BinaryJaccardIndex, MulticlassJaccardIndex
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_fbeta_score,
    binary_precision,
    binary_recall,
    binary_stat_scores,
)
from torchmetrics.functional.segmentation import dice_score

from resunetpp.metrics import METRIC_NAMES, confusion, scores, summarize


def _mask(*boxes, size=8):
    m = torch.zeros(size, size, dtype=torch.bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


def _one(pred, gt):
    s = scores(confusion(pred[None], gt[None]))
    return {k: float(v[0]) for k, v in s.items()}


def test_hand_computed_overlap():
    gt = _mask((0, 4, 0, 4))        # 16 px
    pred = _mask((0, 4, 2, 6))      # 16 px, 8 overlap
    r = _one(pred, gt)
    # tp 8, fp 8, fn 8, tn 40 of 64
    assert r["dice"] == pytest.approx(16 / 32)
    assert r["iou"] == pytest.approx(8 / 24)
    assert r["recall"] == pytest.approx(0.5) and r["precision"] == pytest.approx(0.5)
    assert r["f2"] == pytest.approx(40 / (40 + 32 + 8))
    assert r["accuracy"] == pytest.approx(48 / 64)
    assert r["miou_2class"] == pytest.approx((8 / 24 + 40 / 56) / 2)


def test_perfect_disjoint_and_empty_conventions():
    gt = _mask((2, 5, 2, 5))
    empty = _mask()
    perfect = _one(gt, gt)
    assert all(perfect[k] == 1.0 for k in METRIC_NAMES)
    disjoint = _one(_mask((6, 8, 6, 8)), gt)
    assert disjoint["dice"] == disjoint["iou"] == disjoint["recall"] == disjoint["precision"] == disjoint["f2"] == 0
    assert 0 < disjoint["miou_2class"] < 0.5 and 0 < disjoint["accuracy"] < 1
    both_empty = _one(empty, empty)  # nothing to find, nothing found: perfect
    assert all(both_empty[k] == 1.0 for k in METRIC_NAMES)
    false_alarm = _one(_mask((0, 1, 0, 1)), empty)  # empty ground truth, one false-positive pixel
    assert false_alarm["dice"] == false_alarm["iou"] == false_alarm["recall"] == false_alarm["precision"] == 0
    assert false_alarm["accuracy"] == pytest.approx(63 / 64)
    assert false_alarm["miou_2class"] == pytest.approx(63 / 64 / 2)
    missed = _one(empty, gt)  # polyp missed entirely
    assert missed["dice"] == missed["recall"] == missed["precision"] == missed["f2"] == 0


def test_mean_versus_pooled():
    gt = torch.stack([_mask((0, 8, 0, 8)), _mask((0, 1, 0, 1))])   # 64 px and 1 px polyps
    pred = torch.stack([_mask((0, 8, 0, 8)), _mask()])             # big one found, small one missed
    s = summarize(confusion(pred, gt))
    assert s["images"] == 2
    assert s["mean"]["dice"] == pytest.approx(0.5)                 # (1 + 0) / 2
    assert s["pooled"]["dice"] == pytest.approx(128 / 129)         # 2*64 / (2*64 + 1)
    assert set(s["mean"]) == set(s["pooled"]) == set(METRIC_NAMES)


def test_cross_check_with_torchmetrics():
    g = torch.Generator().manual_seed(0)
    n = 6
    gt = torch.rand(n, 1, 32, 32, generator=g) > 0.7
    pred = torch.rand(n, 1, 32, 32, generator=g) > 0.5
    gt[0] = False  # an empty ground truth with false positives somewhere in the batch
    stats = confusion(pred, gt)
    p, t = pred.long(), gt.long()

    # counts: torchmetrics orders them tp, fp, tn, fn, support
    tm = binary_stat_scores(p, t, multidim_average="samplewise")
    assert torch.equal(stats, tm[:, [0, 1, 3, 2]])

    s = summarize(stats)
    pooled = s["pooled"]
    assert pooled["precision"] == pytest.approx(binary_precision(p, t).item(), abs=1e-6)
    assert pooled["recall"] == pytest.approx(binary_recall(p, t).item(), abs=1e-6)
    assert pooled["accuracy"] == pytest.approx(binary_accuracy(p, t).item(), abs=1e-6)
    assert pooled["f2"] == pytest.approx(binary_fbeta_score(p, t, beta=2.0).item(), abs=1e-6)
    assert pooled["iou"] == pytest.approx(BinaryJaccardIndex()(p, t).item(), abs=1e-6)
    assert pooled["miou_2class"] == pytest.approx(
        MulticlassJaccardIndex(num_classes=2, average="macro")(p.squeeze(1), t.squeeze(1)).item(), abs=1e-6)

    # per image (all images here have some foreground in the prediction or the ground truth)
    per = scores(stats)
    tm_f2 = BinaryFBetaScore(beta=2.0, multidim_average="samplewise")(p.flatten(1), t.flatten(1))
    assert torch.allclose(per["f2"].float(), tm_f2, atol=1e-6)
    tm_dice = dice_score(torch.cat([1 - p, p], 1), torch.cat([1 - t, t], 1), num_classes=2, include_background=False,
                         average="none", input_format="one-hot", aggregation_level="samplewise")
    assert torch.allclose(per["dice"].float(), tm_dice.squeeze(-1).float(), atol=1e-6)
    tm_iou = torch.stack([BinaryJaccardIndex()(p[i], t[i]) for i in range(n)])
    assert torch.allclose(per["iou"].float(), tm_iou, atol=1e-6)
    tm_miou = torch.stack([MulticlassJaccardIndex(num_classes=2, average="macro")(p[i], t[i]) for i in range(n)])
    assert torch.allclose(per["miou_2class"].float(), tm_miou, atol=1e-6)


def test_shape_mismatch_and_empty_input():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match="at least one image"):
        summarize(torch.zeros(0, 4, dtype=torch.long))
