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
    assert list_models() == ["resunet", "resunet-mod", "resunetpp", "unet"]
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
def test_deterministic_in_eval_mode(name):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(tiny(name).eval()(x))
    assert torch.equal(outs[0], outs[1])


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


def test_aspp_sums_branches():
    torch.manual_seed(0)
    aspp = ASPP(4, 5).eval()
    x = torch.randn(1, 4, 16, 16)
    expected = aspp.project(sum(b(x) for b in aspp.branches))
    assert torch.allclose(aspp(x), expected)


def test_attention_gate_has_no_sigmoid():
    torch.manual_seed(0)
    gate = AttentionGate(4, 6).eval()
    g, x = torch.randn(1, 4, 16, 16), torch.randn(1, 6, 8, 8)
    attn = gate.gc_conv(gate.pool(gate.g_conv(g)) + gate.x_conv(x))
    assert torch.allclose(gate(g, x), attn * x)
    assert attn.min() < 0 or attn.max() > 1  # unbounded: not a sigmoid map


def test_version_string():
    assert resunetpp.__version__.count(".") >= 2
