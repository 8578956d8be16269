"""A damaged model is refused at load time, in one place (resunetpp.spec + hub.load_model), by every front end:
the message names the file and the field, and every command exits 3."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from resunetpp import create_model, load_model, save_pretrained
from resunetpp.cli import app
from resunetpp.hub import load_spec
from resunetpp.inference.segmenter import Segmenter
from resunetpp.spec import SPEC_VERSION, ModelError, ModelSpec, ModelSpecError

runner = CliRunner()
KWARGS = {"filters": [4, 4, 4, 4, 4]}


@pytest.fixture
def run(tmp_path):
    return save_pretrained(create_model("unet", filters=(4, 4, 4, 4, 4)), tmp_path / "run",
                           {"model": "unet", "model_kwargs": KWARGS, "input_size": [32, 32], "dataset": "x",
                            "metrics": {"val": {"dice": 0.5}}, "training": {"lr": 1e-3}})


def _edit(run, **changes):
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(changes)
    (run / "config.json").write_text(json.dumps(cfg))


BAD_FIELDS = [
    ({"threshold": "abc"}, "threshold", "must be a number"),
    ({"threshold": 0}, "threshold", "strictly between 0 and 1"),
    ({"threshold": 1.0}, "threshold", "strictly between 0 and 1"),
    ({"threshold": float("nan")}, "threshold", "strictly between 0 and 1"),
    ({"threshold": True}, "threshold", "must be a number"),
    ({"normalization": {"mean": [0, 0, 0], "std": [0, 0, 0]}}, "normalization.std", "must be positive"),
    ({"normalization": {"mean": [0, 0, 0], "std": [1, -1, 1]}}, "normalization.std", "must be positive"),
    ({"normalization": {"mean": [0, 0, 0], "std": [1, float("inf"), 1]}}, "normalization.std", "finite"),
    ({"normalization": {"mean": [float("nan"), 0, 0], "std": [1, 1, 1]}}, "normalization.mean", "finite"),
    ({"normalization": {"mean": [0, 0], "std": [1, 1, 1]}}, "normalization.mean", "3 numbers"),
    ({"normalization": {"mean": ["a", 0, 0], "std": [1, 1, 1]}}, "normalization.mean", "3 numbers"),
    ({"normalization": [0, 1]}, "normalization", "must be an object"),
    ({"input_size": [0, 32]}, "input_size", "impossible size"),
    ({"input_size": [-32, 32]}, "input_size", "impossible size"),
    ({"input_size": [32.5, 32]}, "input_size", "two integers"),
    ({"input_size": "256"}, "input_size", "two integers"),
    ({"input_size": [10**9, 32]}, "input_size", "impossible size"),
    ({"input_size": [36, 32]}, "input_size", "multiples of its stride 16"),
    ({"model_kwargs": "filters=4"}, "model_kwargs", "JSON object"),
    ({"model": 3}, "model", "registry name"),
    ({"min_area": 1.5}, "min_area", "[0, 1)"),
    ({"spec_version": 2}, "spec_version", "upgrade resunetpp"),
    ({"spec_version": "1"}, "spec_version", "must be an integer"),
]


@pytest.mark.parametrize("changes,field,words", BAD_FIELDS, ids=lambda v: str(v)[:40])
def test_a_bad_field_is_refused_naming_the_file_and_the_field(run, changes, field, words):
    _edit(run, **changes)
    with pytest.raises(ModelSpecError) as info:
        load_model(run)
    message = str(info.value)
    assert message.startswith(f"{run / 'config.json'}: field {field!r}: "), message
    assert words in message
    assert info.value.field == field and isinstance(info.value, ValueError)


def test_non_finite_weights_are_refused(run):
    state = load_file(run / "model.safetensors")
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(run / "model.safetensors"))
    with pytest.raises(ModelError, match=r"model.safetensors: damaged weights: 1 tensor\(s\) hold NaN or inf \(e\.g\. "
                       + re.escape(key) + r"\); a model like this answers nothing useful, so it is refused$"):
        load_model(run)
    with pytest.raises(ModelError, match="NaN or inf"):
        Segmenter(run, device="cpu")


def test_old_files_read_as_version_1_with_provenance_kept(run):
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["spec_version"] == SPEC_VERSION == 1  # what training writes now
    for key in ("spec_version", "min_area"):  # an old file: no version, no min_area
        cfg.pop(key)
    (run / "config.json").write_text(json.dumps(cfg))
    spec = load_spec(run)
    assert spec.spec_version == 1 and spec.min_area == 0.001 and spec.input_size == (32, 32)
    assert spec.provenance["metrics"] == {"val": {"dice": 0.5}} and spec.provenance["dataset"] == "x"
    assert spec.provenance["training"] == {"lr": 1e-3}
    again = ModelSpec.from_dict(spec.to_dict())
    assert again == spec
    model = load_model(run)
    assert model.spec == spec and model.pretrained_config["metrics"] == {"val": {"dice": 0.5}}


def test_bundled_configs_are_valid_specs():
    from resunetpp.hub import WEIGHTS_DIR, list_pretrained

    for name in list_pretrained():
        spec = ModelSpec.from_file(WEIGHTS_DIR / name / "config.json")
        assert spec.model in ("resunetpp", "resunetpp-lite") and spec.threshold == 0.5 and "metrics" in spec.provenance


def test_save_pretrained_refuses_an_impossible_spec(tmp_path):
    with pytest.raises(ModelSpecError, match="field 'threshold'"):
        save_pretrained(create_model("unet", filters=(4, 4, 4, 4, 4)), tmp_path / "x",
                        {"model": "unet", "threshold": 2})
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_segmenter_min_area_comes_from_the_spec(run):
    _edit(run, min_area=0.25)
    assert Segmenter(run, device="cpu").min_area == 0.25
    assert Segmenter(run, device="cpu", min_area=0).min_area == 0


def test_an_exported_models_embedded_spec_is_checked(run, tmp_path):
    from resunetpp.inference.backends import onnx_config

    onnx = pytest.importorskip("onnx")
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    entry = proto.metadata_props.add()
    entry.key, entry.value = "resunetpp_config", json.dumps({"model": "unet", "threshold": "abc"})
    onnx.save(proto, str(tmp_path / "m.onnx"))
    assert onnx_config(tmp_path / "m.onnx")["threshold"] == "abc"  # read as stored ...
    with pytest.raises(ModelSpecError, match=r"m.onnx \(its config\): field 'threshold'"):
        Segmenter(tmp_path / "m.onnx")  # ... and refused before use


@pytest.mark.parametrize("command", [
    ["predict", "IMG", "--out", "OUT"],
    ["evaluate", "--data", "DATA"],
    ["export", "--out", "OUT/m.onnx"],
    ["serve"],
])
def test_every_command_exits_3_naming_file_and_field(run, tmp_path, command, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served a damaged model"))
    _edit(run, normalization={"mean": [0, 0, 0], "std": [0, 0, 0]})
    img = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    _dataset(tmp_path / "data")
    args = [a.replace("IMG", str(img)).replace("OUT", str(tmp_path / "out")).replace("DATA", str(tmp_path / "data"))
            for a in command]
    r = runner.invoke(app, [*args, "--weights", str(run)])
    assert r.exit_code == 3, r.output
    assert f"{run / 'config.json'}: field 'normalization.std': must be positive" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "out" / "m.onnx").exists()


def _dataset(root):
    from PIL import Image

    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "images" / "1.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / "1.png")
    return root


def test_mismatched_weights_exit_3_in_every_command(run, tmp_path):
    _edit(run, model_kwargs={"filters": [8, 8, 8, 8, 8]})
    data = _dataset(tmp_path / "data")
    for command in (["predict", str(data), "--out", str(tmp_path / "o")], ["evaluate", "--data", str(data)],
                    ["export", "--out", str(tmp_path / "m.onnx")]):
        r = runner.invoke(app, [*command, "--weights", str(run)])
        assert r.exit_code == 3 and "weights do not match" in r.output, (command, r.output)
