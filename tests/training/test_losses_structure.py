"""The `structure` loss (PraNet, Fan et al. MICCAI 2020): checked against a plain-Python reference."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from resunetpp.training.config import TrainConfig
from resunetpp.training.losses import LOSSES, get_loss, structure_loss


def reference(logits: list[list[list[float]]], masks: list[list[list[int]]]) -> float:
    """The structure loss written out with loops: images as nested lists (N, H, W), no torch."""
    total = 0.0
    for x, y in zip(logits, masks):
        h, w = len(y), len(y[0])
        wbce_num = wbce_den = inter = union = 0.0
        for i in range(h):
            for j in range(w):
                # 31 x 31 mean with zero padding, the padding counted (avg_pool2d's default)
                window = sum(y[a][b] for a in range(max(0, i - 15), min(h, i + 16))
                             for b in range(max(0, j - 15), min(w, j + 16)))
                weit = 1 + 5 * abs(window / 961 - y[i][j])
                p = 1 / (1 + math.exp(-x[i][j]))
                bce = -(y[i][j] * math.log(p) + (1 - y[i][j]) * math.log(1 - p))
                wbce_num += weit * bce
                wbce_den += weit
                inter += p * y[i][j] * weit
                union += (p + y[i][j]) * weit
        total += wbce_num / wbce_den + 1 - (inter + 1) / (union - inter + 1)
    return total / len(logits)


def test_registered_and_offered_by_the_training_config():
    assert get_loss("structure") is structure_loss and LOSSES["structure"] is structure_loss
    loss_setting = next(f for f in fields(TrainConfig) if f.name == "loss").metadata["setting"]
    assert "structure" in loss_setting.names()


def test_a_hand_checked_value():
    # 2x2, one foreground pixel, logits 0: p = 1/2 and bce = ln 2 everywhere, so wbce = ln 2. Every window
    # holds the whole image: mean 1/961, weights 1 + 5 * 960/961 (foreground) and 1 + 5/961 (background).
    y = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    w1, w0 = 1 + 5 * 960 / 961, 1 + 5 / 961
    inter, union = 0.5 * w1, 1.5 * w1 + 3 * 0.5 * w0
    expected = math.log(2) + 1 - (inter + 1) / (union - inter + 1)
    assert structure_loss(torch.zeros(1, 1, 2, 2), y).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(reference([[[0.0, 0.0], [0.0, 0.0]]], [[[1, 0], [0, 0]]]), rel=1e-12)


def test_matches_the_reference_per_image_then_averaged():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 20, 36, generator=g) * 3
    y = torch.zeros(2, 1, 20, 36)
    y[0, 0, 4:15, 6:20] = 1  # a block near the top-left
    y[1, 0, 10:, 30:] = 1    # a block touching the bottom-right edges: padding counts there
    expected = reference(logits[:, 0].tolist(), y[:, 0].int().tolist())
    assert structure_loss(logits, y).item() == pytest.approx(expected, rel=1e-5)
    per_image = (structure_loss(logits[:1], y[:1]) + structure_loss(logits[1:], y[1:])) / 2
    assert structure_loss(logits, y).item() == pytest.approx(per_image.item(), rel=1e-6)
    assert structure_loss(logits, y.to(torch.uint8)).item() == structure_loss(logits, y).item()


def test_an_error_on_the_boundary_costs_its_weight():
    # 96x96: a 48x48 square (rows and columns 8..55) and one isolated pixel at (80, 80). Turning a confident
    # right foreground pixel into a confident wrong one adds weight x a constant to the loss (the BCE
    # numerator and the IoU's intersection change by the pixel's weight; sum(weit) and union - inter do not).
    y = torch.zeros(1, 1, 96, 96)
    y[..., 8:56, 8:56] = 1
    y[..., 80, 80] = 1
    right = (2 * y - 1) * 10
    base = structure_loss(right, y).item()

    def cost(i: int, j: int) -> float:
        wrong = right.clone()
        wrong[..., i, j] = -10
        return structure_loss(wrong, y).item() - base

    interior = cost(31, 31)                           # its window lies inside the square: weight 1
    edge = cost(8, 31)                                # on the square's top edge: 16 of 31 window rows inside
    isolated = cost(80, 80)                           # alone in its window: the largest weight, almost 6
    assert interior > 0
    assert edge / interior == pytest.approx(1 + 5 * (1 - 16 * 31 / 961), rel=1e-3)   # 3.42
    assert isolated / interior == pytest.approx(1 + 5 * (1 - 1 / 961), rel=1e-3)     # 5.99
    assert cost(32, 40) == pytest.approx(interior, rel=1e-3)  # another interior pixel: the same weight 1


def test_perfect_near_zero_wrong_large():
    y = torch.zeros(2, 1, 32, 32)
    y[0, ..., 5:20, 8:30] = 1
    y[1, ..., 16:, :] = 1
    perfect = (2 * y - 1) * 20
    assert structure_loss(perfect, y).item() == pytest.approx(0.0, abs=1e-6)
    wrong = structure_loss(-perfect, y).item()
    assert wrong > 20  # wbce about 20 (the logits' size), wiou about 1
    # an empty mask predicted empty: the IoU's smoothing gives 1 - 1/1 = 0
    assert structure_loss(torch.full((1, 1, 8, 8), -20.0), torch.zeros(1, 1, 8, 8)).item() == pytest.approx(
        0.0, abs=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_gradients_are_finite(scale):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 1, 40, 40, generator=g) * scale).requires_grad_()
    y = (torch.rand(2, 1, 40, 40, generator=g) > 0.5).float()
    loss = structure_loss(logits, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bf16_logits_give_the_float32_value_of_the_same_numbers():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 1, 48, 48, generator=g) * 4).bfloat16()
    y = torch.zeros(2, 1, 48, 48)
    y[0, ..., 10:30, 12:40] = 1
    y[1, ..., 20:, 5:25] = 1
    f32 = structure_loss(logits.float(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = structure_loss(logits, y.to(torch.uint8))
    assert bf16.dtype == torch.float32 and torch.equal(bf16, f32)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="differ in shape"):
        structure_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
