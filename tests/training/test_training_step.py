"""The training step and `setup()` through the paths `train()` takes, with hand-computed expectations:

- image and mask get the same augmentation (what the model sees is aligned with what the loss compares);
- each step's gradient is that step's alone (`zero_grad`), checked exactly with SGD on a hand-set model;
- the schedule `setup()` builds spans exactly epochs x steps per epoch (the learning rate logged after each
  epoch is the closed-form cosine / SGDR value at that step count).

Tiny: 32x32 synthetic images written in tmp_path, a ResUNet++ with 8 filters, a few epochs.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import resunetpp.training.loop as T
from helpers.training import tiny as train_tiny
from resunetpp.data import Augment
from resunetpp.training.loop import TrainConfig, train

INSIDE, OUTSIDE = 200, 20  # grey levels of the shape and the background (no noise: every pixel is readable)


def write_shapes(root: Path, n: int = 24, size: int = 32, seed: int = 0) -> Path:
    """images/<i>.png: an L-shaped bright region (no symmetry: a flip, turn or shift moves it) on a dark
    background, masks/<i>.png: exactly that region."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        mask = np.zeros((size, size), bool)
        y, x = (int(v) for v in rng.integers(3, size // 2 - 2, 2))
        mask[y:y + 14, x:x + 5] = True          # the upright stroke
        mask[y + 10:y + 14, x:x + 13] = True    # the foot, to the right
        image = np.where(mask, INSIDE, OUTSIDE).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"{i}.png"), np.repeat(image[:, :, None], 3, 2))
        cv2.imwrite(str(root / "masks" / f"{i}.png"), mask.astype(np.uint8) * 255)
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes") / "shapes")


def tiny(data, out, **kw) -> TrainConfig:
    return train_tiny(data, out, **{"augment": "paper", **kw})  # test_train's tiny run, with the paper's warps


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _constant_validation(*args, **kwargs):  # validation is not what these tests look at: skip its cost
    return {"val_loss": 0.5, **{f"val_{k}": 0.5 for k in T.METRIC_NAMES}}


# ------------------------------------------------------------------------------ augmentation alignment

class Probe(torch.nn.Module):
    """A one-parameter model that records what the training step feeds it (in `seen`: the input, its memory
    layout, the autocast state) and answers its first channel, in float32."""

    def __init__(self, seen: dict):
        super().__init__()
        self.seen = seen
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        self.seen.update(x=x.detach().clone(), channels_last=x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous(), autocast=torch.is_autocast_enabled(x.device.type),
                         dtype=torch.get_autocast_dtype(x.device.type))
        return (self.w * x[:, :1]).float()


def test_train_augments_image_and_mask_together(shapes, tmp_path, monkeypatch):
    """Every (model input, loss target) pair of every training step: the bright pixels of the augmented image
    lie on the augmented mask. Brightness (+-0.2) and cutout (which only darkens) cannot make the
    background (20/255) brighter than 0.43 nor break this; a mask warped by another draw than its image
    (flip, turn, crop, zoom) would put the L elsewhere."""
    seen_x, seen_y = [], []
    make_model, get_loss = T.create_model, T.get_loss

    def recording_model(*args, **kwargs):
        model = make_model(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: seen_x.append(inputs[0].detach().clone())
                                        if m.training else None)
        return model

    def recording_loss(name):
        loss = get_loss(name)

        def fn(logits, target):
            if torch.is_grad_enabled():
                seen_y.append(target.detach().clone())
            return loss(logits, target)
        return fn

    monkeypatch.setattr(T, "create_model", recording_model)
    monkeypatch.setattr(T, "get_loss", recording_loss)
    monkeypatch.setattr(T, "validate", _constant_validation)
    train(tiny(shapes, tmp_path / "run", epochs=3))
    n_train = len(json.loads((tmp_path / "run" / "split.json").read_text())["train"])
    assert len(seen_x) == len(seen_y) == 3 * (n_train // 4)  # every training step was seen
    x, y = torch.cat(seen_x), torch.cat(seen_y)
    assert x.min() >= 0 and x.max() <= 1  # default normalisation (mean 0, std 1): x is the augmented image
    bright = x.mean(1, keepdim=True) > 0.43
    # one pixel of slack around the mask: the bilinear warp blurs the edge, the mask is re-binarised at 0.5
    near = torch.nn.functional.max_pool2d(y, 3, stride=1, padding=1) > 0
    outside = (bright & ~near).flatten(1).sum(1)
    assert (bright.flatten(1).sum(1) > 20).all()  # every sample shows its shape
    assert outside.tolist() == [0] * len(x), f"bright pixels off the mask in samples {outside.nonzero().ravel()}"
    # and the augmentation really ran (else this test would say nothing): most masks are no longer one of the
    # originals' L shapes in their original places
    from resunetpp.data import load_pairs

    originals = load_pairs(shapes, size=32, progress=False).masks.float()
    moved = [not any(torch.equal(m, o) for o in originals) for m in y]
    assert sum(moved) > len(y) // 2, sum(moved)


def test_training_step_passes_one_draw_to_image_and_mask():
    """The step itself, on a batch whose image is its mask: with every geometric transform forced on (p=1),
    the model input thresholded is the loss target."""
    seen = {}

    def loss_fn(logits, target):
        seen["y"] = target.detach().clone()
        return logits.mean()

    model = Probe(seen)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    augment = Augment("paper", p=1.0, only=["random_crop", "hflip", "vflip", "rotate"])
    step = T.training_step(model, opt, loss_fn, augment, {"mean": [0.0] * 3, "std": [1.0] * 3}, amp=False,
                           channels_last=False)
    rng = np.random.default_rng(3)
    masks = torch.zeros(8, 1, 32, 32, dtype=torch.uint8)
    for i in range(8):
        y, x = (int(v) for v in rng.integers(2, 14, 2))
        masks[i, 0, y:y + 16, x:x + 4] = 1
        masks[i, 0, y + 12:y + 16, x:x + 12] = 1
    images = (masks * 255).expand(8, 3, 32, 32).contiguous()
    torch.manual_seed(0)
    step(images, masks)
    agree = ((seen["x"][:, :1] > 0.5) == (seen["y"] > 0.5)).float().flatten(1).mean(1)
    assert (agree > 0.99).all(), agree  # bilinear edges only
    assert not torch.equal(seen["y"], masks.float())  # the masks were moved


# ------------------------------------------------------------------------------ zero_grad, exactly

def test_each_step_uses_only_its_own_gradient():
    """A one-weight model w * x with loss mean(logits): the gradient is mean(x) (by hand). With SGD at lr 1
    two steps give w0 - g1 - g2; gradients accumulated across steps (no zero_grad) would give w0 - 2 g1 - g2."""
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

        def forward(self, x):
            return self.w * x.double()

    model = Scale()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    step = T.training_step(model, opt, lambda logits, y: logits.mean(), Augment("none"),
                           {"mean": [0.0] * 3, "std": [1.0] * 3}, amp=False, channels_last=False)
    a = torch.full((2, 3, 4, 4), 51, dtype=torch.uint8)    # mean(x) = 0.2
    b = torch.full((2, 3, 4, 4), 204, dtype=torch.uint8)   # mean(x) = 0.8
    m = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    g1, g2 = 51 / 255, 204 / 255
    loss1 = step(a, m)
    assert loss1.item() == pytest.approx(2.0 * g1, abs=1e-6)  # the loss before the update
    assert model.w.item() == pytest.approx(2.0 - g1, abs=1e-6)
    loss2 = step(b, m)
    assert loss2.item() == pytest.approx((2.0 - g1) * g2, abs=1e-6)
    assert model.w.item() == pytest.approx(2.0 - g1 - g2, abs=1e-6)
    step(b, m)
    assert model.w.item() == pytest.approx(2.0 - g1 - 2 * g2, abs=1e-6)


# ------------------------------------------------------------------------------ the schedule setup() builds

def _sgdr(lr: float, total: int, t: int) -> float:
    """The SGDR learning rate after t scheduler steps (train.py's docstring): T_0 = ceil(total / 15), cycles
    T_0, 2 T_0, 4 T_0, ..., cosine from lr down to lr / 100 within each."""
    length, start = math.ceil(total / 15), 0
    while t >= start + length:
        start, length = start + length, 2 * length
    low = lr * 0.01
    return low + (lr - low) * (1 + math.cos(math.pi * (t - start) / length)) / 2


def _cosine(lr: float, total: int, t: int) -> float:
    low = lr * 0.01
    return low + (lr - low) * (1 + math.cos(math.pi * t / total)) / 2


@pytest.mark.parametrize("schedule, expected", [("cosine", _cosine), ("sgdr", _sgdr)])
def test_setup_schedules_exactly_epochs_times_steps(schedule, expected, shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "validate", _constant_validation)
    epochs, lr = 4, 1e-2
    run = train(tiny(shapes, tmp_path / "run", epochs=epochs, lr=lr, schedule=schedule, augment="none"))
    steps = len(json.loads((run / "split.json").read_text())["train"]) // 4  # batch 4, the partial batch dropped
    assert yaml.safe_load((run / "train_config.yaml").read_text())["steps_per_epoch"] == steps
    rows = _read_csv(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    got = [float(r["lr"]) for r in rows]
    want = [expected(lr, epochs * steps, e * steps) for e in range(1, epochs + 1)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    if schedule == "cosine":
        assert got[-1] == pytest.approx(lr * 0.01, rel=1e-9)  # annealed all the way at the last step


@pytest.mark.parametrize("amp, channels_last", [(False, False), (True, True)])
def test_training_step_normalises_lays_out_and_autocasts_as_asked(amp, channels_last):
    """The model input is (image / 255 - mean) / std with the step's own normalisation, in channels_last memory
    when asked, and the forward runs under bf16 autocast exactly when `amp`."""
    seen = {}

    model = Probe(seen)
    step = T.training_step(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda logits, y: logits.mean(),
                           Augment("none"), {"mean": [0.5, 0.25, 0.0], "std": [0.25, 0.5, 2.0]}, amp=amp,
                           channels_last=channels_last)
    images = torch.randint(0, 256, (2, 3, 4, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    step(images, torch.zeros(2, 1, 4, 6, dtype=torch.uint8))
    x = images.double() / 255
    expected = torch.stack([(x[:, 0] - 0.5) / 0.25, (x[:, 1] - 0.25) / 0.5, x[:, 2] / 2.0], 1)
    torch.testing.assert_close(seen["x"].double(), expected, atol=1e-6, rtol=0)
    assert seen["channels_last"] is channels_last
    assert seen["autocast"] is amp
    if amp:
        assert seen["dtype"] == torch.bfloat16


def test_training_step_warps_a_teachers_soft_targets_with_the_mask_and_hands_them_to_the_loss():
    """Distillation: soft targets (uint8 probabilities x 255) get the same draw as image and mask and reach the
    loss as its third argument, on the 0..1 scale; without them the loss gets two arguments."""
    seen = {}

    def loss_fn(logits, *targets):
        seen["targets"] = [t.detach().clone() for t in targets]
        return logits.mean()

    model = torch.nn.Conv2d(3, 1, 1)
    step = T.training_step(model, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn,
                           Augment("paper", p=1.0, only=["random_crop", "hflip", "vflip", "rotate"]),
                           {"mean": [0.0] * 3, "std": [1.0] * 3}, amp=False, channels_last=False)
    masks = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    masks[:, :, 4:20, 6:12] = 1
    masks[:, :, 16:20, 6:24] = 1
    images = (masks * 255).expand(4, 3, 32, 32).contiguous()
    torch.manual_seed(0)
    step(images, masks, masks * 200)  # a teacher 200/255 sure wherever the mask is
    y, soft = seen["targets"]
    assert not torch.equal(y, masks.float())  # moved
    assert soft.max().item() == pytest.approx(200 / 255, abs=1e-6) and soft.min().item() == 0
    agree = ((soft > 100 / 255) == (y > 0.5)).float().flatten(1).mean(1)
    assert (agree > 0.99).all(), agree  # the same warp; bilinear edges only
    step(images, masks)
    assert len(seen["targets"]) == 1
