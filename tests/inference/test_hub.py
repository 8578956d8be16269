import json
import re

import pytest
import torch
from safetensors.torch import load_file

from resunetpp import create_model, list_models, load_model, save_pretrained
from resunetpp.hub import bundled_weights, load_config


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("resunetpp", filters=(8, 8, 8, 8, 16)).eval()
    save_pretrained(model, tmp_path / "run", {"model": "resunetpp", "model_kwargs": {"filters": [8, 8, 8, 8, 16]}})
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["threshold"] == 0.5 and cfg["input_size"] == [256, 256] and "normalization" in cfg
    x = torch.randn(1, 3, 32, 32)
    for path in (tmp_path / "run", tmp_path / "run" / "model.safetensors"):
        loaded = load_model(path)
        assert torch.equal(loaded(x), model(x))
        assert loaded.pretrained_config["model"] == "resunetpp"


def test_half_precision_weights_load_as_float32(tmp_path):
    model = create_model("unet", filters=(4, 4, 4, 4, 4)).eval()
    save_pretrained(model, tmp_path, {"model": "unet", "model_kwargs": {"filters": [4, 4, 4, 4, 4]}},
                    dtype=torch.float16)
    loaded = load_model(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x), atol=1e-2)


def test_refuses_nan_weights_and_keeps_old_file(tmp_path):
    model = create_model("unet", filters=(4, 4, 4, 4, 4))
    cfg = {"model": "unet", "model_kwargs": {"filters": [4, 4, 4, 4, 4]}}
    save_pretrained(model, tmp_path, cfg)
    before = (tmp_path / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        save_pretrained(model, tmp_path, cfg)
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model": "unet"}')
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors"):
        load_model(tmp_path)


def test_bundled_weights_message_says_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr("resunetpp.hub.WEIGHTS_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="train a model"):
        bundled_weights()


def test_bundled_models_load_by_name_and_by_default():
    from resunetpp.hub import list_pretrained

    assert list_pretrained() == ["resunetpp-kvasir-seg", "resunetpp-cvc-clinicdb", "resunetpp-lite-cvc-clinicdb",
                                 "resunetpp-lite-kvasir-seg"]  # the default first, then by name
    default = load_model()
    assert default.pretrained_config["dataset"] == "kvasir-seg"
    cvc = load_model("resunetpp-cvc-clinicdb")
    assert cvc.pretrained_config["dataset"] == "cvc-clinicdb"
    a, b = default.state_dict(), cvc.state_dict()
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="not a bundled model"):
        bundled_weights("resunetpp-etis")


def test_weights_that_do_not_match_their_config_are_named(tmp_path):
    model = create_model("unet", filters=(4, 4, 4, 4, 4))
    save_pretrained(model, tmp_path / "run", {"model": "unet", "model_kwargs": {"filters": [4, 4, 4, 4, 4]}})
    cfg = tmp_path / "run" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_kwargs": {"filters": [8, 4, 4, 4, 4]}}))
    with pytest.raises(ValueError, match=r"model.safetensors: weights do not match unet .* of its config.json: "
                                         r"\d+ of another shape \(file vs model\): down.0.0.weight \(4, 3, 3, 3\) vs "
                                         r"\(8, 3, 3, 3\)"):
        load_model(tmp_path / "run")
    cfg.write_text(json.dumps({"model": "resunetpp", "model_kwargs": {"filters": [4, 4, 4, 4, 4]}}))
    with pytest.raises(ValueError, match=r"weights do not match resunetpp .*: \d+ missing: .*; \d+ unexpected: "):
        load_model(tmp_path / "run")
    cfg.write_text(json.dumps({"model": "unet", "model_kwargs": {"filterz": [4, 4, 4, 4, 4]}}))
    with pytest.raises(ValueError, match="cannot build model 'unet' with model_kwargs"):
        load_model(tmp_path / "run")


def test_state_mismatch_counts_and_shows_the_first_few():
    from resunetpp.hub import state_mismatch

    expected = {f"w{i}": torch.zeros(2) for i in range(5)}
    assert state_mismatch(expected, dict(expected)) == ""
    got = {"w0": torch.zeros(3), **{f"x{i}": torch.zeros(1) for i in range(3)}}
    assert state_mismatch(expected, got) == ("1 of another shape (file vs model): w0 (3,) vs (2,); "
                                             "4 missing: w1, w2, ... 2 more; 3 unexpected: x0, x1, ... 1 more")
    assert state_mismatch(expected, got, show=5).endswith("3 unexpected: x0, x1, x2")


def test_not_found_errors_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing: not found; pass a run folder \(config.json \+ "
                                                r"model.safetensors\), a .safetensors file or an .onnx model"):
        load_model(tmp_path / "nothing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="weights.bin: expected a run folder, a .safetensors file"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "config.json").write_text('{"model": "unet"}')
    with pytest.raises(FileNotFoundError, match="only/model.safetensors: weights file not found"):
        load_model(tmp_path / "only")
    (tmp_path / "cfgless").mkdir()
    (tmp_path / "cfgless" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no config.json beside the weights"):
        load_model(tmp_path / "cfgless" / "model.safetensors")
    (tmp_path / "nomodel").mkdir()
    (tmp_path / "nomodel" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no 'model' key"):
        load_model(tmp_path / "nomodel")
    with pytest.raises(ValueError, match="must contain 'model'"):
        save_pretrained(create_model("unet", filters=(4, 4, 4, 4, 4)), tmp_path / "x", {})
    bad = tmp_path / "badcfg"
    with pytest.raises(ValueError, match=re.escape(f"{bad / 'config.json'}") + ".*threshold"):  # names the file
        save_pretrained(create_model("unet", filters=(4, 4, 4, 4, 4)), bad, {"model": "unet", "threshold": 2.0,
                                                                              "model_kwargs": {"filters": [4] * 5}})
    assert not (bad / "config.json").exists()  # nothing invalid is written


def _tiny_unet_run(tmp_path, config):
    save_pretrained(create_model("unet", filters=(4, 4, 4, 4, 4)), tmp_path / "run",
                    {"model": "unet", "model_kwargs": {"filters": [4, 4, 4, 4, 4]}})
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    return tmp_path / "run"


def test_load_model_edge_cases_of_config_and_device(tmp_path):
    run = _tiny_unet_run(tmp_path, {"model": "unet", "model_kwargs": {"filters": [4, 4, 4, 4, 4]}})
    assert load_config(run)["model_kwargs"] == {"filters": [4, 4, 4, 4, 4]}  # the checked spec, as a dict
    assert load_config(run)["threshold"] == 0.5  # defaults filled in
    assert load_model(run / "config.json").pretrained_config["model"] == "unet"  # the config file names the run
    assert next(load_model(run, device="meta").parameters()).device.type == "meta"  # the device is honoured
    # no model_kwargs: the registry defaults, and the message shows {} (a full-width U-Net does not fit)
    (run / "config.json").write_text(json.dumps({"model": "unet"}))
    with pytest.raises(ValueError, match=r"weights do not match unet \{\} of its config.json: .*; use the "
                                         r"config.json written with these weights$"):
        load_model(run)
    # model_kwargs that are not a mapping: refused, naming the file and the field (not a crash)
    (run / "config.json").write_text(json.dumps({"model": "unet", "model_kwargs": "filters=4"}))
    with pytest.raises(ValueError, match=r"config.json: field 'model_kwargs': must be a JSON object .*'filters=4'"):
        load_model(run)
    # an unknown model: the registry's own words, not a repr of the KeyError
    (run / "config.json").write_text(json.dumps({"model": "deeplab"}))
    with pytest.raises(ValueError) as info:
        load_model(run)
    assert str(info.value).startswith(f"{run / 'config.json'}: ")  # names the file
    assert str(info.value).endswith("cannot build model 'deeplab' with model_kwargs {} (unknown model 'deeplab'; "
                                    f"available: {', '.join(list_models())})")


def test_state_mismatch_adds_more_only_past_the_limit():
    from resunetpp.hub import state_mismatch

    expected = {"a": torch.zeros(1), "b": torch.zeros(1)}
    assert state_mismatch(expected, {}) == "2 missing: a, b"
    assert state_mismatch(expected, {}, show=1) == "2 missing: a, ... 1 more"


def test_saved_file_dtypes_defaults_and_version(tmp_path):
    import resunetpp

    model = create_model("resunetpp", filters=(8, 8, 8, 8, 8))
    save_pretrained(model, tmp_path / "half", {"model": "resunetpp"}, dtype=torch.float16)
    state = load_file(tmp_path / "half" / "model.safetensors")
    ints = [k for k, v in model.state_dict().items() if not v.is_floating_point()]
    assert ints and all(state[k].dtype == torch.int64 for k in ints)  # BN's num_batches_tracked stays an int
    assert all(v.dtype == torch.float16 for k, v in state.items() if k not in ints)
    save_pretrained(model, tmp_path / "full", {"model": "resunetpp"})
    assert all(v.dtype == model.state_dict()[k].dtype for k, v in load_file(tmp_path / "full" /
                                                                            "model.safetensors").items())
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["model_kwargs"] == {} and cfg["version"] == resunetpp.__version__  # defaults filled in
    assert cfg["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3}
    with pytest.raises(ValueError, match=r"^config must contain 'model', the registry name$"):
        save_pretrained(model, tmp_path / "x", {"model_kwargs": {}})


def test_safetensors_header_names_the_format_and_the_model(tmp_path):
    """The file's own metadata, {"format": "pt", "model": <registry name>}: "pt" is what safetensors and the
    Hugging Face loaders expect of a PyTorch file, and the model name makes a lone .safetensors file legible."""
    from safetensors import safe_open

    for name, kwargs in (("resunetpp", {"filters": (8, 8, 8, 8, 8)}), ("unet", {"filters": (4, 8, 8, 8, 8)})):
        save_pretrained(create_model(name, **kwargs), tmp_path / name, {"model": name, "model_kwargs": kwargs})
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt", "model": name}
