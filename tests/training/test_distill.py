"""Distillation: the teacher's probabilities (computed once, cached, warped with the masks) and the loss."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import resunetpp.training.distill as D
from helpers.training import TINY, write_discs
from resunetpp import create_model
from resunetpp.data import Augment
from resunetpp.hub import save_pretrained
from resunetpp.inference.transforms import predict_probs
from resunetpp.training.loop import TrainConfig, train, training_step
from resunetpp.training.losses import get_loss


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny untrained ResUNet++ with non-trivial outputs, saved as a run folder at 32x32."""
    torch.manual_seed(3)
    model = create_model("resunetpp", **TINY).eval()
    return save_pretrained(model, tmp_path_factory.mktemp("teacher"),
                           {"model": "resunetpp", "model_kwargs": TINY, "input_size": [32, 32]})


def test_loss_mixes_mask_loss_and_soft_bce_by_weight():
    torch.manual_seed(0)
    logits, mask, soft = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float(), torch.rand(2, 1, 8, 8)
    base = get_loss("dice")
    p = torch.sigmoid(logits)
    by_hand = -(soft * p.log() + (1 - soft) * (1 - p).log()).mean()  # BCE written out
    for w in (0.0, 0.3, 1.0):
        got = D.distillation_loss(base, w)(logits, mask, soft)
        assert got.item() == pytest.approx(((1 - w) * base(logits, mask) + w * by_hand).item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        D.distillation_loss(base, 1.5)


def test_soft_targets_get_exactly_the_masks_warp():
    """With soft = mask x 255, the warped soft targets thresholded at 0.5 are the warped masks, for every
    geometric transform of the paper preset (drawn with p = 1)."""
    torch.manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    masks = torch.zeros(6, 1, 40, 40, dtype=torch.uint8)
    masks[:, :, 8:30, 12:26] = 1
    aug = Augment("paper", p=1.0)
    torch.manual_seed(7)
    x, y, s = aug(images, masks, masks * 255)
    torch.manual_seed(7)
    x2, y2 = aug(images, masks)  # the same draw without soft targets: same images and masks
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal((s > 0.5).float(), y)
    assert 0 < s.mean() < 1 and not torch.equal(y, masks.float())  # something moved


@pytest.mark.parametrize("openvino", [False, True])
def test_teacher_probabilities_are_the_teachers_own(teacher, openvino):
    if openvino:
        pytest.importorskip("openvino")
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)  # resized to the teacher's 32 and back
    got = D.teacher_probs(teacher, images, progress=False, openvino=openvino)
    small = F.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True).round().to(torch.uint8)
    want = F.interpolate(predict_probs(D.load_model(teacher), small), size=(48, 48), mode="bilinear")
    assert got.dtype == torch.uint8 and got.shape == (3, 1, 48, 48)
    assert (got.float() - want * 255).abs().max() <= 1.0  # uint8 rounding


def test_training_step_takes_its_targets_from_the_teacher_at_weight_1():
    """At weight 1 the masks play no part: two different masks give bit-identical weights; at weight 0
    the teacher plays none."""
    def weights_after(mask, soft, w):
        torch.manual_seed(0)
        model = create_model("resunetpp-lite")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = training_step(model, opt, D.distillation_loss(get_loss("bce+dice"), w), Augment("none"),
                             {"mean": [0.0] * 3, "std": [1.0] * 3}, amp=False, channels_last=False)
        step(images, mask, soft)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    m1, m2 = torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.ones(2, 1, 32, 32, dtype=torch.uint8)
    s1, s2 = torch.full_like(m1, 30), torch.full_like(m1, 220)
    assert torch.equal(weights_after(m1, s1, 1.0), weights_after(m2, s1, 1.0))
    assert not torch.equal(weights_after(m1, s1, 1.0), weights_after(m1, s2, 1.0))
    assert torch.equal(weights_after(m1, s1, 0.0), weights_after(m1, s2, 0.0))


def test_train_runs_the_teacher_once_and_resumes_from_its_cache(tmp_path, teacher, monkeypatch):
    data = write_discs(tmp_path / "discs", n=16)
    calls = []
    real = D.teacher_probs
    monkeypatch.setattr(D, "teacher_probs", lambda *a, **k: calls.append(1) or real(*a, **{**k, "openvino": False}))
    cfg = TrainConfig(model="resunetpp-lite", data=str(data), out=str(tmp_path / "run"), size=32, epochs=1,
                      batch_size=4, lr=3e-3, augment="paper", progress=False, teacher=str(teacher),
                      distill_weight=0.4)
    run = train(cfg)
    assert calls == [1]
    cached = load_file(str(run / D.CACHE_NAME))["probs"]
    assert cached.dtype == torch.uint8 and cached.shape[1:] == (1, 32, 32)
    training = json.loads((run / "config.json").read_text())["training"]
    assert training["distillation"] == {"teacher": str(teacher), "weight": 0.4}
    train(TrainConfig(**{**cfg.__dict__, "epochs": 2}), resume=run)
    assert calls == [1]  # the resumed run read the cache


def test_the_cache_is_recomputed_for_other_images(tmp_path, teacher):
    path = tmp_path / D.CACHE_NAME
    a = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pa = D.cached_teacher_probs(teacher, a, ["1", "2"], path, progress=False, openvino=False)
    b = a.flip(-1)
    pb = D.cached_teacher_probs(teacher, b, ["1", "3"], path, progress=False, openvino=False)  # other ids
    assert torch.equal(pb, D.teacher_probs(teacher, b, progress=False, openvino=False))
    assert not torch.equal(pa, pb)
    assert F.mse_loss(pa.float(), pb.float()) > 0
