"""ONNX export (parity, dynamic shapes, embedded config), int8 quantisation, and the onnxruntime backend."""

from __future__ import annotations

import csv
import json
import re

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers.inference import dice, disc_image, disc_model, save_disc_checkpoint  # noqa: F401
from resunetpp import Segmenter
from resunetpp.cli import app
from resunetpp.inference.backends import ONNX_CONFIG_KEY
from resunetpp.inference.export import ParityError, check_parity, export_onnx

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One dynamo export + int8 quantisation through the CLI, shared by the tests below."""
    root = tmp_path_factory.mktemp("export")
    ckpt = save_disc_checkpoint(root / "run", threshold=0.5)
    rng = np.random.default_rng(10)
    (root / "calib").mkdir()
    for i in range(8):
        Image.fromarray(disc_image(rng, 48, 40)[0]).save(root / "calib" / f"{i}.png")
    out = root / "onnx" / "model.onnx"
    r = runner.invoke(app, ["export", "--weights", str(ckpt), "--format", "onnx", "--out", str(out), "--int8",
                            "--calib", str(root / "calib")])
    assert r.exit_code == 0, r.output
    return {"root": root, "ckpt": ckpt, "int8": out, "fp32": out.with_name("model-fp32.onnx"), "output": r.output}


@pytest.mark.slow
def test_export_parity_dynamic_shapes_and_config(exported):
    fp32 = exported["fp32"]
    m = re.search(r"max \|logit diff\| ([0-9.e+-]+)", exported["output"])
    assert m and float(m.group(1)) < 1e-4, exported["output"]
    assert "2x3x32x32" in exported["output"] and "2x3x24x40" in exported["output"]  # batch 2, two sizes
    sess = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    dims = sess.get_inputs()[0].shape
    assert all(isinstance(d, str) for d in (dims[0], dims[2], dims[3])), dims  # symbolic batch, H, W
    # parity holds at sizes the export never saw, batch 3 included
    assert check_parity(fp32, disc_model(), [(3, 3, 64, 48), (1, 3, 8, 136)]) < 1e-4
    proto = onnx.load(str(fp32))
    assert min(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    cfg = json.loads({p.key: p.value for p in proto.metadata_props}[ONNX_CONFIG_KEY])
    assert cfg["input_size"] == [32, 32] and cfg["model"] == "resunetpp" and cfg["onnx"]["precision"] == "fp32"
    assert json.loads((fp32.parent / "config.json").read_text())["input_size"] == [32, 32]


@pytest.mark.slow
def test_onnxruntime_backend_matches_torch(exported, tmp_path):
    rng = np.random.default_rng(11)
    (tmp_path / "in").mkdir()
    for i, (h, w) in enumerate([(32, 32), (61, 45), (90, 120)]):
        Image.fromarray(disc_image(rng, h, w)[0]).save(tmp_path / "in" / f"{i}.png")
    outs = {}
    for backend, weights in (("torch", exported["ckpt"]), ("onnxruntime", exported["fp32"])):
        outs[backend] = tmp_path / backend
        r = runner.invoke(app, ["predict", str(tmp_path / "in"), "-w", str(weights), "--backend", backend,
                                "-o", str(outs[backend]), "--save-prob", "--prob-format", "npy", "-b", "2"])
        assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (outs["torch"] / "masks").iterdir())
    assert len(names) == 3
    for name in names:
        a = cv2.imread(str(outs["torch"] / "masks" / name), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(outs["onnxruntime"] / "masks" / name), cv2.IMREAD_UNCHANGED)
        assert a.shape == b.shape and (a == b).all(), name
        stem = name[:-4]
        pa, pb = (np.load(outs[k] / "probs" / f"{stem}.npy") for k in ("torch", "onnxruntime"))
        assert np.abs(pa - pb).max() < 1e-5
    with open(outs["onnxruntime"] / "predictions.csv") as fh:
        assert all(r["error"] == "" for r in csv.DictReader(fh))
    # the API picks onnxruntime for an .onnx file and rejects a checkpoint folder for it
    assert Segmenter(exported["fp32"]).backend == "onnxruntime"
    with pytest.raises(ValueError, match="resunetpp export"):
        Segmenter(exported["ckpt"], backend="onnxruntime")


@pytest.mark.slow
def test_int8_model_is_calibrated_and_agrees(exported):
    int8, fp32 = exported["int8"], exported["fp32"]
    proto = onnx.load(str(int8))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    cfg = json.loads({p.key: p.value for p in proto.metadata_props}[ONNX_CONFIG_KEY])
    assert cfg["onnx"]["precision"] == "int8" and cfg["onnx"]["calibration_images"] == 8
    q, f = Segmenter(int8), Segmenter(fp32)
    rng = np.random.default_rng(12)
    for _ in range(4):
        image, truth = disc_image(rng, 40, 48)
        mq, pq = q.segment(image)
        mf, pf = f.segment(image)
        assert dice(mq, mf) > 0.9 and dice(mq, truth) > 0.8
        assert np.abs(pq - pf).max() > 0  # it really runs a different (quantised) graph


def test_legacy_exporter_opset17_and_parity_failure(tmp_path):
    model = disc_model()
    cfg = {"model": "resunetpp", "input_size": [32, 32]}
    rep = export_onnx(model, tmp_path / "legacy.onnx", opset=17, exporter="legacy", config=cfg)
    assert rep.opset == 17 and rep.max_abs_diff < 1e-4 and rep.config_path == tmp_path / "config.json"
    assert check_parity(rep.path, model, [(2, 3, 40, 24)]) < 1e-4
    with pytest.raises(ParityError, match="strict.onnx: max \\|logit difference\\|"):
        export_onnx(model, tmp_path / "strict.onnx", opset=17, exporter="legacy", config=cfg, atol=0.0)
    assert not list(tmp_path.glob("*strict*"))  # a wrong export is not left where a model is expected
    model.train()
    export_onnx(model, tmp_path / "again.onnx", opset=17, exporter="legacy", config=cfg)
    assert model.training  # the caller's model is exported from a copy, not switched to eval
    with pytest.raises(ValueError, match="opset 18"):
        export_onnx(model, tmp_path / "x.onnx", opset=17, exporter="dynamo", config=cfg)


@pytest.mark.slow
def test_export_cli_errors(tmp_path, exported):
    r = runner.invoke(app, ["export", "-w", str(exported["ckpt"]), "--out", str(tmp_path / "m.onnx"), "--int8"])
    assert r.exit_code == 2 and "--calib" in r.output
    r = runner.invoke(app, ["export", "-w", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 3 and "missing: not found" in r.output and "Traceback" not in r.output  # bad input
    r = runner.invoke(app, ["export", "-w", str(exported["ckpt"]), "--out", str(tmp_path / "m.onnx"),
                            "--format", "tflite"])
    assert r.exit_code == 2 and "only onnx" in r.output
    r = runner.invoke(app, ["export", "-w", str(exported["ckpt"]), "--out", str(tmp_path / "m.bin"), "--int8",
                            "--calib", str(exported["root"] / "calib")])
    assert r.exit_code == 2 and "must end in .onnx" in r.output and not list(tmp_path.glob("m*"))


@pytest.mark.slow
def test_openvino_backend_matches_onnxruntime(exported):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    rng = np.random.default_rng(13)
    images = [disc_image(rng, h, w)[0] for h, w in [(32, 32), (50, 70), (64, 40)]]
    ort_seg = Segmenter(exported["fp32"])
    ov_seg = Segmenter(exported["fp32"], backend="openvino", threads=1)
    ov_bf16 = Segmenter(exported["fp32"], backend="openvino", precision="bf16", threads=1)
    for (m_ort, p_ort), (m_ov, p_ov), (m_bf, _) in zip(ort_seg.segment_batch(images), ov_seg.segment_batch(images),
                                                        ov_bf16.segment_batch(images)):
        assert np.abs(p_ort - p_ov).max() < 1e-3 and dice(m_ort, m_ov) > 0.99
        assert dice(m_ort, m_bf) > 0.95
    with pytest.raises(ValueError, match="own precision"):
        Segmenter(exported["fp32"], precision="bf16")


# -- check_parity against hand-built ONNX graphs (no exporter involved) -----------------------------------


def _mean_onnx(path) -> str:
    """An ONNX model computing the channel mean, (N, 3, H, W) -> (N, 1, H, W), written with onnx.helper."""
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["image"], ["logits"], axes=[1], keepdims=1, name="mean")
    graph = helper.make_graph([node], "mean",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1, "h", "w"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


class _Mean(torch.nn.Module):
    def forward(self, x):
        return x.mean(1, keepdim=True)


class _WrongWhenNotSquare(_Mean):
    """Agrees with the ONNX graph on square inputs only."""

    def forward(self, x):
        y = super().forward(x)
        return y if x.shape[2] == x.shape[3] else y + 5.0


class _NaNAt(_Mean):
    def __init__(self, square: bool):
        super().__init__()
        self.square = square

    def forward(self, x):
        y = super().forward(x).clone()
        if (x.shape[2] == x.shape[3]) == self.square:
            y[0, 0, 0, 0] = float("nan")
        return y


def test_check_parity_checks_every_shape_not_only_the_first(tmp_path):
    path = _mean_onnx(tmp_path / "mean.onnx")
    shapes = [(2, 3, 8, 8), (2, 3, 8, 16)]
    assert check_parity(path, _Mean(), shapes) < 1e-6
    assert check_parity(path, _WrongWhenNotSquare(), shapes[:1]) < 1e-6  # the square shape alone passes ...
    assert check_parity(path, _WrongWhenNotSquare(), shapes) > 0.5  # ... the non-square one is 5 off
    assert check_parity(path, _WrongWhenNotSquare(), shapes[::-1]) > 0.5


def test_check_parity_counts_nan_as_a_failure_in_any_shape(tmp_path):
    path = _mean_onnx(tmp_path / "mean.onnx")
    shapes = [(2, 3, 8, 8), (2, 3, 8, 16)]
    for square in (True, False):  # NaN in the first shape, then in the second
        d = check_parity(path, _NaNAt(square), shapes)
        assert not d <= 1e-4 and d > 1e6, (square, d)  # never a pass: |NaN - x| is no small difference


def test_check_parity_refuses_a_shape_mismatch(tmp_path):
    path = _mean_onnx(tmp_path / "mean.onnx")

    class Bigger(_Mean):
        def forward(self, x):
            return torch.nn.functional.interpolate(super().forward(x), scale_factor=2)

    with pytest.raises(ParityError, match=r"output shape \(2, 1, 8, 8\) != PyTorch's \(2, 1, 16, 16\)"):
        check_parity(path, Bigger(), [(2, 3, 8, 8)])


class _ConvThenNaN(torch.nn.Module):
    total_stride = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x):
        y = self.conv(x)
        return y + torch.log(y[:, :, :1, :1] * 0 - 1)  # log(-1): NaN in PyTorch and in onnxruntime alike


def test_export_refuses_a_model_whose_logits_are_nan(tmp_path):
    cfg = {"model": "resunetpp", "input_size": [16, 16]}
    with pytest.raises(ParityError, match="nan.onnx: max \\|logit difference\\|"):
        export_onnx(_ConvThenNaN(), tmp_path / "nan.onnx", opset=17, exporter="legacy", config=cfg)
    assert not list(tmp_path.glob("*nan*"))


# -- int8: calibration methods and the layers kept in float ----------------------------------------------


def test_concat_fed_names_the_concats_and_the_convolutions_reading_them(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from resunetpp.inference.export import concat_fed

    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    w4 = numpy_helper.from_array(np.ones((2, 4, 1, 1), np.float32), "w4")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="enc"),
             helper.make_node("Conv", ["x", "w"], ["b"], name="skip"),
             helper.make_node("Concat", ["a", "b"], ["ab"], axis=1, name="cat"),
             helper.make_node("Conv", ["ab", "w4"], ["c"], name="dec"),
             helper.make_node("Relu", ["c"], ["r"], name="act"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                              initializer=[w, w4])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    assert concat_fed(tmp_path / "g.onnx") == ["cat", "dec"]


def _quantised_convs(path) -> tuple[int, int]:
    """(convolutions with int8 weights, convolutions reading a concatenation whose weights are int8)."""
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}

    def source(name):  # through a Q/DQ pair to what was quantised
        n = producer.get(name)
        while n is not None and n.op_type in ("DequantizeLinear", "QuantizeLinear"):
            n = producer.get(n.input[0])
        return n

    convs = [n for n in graph.node if n.op_type == "Conv"]
    int8 = [n for n in convs if n.input[1] in producer and producer[n.input[1]].op_type == "DequantizeLinear"]
    after_cat = [n for n in int8 if (s := source(n.input[0])) is not None and s.op_type == "Concat"]
    return len(int8), len(after_cat)


@pytest.mark.slow
def test_int8_keeps_the_concat_fed_convolutions_in_float(exported):
    quantised, after_concat = _quantised_convs(exported["int8"])
    assert quantised >= 10 and after_concat == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_int8_calibration_methods(exported, tmp_path, method):
    from resunetpp.inference.export import quantize_int8

    out = quantize_int8(exported["fp32"], tmp_path / f"{method}.onnx", exported["root"] / "calib", method=method,
                        progress=False)
    cfg = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[ONNX_CONFIG_KEY])
    assert cfg["onnx"]["calibration"] == method and cfg["onnx"]["precision"] == "int8"

    def scales(path):
        g = onnx.load(str(path)).graph
        return {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer if i.name.endswith("_scale")}

    ours, minmax = scales(out), scales(exported["int8"])
    shared = sorted(set(ours) & set(minmax))
    assert len(shared) > 50
    if method == "percentile":  # clips the 0.001% tails: other activation ranges than minmax's
        assert sum(not np.array_equal(ours[k], minmax[k]) for k in shared) > 50
    # (onnxruntime's entropy calibration lands on the min/max ranges for this small model and 8 images)
    q, f = Segmenter(out), Segmenter(exported["fp32"])
    image, truth = disc_image(np.random.default_rng(14), 40, 48)
    assert dice(q.segment(image)[0], f.segment(image)[0]) > 0.9
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        quantize_int8(exported["fp32"], tmp_path / "x.onnx", exported["root"] / "calib", method="kl")


class _Offset(_Mean):
    """The ONNX mean graph's output plus `offset` (+ `slope` x the red channel: an input-dependent difference)."""

    def __init__(self, offset: float, scale: float = 1.0, slope: float = 0.0):
        super().__init__()
        self.offset, self.scale, self.slope = offset, scale, slope

    def forward(self, x):
        return self.scale * super().forward(x) + self.offset + self.slope * x[:, :1]


def _scaled_mean_onnx(path, scale: float) -> str:
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[1], keepdims=1, name="mean"),
             helper.make_node("Mul", ["m", "c"], ["logits"], name="scale")]
    graph = helper.make_graph(nodes, "scaled",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1, "h", "w"])],
                              initializer=[numpy_helper.from_array(np.array(scale, np.float32), "c")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def test_check_parity_is_relative_to_large_logits_only_and_reproducible(tmp_path):
    shapes = [(2, 3, 8, 8), (2, 3, 8, 16)]
    small = _mean_onnx(tmp_path / "mean.onnx")  # logits below 1: the plain absolute difference
    assert check_parity(small, _Offset(0.001), shapes) == pytest.approx(0.001, rel=1e-3)
    big = _scaled_mean_onnx(tmp_path / "big.onnx", 1000.0)  # logits near 1000: in units of the largest one
    d = check_parity(big, _Offset(0.01, scale=1000.0), shapes)
    assert 0.01 / 1000.01 <= d <= 0.01 / 500
    # its own seeded inputs: the same answer whatever the global RNG did in between
    model = _Offset(0.0, slope=0.01)
    first = check_parity(small, model, shapes)
    torch.rand(5)
    assert check_parity(small, model, shapes) == first and check_parity(small, model, shapes, seed=3) != first


@pytest.mark.parametrize("size,stride", [((32, 32), 8), ((256, 192), 8), ((8, 8), 8), ((48, 80), 16), ((64, 64), 16)])
def test_parity_shapes_are_the_configs_and_a_non_square_one_near_three_quarters_by_five_quarters(size, stride):
    from resunetpp.inference.export import parity_shapes

    first, second = parity_shapes(size, stride, batch=3)
    h, w = size
    assert first == (3, 3, h, w)
    _, c, h2, w2 = second
    assert c == 3 and second[0] == 3 and h2 % stride == 0 and w2 % stride == 0 and h2 >= stride and w2 >= stride
    assert (h2, w2) != (h, w) and h2 != w2
    assert abs(h2 - max(stride, 0.75 * h)) <= stride / 2
    assert abs(w2 - 1.25 * w) <= stride  # one more stride when the rounding gave back the first shape
