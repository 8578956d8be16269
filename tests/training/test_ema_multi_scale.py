"""Two switches of the strong recipe: the weights' exponential moving average (`ema`) and multi-scale training
(`multi_scale`). Tiny models on synthetic discs, on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import resunetpp.training.loop as T
from helpers.training import tiny, write_discs
from resunetpp.data import Augment
from resunetpp.errors import SettingError
from resunetpp.training.loop import TrainConfig, train

NORM = {"mean": [0.0] * 3, "std": [1.0] * 3}


@pytest.fixture(scope="module")
def discs(tmp_path_factory):
    return write_discs(tmp_path_factory.mktemp("ema") / "discs")


class Scale(torch.nn.Module):
    """logits = w * x (one weight, float64) and a buffer that counts the forward passes."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.register_buffer("calls", torch.tensor(0.0, dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return self.w * x[:, :1].double()


def test_ema_follows_every_step_by_its_decay():
    """With SGD at lr 1 and loss mean(logits), each step lowers w by mean(x); the average starts at the model's
    weights and moves by 1 - d towards each new one, d = min(decay, (1 + t) / (10 + t)) at update t (the warm-up),
    buffers too."""
    model = Scale()
    ema = T.make_ema(model, 0.9)
    step = T.training_step(model, torch.optim.SGD(model.parameters(), lr=1.0), lambda logits, y: logits.mean(),
                           Augment("none"), NORM, amp=False, channels_last=False, ema=ema)
    m = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    expected, calls = 2.0, 0.0
    for t, value in enumerate((51, 102, 204, 153, 102, 51, 204, 204, 102, 51, 153, 204)):
        step(torch.full((2, 3, 4, 4), value, dtype=torch.uint8), m)
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * model.w.item()
        calls = d * calls + (1 - d) * model.calls.item()
        assert ema.module.w.item() == pytest.approx(expected, abs=1e-12)
        assert ema.module.calls.item() == pytest.approx(calls, abs=1e-12)
    assert ema.updates == 12 and ema.current_decay() == pytest.approx(13 / 22)  # still warming up
    ema.updates = 81
    assert ema.current_decay() == 0.9  # (1 + 81) / 91 > 0.9: the decay asked for from there on
    assert ema.module.w.item() != pytest.approx(model.w.item(), abs=1e-3)  # it lags the trained weights
    assert not ema.module.w.requires_grad and not ema.module.training
    assert T.make_ema(model, 0.0) is None


def test_a_run_with_ema_validates_and_saves_the_averaged_weights(discs, tmp_path):
    run = train(tiny(discs, tmp_path / "run", epochs=1, ema=0.9))
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    saved = load_file(run / "model.safetensors")
    averaged = last["ema"]["module"]
    assert saved.keys() == averaged.keys() == last["model"].keys()
    assert all(torch.equal(saved[k], averaged[k].to(saved[k].dtype)) for k in saved)
    assert any(not torch.equal(saved[k], last["model"][k]) for k in saved)  # not the trained weights
    assert json.loads((run / "config.json").read_text())["training"]["ema"] == 0.9
    plain = train(tiny(discs, tmp_path / "plain", epochs=1))
    assert "ema" not in torch.load(plain / "last.pt", weights_only=True)
    assert "ema" not in json.loads((plain / "config.json").read_text())["training"]


def test_a_resumed_run_with_ema_matches_an_unbroken_one(discs, tmp_path):
    whole = train(tiny(discs, tmp_path / "whole", epochs=2, ema=0.8))
    cut = train(tiny(discs, tmp_path / "cut", epochs=2, ema=0.8, time_limit=1e-6))
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 1
    train(tiny(discs, tmp_path / "cut", epochs=2, ema=0.8), resume=cut)
    a, b = (torch.load(r / "last.pt", weights_only=True)["ema"] for r in (whole, cut))
    assert a["updates"] == b["updates"] > 0
    assert a["module"].keys() == b["module"].keys() and all(torch.equal(a["module"][k], b["module"][k])
                                                            for k in a["module"])


def test_ema_out_of_range_is_refused():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(SettingError, match="ema must lie in"):
            TrainConfig(data="x", ema=bad).resolved()


def test_multi_scale_sizes_are_the_stride_multiples_of_three_scales():
    assert T.multi_scale_sizes(352, 16) == (272, 352, 448)  # 264 -> 272, 440 -> 448 (halves round up)
    assert T.multi_scale_sizes(256, 16) == (192, 256, 320)
    assert T.multi_scale_sizes(32, 16) == (32, 48)  # 24 -> 32 and 32; 40 -> 48
    assert T.multi_scale_sizes(8, 16) == (16,)      # never below one stride


def test_rescale_resizes_images_and_soft_targets_and_keeps_masks_binary():
    x = torch.rand(2, 3, 32, 32)
    y = torch.zeros(2, 1, 32, 32)
    y[:, :, 8:24, 8:24] = 1
    soft = torch.rand(2, 1, 32, 32)
    x2, y2, (s2,) = T.rescale(x, y, [soft], 48)
    assert x2.shape == (2, 3, 48, 48) and y2.shape == s2.shape == (2, 1, 48, 48)
    assert set(y2.unique().tolist()) == {0.0, 1.0} and y2.sum() == pytest.approx(24 * 24 * 2, rel=0.05)
    assert x2.mean() == pytest.approx(x.mean().item(), abs=0.01)
    same = T.rescale(x, y, [soft], 32)
    assert same[0] is x and same[1] is y


def test_multi_scale_steps_draw_every_size(monkeypatch):
    """Each step resizes its batch to one of the sizes, drawn per step from the seeded global RNG."""
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            seen.append(x.shape[-1])
            return self.w + x[:, :1]

    model = Probe()
    step = T.training_step(model, torch.optim.SGD(model.parameters(), lr=0.0), lambda logits, y: logits.mean(),
                           Augment("none"), NORM, amp=False, channels_last=False, sizes=(16, 32, 48))
    images, masks = torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    torch.manual_seed(0)
    for _ in range(30):
        step(images, masks)
    first = list(seen)
    assert set(first) == {16, 32, 48}
    seen.clear()
    torch.manual_seed(0)
    for _ in range(30):
        step(images, masks)
    assert seen == first  # reproducible from the seed


def test_a_multi_scale_run_trains_and_records_it(discs, tmp_path):
    run = train(tiny(discs, tmp_path / "ms", epochs=1, multi_scale=True))
    assert json.loads((run / "config.json").read_text())["training"]["multi_scale"] == [0.75, 1.0, 1.25]
    assert json.loads((run / "config.json").read_text())["input_size"] == [32, 32]  # validation stays at size
