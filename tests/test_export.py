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
from PIL import Image
from typer.testing import CliRunner

from resunetpp import Segmenter
from resunetpp.cli import app
from resunetpp.export import ParityError, check_parity, export_onnx
from resunetpp.inference import ONNX_CONFIG_KEY
from test_infer_common import dice, disc_image, disc_model, save_disc_checkpoint  # noqa: F401

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
