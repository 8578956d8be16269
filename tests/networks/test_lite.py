"""resunetpp-lite: the registry entries, input rules, cost, and export to ONNX / OpenVINO with parity."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import resunetpp
from resunetpp.inference.export import export_onnx
from resunetpp.networks.blocks import ConvBNReLU, LiteResidualUnit
from resunetpp.networks.registry import count_parameters, model_info


def test_registered_with_its_widths():
    model = resunetpp.create_model("resunetpp-lite")
    assert "resunetpp-lite" in resunetpp.list_models()
    assert model.filters == (16, 16, 32, 64, 128)
    assert model_info("resunetpp-lite").default_loss == "bce+dice"


def test_logits_at_input_size_for_multiples_of_16():
    model = resunetpp.create_model("resunetpp-lite").eval()
    with torch.no_grad():
        for h, w in ((256, 256), (64, 96), (288, 384)):
            assert model(torch.rand(2, 3, h, w)).shape == (2, 1, h, w)


def test_refuses_sizes_that_are_not_multiples_of_16():
    model = resunetpp.create_model("resunetpp-lite")
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.rand(1, 3, 72, 72))


def test_cost_is_a_twentieth_of_resunetpp():
    """Parameters of one unit by hand, and the FLOPs at 256x256 against ResUNet++'s (counted on the meta
    device: no arithmetic is done)."""
    unit = LiteResidualUnit(8, 16, stride=2)
    # conv1 3x3 8->16 + BN, conv2 3x3 16->16 + BN, shortcut 1x1 8->16 + BN, SE 16->4->16 (no bias)
    assert count_parameters(unit) == 8 * 16 * 9 + 32 + 16 * 16 * 9 + 32 + 8 * 16 + 32 + 16 * 4 * 2
    assert count_parameters(ConvBNReLU(3, 8)) == 3 * 8 * 9 + 16

    def gflop(name):
        with torch.device("meta"), FlopCounterMode(display=False) as fc:
            resunetpp.create_model(name).eval()(torch.zeros(1, 3, 256, 256))
        return fc.get_total_flops() / 1e9

    lite, full = gflop("resunetpp-lite"), gflop("resunetpp")
    assert lite < 1.4 and full > 30
    assert count_parameters(resunetpp.create_model("resunetpp-lite")) == 525_332


def test_exports_to_onnx_and_runs_in_openvino_like_torch(tmp_path):
    torch.manual_seed(0)
    model = resunetpp.create_model("resunetpp-lite").eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding them is checked
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    report = export_onnx(model, tmp_path / "lite.onnx", exporter="legacy",
                         config={"model": "resunetpp-lite", "input_size": [64, 64]})
    assert report.max_abs_diff < 1e-3
    ov = pytest.importorskip("openvino")
    x = torch.rand(1, 3, 64, 64)
    net = ov.Core().compile_model(str(report.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = net.create_infer_request().infer({0: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-3)
