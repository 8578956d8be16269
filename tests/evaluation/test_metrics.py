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

from resunetpp.evaluation.metrics import METRIC_NAMES, confusion, scores, summarize


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


# --- the paper's Keras mIoU, detection, the polyp benchmark (issue 13) ---

def test_miou_keras_hand_cases():
    from resunetpp.evaluation.metrics import keras_confusion, miou_keras

    # only p == 1.0 is polyp: [1, 0, 0, 1] against [1, 1, 0, 0] -> each class IoU 1/3
    probs = torch.tensor([1.0, 0.9999, 0.2, 1.0])
    assert miou_keras(probs, torch.tensor([1, 1, 0, 0])) == pytest.approx(1 / 3)
    # a float32 sigmoid reaches exactly 1.0 only for logits above ~16.6
    assert torch.sigmoid(torch.tensor(17.0)) == 1.0 and torch.sigmoid(torch.tensor(16.0)) < 1.0
    # predicting no polyp: background IoU = background fraction, polyp IoU 0 (its denominator is not 0)
    gt = torch.zeros(10, dtype=torch.long)
    gt[:2] = 1
    assert miou_keras(torch.full((10,), 0.99), gt) == pytest.approx(0.8 / 2)
    # float ground truth: floor, as Keras' int cast: 254/255 is background
    assert keras_confusion(torch.ones(2), torch.tensor([1.0, 254 / 255])).tolist() == [[0, 1], [0, 1]]
    # a class absent from both is left out of the mean (Keras' num_valid_entries)
    assert miou_keras(torch.zeros(4), torch.zeros(4, dtype=torch.long)) == 1.0
    # pooled: counts of batches add up, as Keras accumulates
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    ta, tb = torch.tensor([1, 0]), torch.tensor([0, 1])
    from resunetpp.evaluation.metrics import miou_keras_from_confusion
    pooled = miou_keras_from_confusion(keras_confusion(a, ta) + keras_confusion(b, tb))
    whole = miou_keras(torch.cat([a, b]), torch.cat([ta, tb]))
    assert pooled == pytest.approx(whole) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_detection_hand_case():
    import numpy as np

    from resunetpp.evaluation.metrics import detect_polyps, summarize_detection

    gt = np.zeros((20, 20), np.uint8)
    gt[2:6, 2:6] = 1            # polyp A, 16 px
    gt[10:14, 10:14] = 1        # polyp B, 16 px
    pred = np.zeros_like(gt)
    pred[2:6, 3:7] = 1          # 12 px on A: IoU 12/20, Dice 24/32
    pred[10, 10] = 1            # 1 px on B: IoU 1/16, Dice 2/17
    pred[17:19, 17:19] = 1      # touches nothing
    r = detect_polyps(pred, gt)
    assert (r["polyps"], r["predicted"], r["found_iou50"], r["found_any"]) == (2, 3, 1, 2)
    assert (r["fp_any"], r["fp_iou50"]) == (1, 2)
    assert r["polyp_dice"] == pytest.approx([0.75, 2 / 17]) and r["polyp_iou"] == pytest.approx([0.6, 1 / 16])
    empty = detect_polyps(np.zeros_like(gt), np.zeros_like(gt))
    assert empty["polyps"] == empty["predicted"] == empty["fp_any"] == 0
    alarm = detect_polyps(pred, np.zeros_like(gt))  # no polyp: every component is a false positive
    assert alarm["fp_any"] == alarm["fp_iou50"] == 3
    s = summarize_detection([r, empty, alarm])
    assert s["polyps"] == 2 and s["sensitivity_iou50"] == 0.5 and s["sensitivity_any"] == 1.0
    assert s["fp_per_image_any"] == pytest.approx(4 / 3) and s["fp_per_image_iou50"] == pytest.approx(5 / 3)
    assert s["polyp_dice_histogram"]["counts"] == [0, 1, 0, 0, 0, 0, 0, 1, 0, 0]


def test_polyp_benchmark_against_pysodmetrics():
    import numpy as np
    import py_sod_metrics as sod

    from resunetpp.evaluation.metrics import BENCHMARK_NAMES, PolypBenchmark

    rng = np.random.default_rng(0)
    bench = PolypBenchmark()
    ref = {"wfm": sod.WeightedFmeasure(), "sm": sod.Smeasure(), "em": sod.Emeasure(), "mae": sod.MAE(),
           "fm": sod.FmeasureV2(metric_handlers={"dice": sod.DICEHandler(with_dynamic=True, with_adaptive=False)})}
    for k in range(3):
        gt = np.zeros((40, 48), bool)
        gt[5 + k:20 + k, 8:30] = True
        prob = np.clip(gt * 0.8 + rng.random(gt.shape) * 0.3, 0, 1).astype(np.float32)
        bench.step(prob, gt)
        for m in ref.values():
            m.step(pred=np.rint(prob * 255).astype(np.uint8), gt=gt.astype(np.uint8) * 255)
    got = bench.results()
    assert set(got) == set(BENCHMARK_NAMES) and bench.images == 3
    assert got["wFm"] == ref["wfm"].get_results()["wfm"] and got["Sm"] == ref["sm"].get_results()["sm"]
    assert got["MAE"] == ref["mae"].get_results()["mae"]
    assert got["maxEm"] == ref["em"].get_results()["em"]["curve"].max()
    assert got["mDice"] == ref["fm"].get_results()["dice"]["dynamic"].mean()
    # hand case: a perfect binary map scores MAE 0, Sm 1, wFm 1; its Dice is 1 at 255 of the 256 thresholds
    # and 2|G| / (|G| + N) at threshold 0, where everything counts as foreground
    gt = np.zeros((20, 20), bool)
    gt[4:12, 4:8] = True
    one = PolypBenchmark()
    one.step(gt.astype(np.float32), gt)
    r = one.results()
    assert r["MAE"] == 0 and r["Sm"] == pytest.approx(1) and r["wFm"] == pytest.approx(1)
    assert r["mDice"] == pytest.approx((255 + 2 * 32 / (32 + 400)) / 256)
    with pytest.raises(ValueError, match="differ in shape"):
        one.step(np.zeros((4, 4)), np.zeros((4, 5), bool))
