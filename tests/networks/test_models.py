import json

import numpy as np
import pytest
import torch
from torch import nn

import resunetpp
from resunetpp import count_parameters, create_model, list_models, model_info
from resunetpp.networks.blocks import ASPP, AttentionGate, SqueezeExcitation


def tiny(name):
    # Narrow filters keep CPU tests fast; structure is unchanged.
    return create_model(name, filters={"unet": (4, 8, 8, 8, 8), "resunetpp": (8, 8, 8, 8, 8),
                                       "resunet": (8, 8, 8, 8), "resunet-mod": (8, 8, 8, 8)}[name])


def test_registry_lists_the_four_paper_models():
    assert {"resunet", "resunet-mod", "resunetpp", "unet"} <= set(list_models())  # beside later ones (lite)
    assert list_models() == sorted(list_models())
    assert model_info("resunet").default_loss == "mse"
    assert model_info("resunet-mod").default_loss == "dice"
    assert model_info("resunetpp").default_loss == "dice"
    with pytest.raises(KeyError, match="available: resunet"):
        create_model("deeplab")


@pytest.mark.parametrize("name", ["resunet", "resunet-mod", "resunetpp", "unet"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_forward_backward_shapes(name, size):
    torch.manual_seed(0)
    model = tiny(name)
    x = torch.randn(2, 3, *size, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 1, *size)
    y.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())


def test_full_size_forward_resunetpp():
    y = create_model("resunetpp").eval()(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 1, 64, 64)


@pytest.mark.parametrize(
    "name,trainable,total",
    [
        ("resunetpp", 4_062_993, 4_070_385),
        ("resunet", 8_223_809, 8_233_025),
        ("resunet-mod", 8_223_809, 8_233_025),
        ("unet", 31_031_745, 31_031_745),
    ],
)
def test_exact_parameter_counts(name, trainable, total):
    model = create_model(name)
    assert count_parameters(model) == trainable
    assert count_parameters(model, trainable_only=False) == total


def test_wide_variant_of_the_follow_up():
    model = create_model("resunetpp", filters=(32, 64, 128, 256, 512))
    assert count_parameters(model) == 16_228_001


@pytest.mark.parametrize("name,stride", [("resunetpp", 8), ("resunet", 8), ("unet", 16)])
def test_bad_size_names_allowed_sizes(name, stride):
    model = tiny(name)
    with pytest.raises(ValueError, match=f"multiples of {stride}"):
        model(torch.randn(1, 3, 64 + stride // 2, 64))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("name", ["resunetpp", "unet", "resunet"])
def test_eval_mode_uses_running_statistics_so_an_image_does_not_depend_on_its_batch(name):
    torch.manual_seed(0)
    model = tiny(name)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.eval()
    alone = model(x[:1])
    assert torch.allclose(model(x)[:1], alone, atol=1e-5)  # BatchNorm uses its running statistics
    if name != "unet":  # U-Net has no BatchNorm: its output never depends on the batch
        model.train()
        assert not torch.allclose(model(x)[:1], model(x[:1]), atol=1e-3)  # batch statistics in training


def test_resunetpp_structure_matches_fig2():
    model = create_model("resunetpp")
    se = [m for m in model.modules() if isinstance(m, SqueezeExcitation)]
    # stem + 3 encoder + 3 decoder units, all with r = 8 and bias-free FC layers
    assert len(se) == 7
    for m in se:
        c = m.fc1.in_features
        assert m.fc1.out_features == c // 8 and m.fc2.out_features == c
        assert m.fc1.bias is None and m.fc2.bias is None

    aspp = [m for m in model.modules() if isinstance(m, ASPP)]
    assert len(aspp) == 2  # bridge and head
    assert [b[0].dilation[0] for b in aspp[0].branches] == [6, 12, 18, 1]
    assert all(isinstance(b[1], nn.BatchNorm2d) and len(b) == 2 for b in aspp[0].branches)  # BN, no activation
    assert aspp[1].project.out_channels == 16

    assert len([m for m in model.modules() if isinstance(m, AttentionGate)]) == 3
    ups = [m for m in model.modules() if isinstance(m, nn.Upsample)]
    assert ups and all(u.mode == "nearest" and u.scale_factor == 2 for u in ups)
    assert model.head.out_channels == 1
    # No sigmoid anywhere: the model returns logits.
    assert not any(isinstance(m, nn.Sigmoid) for m in model.modules())


def _identity_bn(bn: nn.BatchNorm2d) -> None:
    """Running mean 0, var 1 - eps: BN(x) = x exactly in eval mode (eps = 1e-3 as in Keras)."""
    bn.running_mean.zero_()
    bn.running_var.fill_(1 - bn.eps)
    bn.weight.data.fill_(1.0)
    bn.bias.data.zero_()


@torch.no_grad()
def test_aspp_sums_dilated_branches_with_hand_set_weights():
    """Each branch's 3x3 kernel is 0 except its top-left tap, weight k for branch k (1..4): a unit impulse at
    (20, 20) comes out at (20 + r, 20 + r) for each rate r, scaled by its branch, and the four are summed
    (DeepLab would concatenate them); the 1x1 projection then doubles and shifts by 0.5."""
    aspp = ASPP(1, 1).eval()
    assert aspp.rates == (6, 12, 18, 1)
    for k, branch in enumerate(aspp.branches, start=1):
        conv, bn = branch
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = k
        conv.bias.zero_()
        _identity_bn(bn)
    aspp.project.weight.fill_(2.0)
    aspp.project.bias.fill_(0.5)
    x = torch.zeros(1, 1, 48, 48)
    x[0, 0, 20, 20] = 1.0
    expected = torch.full((48, 48), 0.5)
    for k, r in enumerate((6, 12, 18, 1), start=1):
        expected[20 + r, 20 + r] += 2.0 * k
    assert torch.allclose(aspp(x)[0, 0], expected, atol=1e-6)
    # a branch's bias passes through its BN and the sum: biases 1, 2, 3, 4 add 2 * 10 everywhere
    for k, branch in enumerate(aspp.branches, start=1):
        branch[0].bias.fill_(k)
    assert torch.allclose(aspp(x)[0, 0], expected + 20.0, atol=1e-5)


@torch.no_grad()
def test_attention_gate_with_hand_set_weights_has_no_sigmoid():
    """One channel, identity BNs, centre-tap kernels of weight 1: attention = relu(maxpool2(relu(g)) + relu(x))
    (the last BN-ReLU-conv adds a relu), output = attention * x, computed here by hand with numpy."""
    gate = AttentionGate(1, 1).eval()
    for unit in (gate.g_conv, gate.x_conv, gate.gc_conv):
        bn, _, conv = unit
        _identity_bn(bn)
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
        conv.bias.zero_()
    g = torch.arange(64.0).reshape(1, 1, 8, 8) - 20  # negatives are cut by the first ReLU
    x = torch.full((1, 1, 4, 4), 2.0)
    x[0, 0, 0, 0] = -1.0
    gn = np.maximum(g[0, 0].numpy(), 0)
    pooled = gn.reshape(4, 2, 4, 2).max(axis=(1, 3))
    attention = np.maximum(pooled + np.maximum(x[0, 0].numpy(), 0), 0)
    expected = attention * x[0, 0].numpy()
    assert np.allclose(gate(g, x)[0, 0].numpy(), expected, atol=1e-5)
    assert expected.max() == (63 - 20 + 2) * 2  # 90: far beyond what a sigmoid gate (at most 1 * x) could give


def test_version_is_the_projects_and_the_cli_and_checkpoints_report_it(tmp_path):
    """The version is pyproject.toml's (through the installed metadata), `resunetpp --version` prints it, and a
    saved model records it (so a checkpoint says which code wrote it)."""
    import json
    import re
    from importlib.metadata import version
    from pathlib import Path

    from typer.testing import CliRunner

    from resunetpp.cli import app

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    project = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert resunetpp.__version__ == version("resunetpp") == project, "reinstall: pip install -e ."
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.split()[-1] == project
    resunetpp.save_pretrained(create_model("unet", filters=(4, 4, 4, 4, 4)), tmp_path / "m",
                              {"model": "unet", "model_kwargs": {"filters": [4, 4, 4, 4, 4]}})
    assert json.loads((tmp_path / "m" / "config.json").read_text())["version"] == project


@pytest.mark.parametrize("name, filters", [("resunetpp", (8, 8, 8, 8, 8)), ("resunetpp-lite", (8, 8, 8, 8, 8)),
                                           ("resunet", (8, 8, 8, 8)), ("unet", (4, 8, 8, 8, 8))])
def test_in_channels_builds_the_first_convolution_for_that_many_channels(name, filters):
    model = create_model(name, filters=filters, in_channels=1)
    assert model.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.randn(2, 3, 32, 32))
    assert create_model(name, filters=filters).in_channels == 3


def test_a_one_channel_model_trains_a_step_and_exports_its_config(tmp_path):
    from resunetpp import load_model
    from resunetpp.hub import save_pretrained
    from resunetpp.training.loop import training_step
    from resunetpp.training.losses import get_loss

    torch.manual_seed(0)
    model = create_model("resunetpp", filters=(8, 8, 8, 8, 8), in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    def as_float(images, masks, soft):  # Augment's presets are for RGB (colour jitter)
        return images.float() / 255, masks.float()

    step = training_step(model, opt, get_loss("dice"), as_float, {"mean": torch.zeros(1), "std": torch.ones(1)},
                         amp=False, channels_last=False)
    grey = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    loss = step(grey, (grey > 127).to(torch.uint8))
    assert torch.isfinite(loss)
    assert not torch.equal(before["stem.conv1.weight"], model.state_dict()["stem.conv1.weight"])
    assert model.stem.conv1.weight.shape[1] == 1

    save_pretrained(model, tmp_path, {"model": "resunetpp", "model_kwargs": {"filters": [8] * 5, "in_channels": 1},
                                      "input_size": [32, 32]})
    assert json.loads((tmp_path / "config.json").read_text())["model_kwargs"]["in_channels"] == 1
    loaded = load_model(tmp_path)
    model.eval()
    x = torch.rand(1, 1, 32, 32)
    assert loaded.in_channels == 1 and torch.equal(loaded(x), model(x))
