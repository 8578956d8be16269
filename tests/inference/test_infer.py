"""Segmenter and `resunetpp predict` on synthetic images and tiny checkpoints (CPU, seconds)."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers.inference import SIZE, dice, disc_image, disc_model, save_disc_checkpoint  # noqa: F401
from resunetpp import Segmenter, hub
from resunetpp.cli import app
from resunetpp.inference.predict import bounding_box, collect_inputs, output_names, predict_files
from resunetpp.io import read_image

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_disc_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _manual(model, image, size, mean, std, threshold=0.5):
    """The documented pipeline written out by hand: INTER_AREA down, normalise, sigmoid, bilinear up."""
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    x = (torch.from_numpy(small).permute(2, 0, 1)[None].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        p = torch.sigmoid(model(x))[0, 0].numpy()
    p = cv2.resize(p, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    return p > threshold, p


def test_segmenter_round_trip_equals_manual_forward(tmp_path):
    norm = {"mean": [0.3, 0.2, 0.1], "std": [0.5, 0.6, 0.7]}
    path = save_disc_checkpoint(tmp_path / "run", normalization=norm, threshold=0.4)
    seg = Segmenter(weights=path)
    assert seg.backend == "torch" and seg.threshold == 0.4 and seg.input_size == (SIZE, SIZE)
    image, _ = disc_image(np.random.default_rng(1), 77, 50)
    mask, prob = seg.segment(image)
    ref_mask, ref_prob = _manual(disc_model(), image, SIZE, norm["mean"], norm["std"], threshold=0.4)
    assert mask.shape == prob.shape == (77, 50) and mask.dtype == bool and prob.dtype == np.float32
    np.testing.assert_allclose(prob, ref_prob, atol=1e-6)
    assert (mask == ref_mask).all()
    # the config's normalisation really is applied: the default one gives other probabilities
    _, other = _manual(disc_model(), image, SIZE, [0, 0, 0], [1, 1, 1])
    assert np.abs(other - prob).max() > 1e-3
    # NCHW-contiguous input: a channels_last view would switch torch kernels behind channels_last=False
    assert seg.preprocess([image]).is_contiguous()
    # --threshold overrides the config
    assert Segmenter(weights=path, threshold=0.9).segment(image)[0].sum() < mask.sum()


def test_segment_batch_any_sizes_and_real_predictions(ckpt):
    seg = Segmenter(ckpt)
    rng = np.random.default_rng(2)
    pairs = [disc_image(rng, h, w) for h, w in [(32, 32), (45, 61), (100, 37), (257, 199)]]
    results = seg.segment_batch([p[0] for p in pairs])
    for (image, truth), (mask, prob) in zip(pairs, results):
        assert mask.shape == prob.shape == image.shape[:2]
        assert dice(mask, truth) > 0.8  # the tiny model really segments discs, at any size
    single = seg.segment(pairs[1][0])
    np.testing.assert_allclose(single[1], results[1][1], atol=1e-5)
    with pytest.raises(ValueError, match="uint8 RGB"):
        seg.segment(np.zeros((8, 8), np.uint8))


def test_disc_model_weights_do_not_depend_on_the_thread_count():
    """The fixture's weights once differed with torch's thread count (float summation order), and
    the 100x37 Dice with them: 0.7836 on 2 threads, 0.8046 on 1."""
    import helpers.inference as test_infer_common

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        other = test_infer_common._trained_state.__wrapped__()
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for k, v in test_infer_common._trained_state().items():
        assert torch.equal(v, other[k]), k


def test_torch_bf16_precision_is_close_to_fp32(ckpt):
    rng = np.random.default_rng(7)
    pairs = [disc_image(rng, 48, 64) for _ in range(3)]
    fp32 = Segmenter(ckpt).segment_batch([p[0] for p in pairs])
    bf16 = Segmenter(ckpt, precision="bf16").segment_batch([p[0] for p in pairs])
    for (m32, p32), (m16, p16), (_, truth) in zip(fp32, bf16, pairs):
        assert np.abs(p32 - p16).max() < 0.1 and dice(m16, m32) > 0.95 and dice(m16, truth) > 0.8
    assert any(np.abs(a[1] - b[1]).max() > 0 for a, b in zip(fp32, bf16))  # autocast really ran in bf16
    with pytest.raises(ValueError, match="precision"):
        Segmenter(ckpt, precision="fp16")


class _FlipSymmetrized(torch.nn.Module):
    """Average of f over the four flips (identity, H, V, HV), each flipped back: an
    equivariant model, for which flip TTA must change nothing."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        out = self.f(x)
        out = out + self.f(x.flip(-1)).flip(-1) + self.f(x.flip(-2)).flip(-2)
        return (out + self.f(x.flip(-1, -2)).flip(-1, -2)) / 4


def test_tta_averages_flips_and_leaves_symmetric_model_unchanged():
    cfg = {"input_size": [SIZE, SIZE]}
    rng = np.random.default_rng(3)
    images = [disc_image(rng)[0] for _ in range(3)]
    f = disc_model()
    # 1. for an arbitrary model, TTA is the documented three-way average of sigmoids
    plain = np.stack(Segmenter(f, config=cfg).probabilities(images))
    tta = np.stack(Segmenter(f, config=cfg, tta=True).probabilities(images))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        s = torch.sigmoid
        ref = (s(f(x)) + s(f(x.flip(-1))).flip(-1) + s(f(x.flip(-2))).flip(-2))[:, 0] / 3
    np.testing.assert_allclose(tta, ref.numpy(), atol=1e-6)
    assert np.abs(tta - plain).max() > 1e-3  # so TTA is not a no-op for this model ...
    # 2. ... but for a flip-equivariant model it equals the plain prediction
    g = _FlipSymmetrized(f).eval()
    np.testing.assert_allclose(np.stack(Segmenter(g, config=cfg, tta=True).probabilities(images)),
                               np.stack(Segmenter(g, config=cfg).probabilities(images)), atol=1e-6)


def test_crf_cleans_a_noisy_disc():
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (the crf extra) is not installed")
    from resunetpp.inference.crf import crf_refine

    rng = np.random.default_rng(4)
    image, truth = disc_image(rng, 96, 96)
    prob = np.clip(np.where(truth, 0.75, 0.25) + rng.normal(0, 0.2, truth.shape), 0, 1).astype(np.float32)
    noisy = prob > 0.5
    specks = cv2.connectedComponents(noisy.astype(np.uint8))[0] - 1
    for mode in ("mask", "bilateral"):
        refined = crf_refine(image, prob, mode=mode) > 0.5
        assert dice(refined, truth) > dice(noisy, truth) + 0.03, mode
        assert cv2.connectedComponents(refined.astype(np.uint8))[0] - 1 < specks / 4, mode
    # an all-polyp mask stays all polyp (the follow-up's np.unique relabelling would flip it)
    assert crf_refine(image, np.ones_like(prob), mode="mask").min() > 0.5
    seg = Segmenter(disc_model(), config={"input_size": [SIZE, SIZE]}, crf="mask")
    mask, p = seg.segment(image)
    assert mask.shape == truth.shape and dice(mask, truth) > 0.8


def test_crf_missing_gives_install_hint(monkeypatch):
    from resunetpp.inference.crf import CRFUnavailableError

    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(CRFUnavailableError, match=r"pip install \"resunetpp\[crf\]\""):
        Segmenter(disc_model(), config={"input_size": [SIZE, SIZE]}, crf="mask")


def test_no_bundled_weights_message(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "WEIGHTS_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="train a model"):
        Segmenter()
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.zeros((16, 16, 3), np.uint8))
    r = runner.invoke(app, ["predict", str(img), "--out", str(tmp_path / "out")])
    assert r.exit_code == 3, r.output  # bad input (the README's exit-code table)
    assert "bundled weights 'resunetpp-kvasir-seg' are missing" in r.output and "train a model" in r.output
    assert "configs/quick-cpu.yaml" in r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)  # a clean exit, not a crash


def _write_rgb(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def test_predict_folder_with_good_and_bad_files(tmp_path, ckpt):
    rng = np.random.default_rng(5)
    src = tmp_path / "in"
    good = {}
    image, truth = disc_image(rng, 61, 45)  # non-square, not a multiple of 8
    _write_rgb(src / "odd.png", image)
    good["odd.png"] = truth
    image, truth = disc_image(rng, 40, 64)
    _write_rgb(src / "a" / "same.jpg", image)
    good["a/same.png"] = truth
    _write_rgb(src / "b" / "same.png", disc_image(rng, 48, 48)[0])  # same name, other folder
    good["b/same.png"] = None
    image, truth = disc_image(rng, 50, 70)
    Image.fromarray(image).convert("RGBA").save(src / "rgba.png")
    good["rgba.png"] = truth
    Image.fromarray(image).convert("P", palette=Image.Palette.ADAPTIVE).save(src / "palette.png")
    good["palette.png"] = None
    sixteen = image.astype(np.uint16) * 257
    cv2.imwrite(str(src / "sixteen.png"), cv2.cvtColor(sixteen, cv2.COLOR_RGB2BGR))
    good["sixteen.png"] = truth
    Image.fromarray(image[:, :, 0]).save(src / "gray.png")
    good["gray.png"] = None
    tifffile.imwrite(src / "tiff.tif", image)
    good["tiff.png"] = truth
    (src / "empty.png").write_bytes(b"")
    (src / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden.png").write_bytes(b"")

    out = tmp_path / "out"
    r = runner.invoke(app, ["predict", str(src), str(src / "notes.txt"), "--weights", str(ckpt), "--out", str(out),
                            "--batch-size", "3", "--save-prob"])
    assert r.exit_code == 1, r.output
    for bad in ("empty.png", "garbage.jpg", "notes.txt"):
        assert any(bad in line and line.startswith("error:") for line in r.output.splitlines()), bad
    assert ".hidden" not in r.output
    for name, truth in good.items():
        mask = cv2.imread(str(out / "masks" / name), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(out / "overlays" / name), cv2.IMREAD_UNCHANGED)
        prob = cv2.imread(str(out / "probs" / name), cv2.IMREAD_UNCHANGED)
        assert mask is not None and overlay is not None and prob is not None, name
        assert mask.ndim == 2 and set(np.unique(mask)) <= {0, 255}, name
        assert overlay.shape == mask.shape + (3,) and prob.shape == mask.shape, name
        if truth is not None:
            assert mask.shape == truth.shape, name
            assert dice(mask > 0, truth) > 0.7, name
    with open(out / "predictions.csv") as fh:
        rows = {r["input"]: r for r in csv.DictReader(fh)}
    assert len(rows) == len(good) + 3
    errors = {k for k, v in rows.items() if v["error"]}
    assert {p.rsplit("/", 1)[-1] for p in errors} == {"empty.png", "garbage.jpg", "notes.txt"}
    row = rows[str(src / "odd.png")]
    mask = cv2.imread(str(out / "masks" / "odd.png"), cv2.IMREAD_UNCHANGED) > 0
    assert (int(row["height"]), int(row["width"])) == (61, 45) and row["polyp"] == "1"
    assert float(row["area_fraction"]) == pytest.approx(mask.mean(), abs=1e-6)
    assert tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1")) == bounding_box(mask)
    assert float(row["time_ms"]) > 0


def test_predict_all_good_exit_zero_npy_and_glob(tmp_path, ckpt):
    rng = np.random.default_rng(6)
    for i in range(3):
        _write_rgb(tmp_path / "in" / f"{i}.png", disc_image(rng, 40, 56)[0])
    _write_rgb(tmp_path / "in" / "blank.png", np.full((40, 56, 3), 70, np.uint8))
    out = tmp_path / "out"
    r = runner.invoke(app, ["predict", str(tmp_path / "in" / "*.png"), "-w", str(ckpt), "-o", str(out), "--tta",
                            "--save-prob", "--prob-format", "npy", "--no-overlay"])
    assert r.exit_code == 0, r.output
    prob = np.load(out / "probs" / "0.npy")
    assert prob.dtype == np.float32 and prob.shape == (40, 56)
    assert not (out / "overlays").exists()
    with open(out / "predictions.csv") as fh:
        rows = {r["input"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}
    assert rows["0.png"]["polyp"] == "1"
    assert rows["blank.png"]["polyp"] == "0" and rows["blank.png"]["x0"] == "" and rows["blank.png"]["error"] == ""
    r = runner.invoke(app, ["predict", str(tmp_path / "nothing-*.png"), "-w", str(ckpt), "-o", str(out)])
    assert r.exit_code == 1 and "no files match" in r.output


def test_inputs_and_output_names(tmp_path):
    for rel in ("x/a.png", "x/a.jpg", "y/a.png", "x/deep/b.bmp", "x/readme.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    listing = collect_inputs([tmp_path, tmp_path / "x" / "a.png"])  # duplicates removed
    assert [p.relative_to(tmp_path).as_posix() for p in listing.skipped] == ["x/readme.md"]
    names = [n.as_posix() for n in output_names(listing.files)]
    assert names == ["x/a.jpg.png", "x/a.png.png", "x/deep/b.png", "y/a.png"]
    assert output_names([tmp_path / "x" / "a.png"]) == [Path("a.png")]


def test_failed_batch_is_retried_image_by_image(tmp_path, ckpt):
    class Picky(Segmenter):
        """Fails every forward pass that contains a 13-pixel-wide image."""

        def probabilities(self, images):
            if any(im.shape[1] == 13 for im in images):
                raise RuntimeError("cannot take this one")
            return super().probabilities(images)

    rng = np.random.default_rng(8)
    for name, (h, w) in {"a": (40, 40), "bad": (40, 13), "c": (36, 44)}.items():
        _write_rgb(tmp_path / "in" / f"{name}.png", disc_image(rng, h, w)[0])
    summary = predict_files(Picky(ckpt), [tmp_path / "in"], tmp_path / "out", batch_size=3, progress=False,
                            on_error=None)
    assert [r["input"].rsplit("/", 1)[-1] for r in summary.failed] == ["bad.png"]
    assert "bad.png: inference failed (RuntimeError: cannot take this one)" in summary.failed[0]["error"]
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["a.png", "c.png"]


def test_signed_and_float_tiffs_do_not_wrap(tmp_path):
    a = np.zeros((4, 4, 3), np.int16)
    a[0] = -32767  # negative: black, not (as a wrapped uint8) bright
    a[1] = 32767
    tifffile.imwrite(tmp_path / "s.tif", a, photometric="rgb")
    im = read_image(tmp_path / "s.tif")
    assert im[0].max() == 0 and im[1].min() == 255 and im[2:].max() == 0
    f = np.full((4, 4), 0.5, np.float32)
    f[0, 0] = np.nan
    tifffile.imwrite(tmp_path / "f.tif", f)
    im = read_image(tmp_path / "f.tif")
    assert im[0, 0, 0] == 0 and im[1, 1, 0] == 128


class _MeanGrey(torch.nn.Module):
    """logit = 20 * (mean of the channels - 0.5): the probability is known for any input."""

    def forward(self, x):
        return 20 * (x.mean(dim=1, keepdim=True) - 0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int64, bool])
def test_segmenter_refuses_arrays_that_are_not_uint8(dtype):
    """A float image in [0, 1] (or a 16-bit one) read as if it were uint8 would be all but black: refused."""
    seg = Segmenter(_MeanGrey(), config={"input_size": [8, 8]})
    good = np.full((8, 8, 3), 200, np.uint8)
    assert seg.segment(good)[0].all()  # 200/255 is bright: all polyp
    bad = (good / 255).astype(dtype)
    with pytest.raises(ValueError, match=r"image 1: expected an \(H, W, 3\) uint8 RGB array, got \(8, 8, 3\)"):
        seg.segment_batch([good, bad])
    with pytest.raises(ValueError, match="uint8 RGB"):
        seg.probabilities([bad])
    with pytest.raises(ValueError, match="got list"):
        seg.segment(good.tolist())
    for shape in ((8, 8), (8, 8, 4), (8, 8, 1)):
        with pytest.raises(ValueError, match="uint8 RGB"):
            seg.segment(np.zeros(shape, np.uint8))


def test_segmenter_argument_checks(tmp_path, ckpt):
    model = _MeanGrey()
    cfg = {"input_size": [8, 8]}
    cases = [
        (dict(backend="tensorrt"), ValueError, "unknown backend 'tensorrt'; choose one of torch, onnxruntime, openvi"),
        (dict(precision="int8"), ValueError, "unknown precision 'int8'; choose one of fp32, bf16$"),
        (dict(crf="heavy"), ValueError, "unknown CRF mode 'heavy'; choose one of mask, bilateral$"),
        (dict(threshold=1.5), ValueError, r"threshold must lie in \[0, 1\], got 1.5"),
        (dict(threshold=-0.1), ValueError, r"threshold must lie in \[0, 1\]"),
        (dict(threshold=float("nan")), ValueError, r"threshold must lie in \[0, 1\]"),
        (dict(threshold="high"), ValueError, "threshold must be a number"),
        (dict(device="tpu"), ValueError, "unknown device 'tpu'"),
        (dict(backend="onnxruntime"), ValueError, "the onnxruntime backend needs an .onnx file, not an nn.Module"),
        (dict(backend="openvino"), ValueError, "the openvino backend needs an .onnx file"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            Segmenter(model, config=cfg, **kwargs)
    with pytest.raises(FileNotFoundError, match="missing.onnx: ONNX model not found"):
        Segmenter(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match=re.escape("needs an .onnx file; export one first (`resunetpp export`, or "
                                                   "`resunetpp.inference.export.export_onnx`)")):
        Segmenter(ckpt, backend="openvino")
    (tmp_path / "m.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="an .onnx model runs with backend='onnxruntime', not torch"):
        Segmenter(tmp_path / "m.onnx", backend="torch")
    with pytest.raises(ValueError, match="m.onnx: not a readable ONNX model"):
        Segmenter(tmp_path / "m.onnx")
    # the threshold: the config's unless given; 0 and 1 are allowed
    assert Segmenter(model, config={**cfg, "threshold": 0.3}).threshold == 0.3
    assert Segmenter(model, config={**cfg, "threshold": 0.3}, threshold=0.7).threshold == 0.7
    assert Segmenter(model, config=cfg).threshold == 0.5
    grey = np.full((8, 8, 3), 140, np.uint8)  # probability sigmoid(20 * (140/255 - 0.5)) = 0.72
    assert Segmenter(model, config=cfg, threshold=0.7).segment(grey)[0].all()
    assert not Segmenter(model, config=cfg, threshold=0.75).segment(grey)[0].any()
    assert Segmenter(model, config=cfg, threshold=0.0).threshold == 0.0
    assert Segmenter(model, config=cfg, threshold=1.0).threshold == 1.0
    assert "backend='torch'" in repr(Segmenter(model, config=cfg))


class _Recorder(_MeanGrey):
    """_MeanGrey that records, for each forward pass, (input in channels_last layout, bf16 autocast on)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append((not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last),
                           torch.is_autocast_enabled("cpu")))
        return super().forward(x)


def test_module_weights_use_their_pretrained_config_and_the_runner_options(tmp_path, monkeypatch):
    model = _Recorder()
    norm = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}
    model.pretrained_config = {"input_size": [8, 12], "threshold": 0.8, "normalization": norm}
    seg = Segmenter(model)
    assert (seg.input_size, seg.threshold, seg.mean, seg.std) == ((8, 12), 0.8, norm["mean"], norm["std"])
    assert seg.weights is None and seg.backend == "torch" and "weights='module'" in repr(seg)
    mask, prob = seg.segment(np.full((10, 10, 3), 140, np.uint8))
    x = (140 / 255 - np.array(norm["mean"])) / 0.5  # [0.90, 0.70, 0.50]: logit 20 * (0.70 - 0.5) = 3.96
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-20 * (x.mean() - 0.5))), atol=1e-6)
    assert mask.all()
    # a non-square input size is (H, W): INTER_AREA down to 8 rows and 12 columns, then normalised
    image = disc_image(np.random.default_rng(9), 40, 30)[0]
    x = seg.preprocess([image])
    assert x.shape == (1, 3, 8, 12)
    small = cv2.resize(image, (12, 8), interpolation=cv2.INTER_AREA) / 255
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), (small - norm["mean"]) / 0.5, atol=1e-6)
    # a config given replaces the module's own; a module with neither gets the defaults
    assert Segmenter(model, config={"input_size": [8, 8]}).threshold == 0.5
    plain = Segmenter(_MeanGrey())
    assert (plain.input_size, plain.threshold, plain.mean, plain.std) == ((256, 256), 0.5, [0, 0, 0], [1, 1, 1])
    # channels_last and bf16 reach the forward pass (default: channels_last, fp32)
    model.calls.clear()
    for kwargs in ({}, {"channels_last": False}, {"precision": "bf16"}):
        seg = Segmenter(model, **kwargs)
        seg.segment(image)
        assert seg.precision == kwargs.get("precision", "fp32")
    assert model.calls == [(True, False), (False, False), (True, True)]
    # the same from a checkpoint path (load_model stood in for, to watch the model's inputs)
    loaded = []

    def load_model(path, device="cpu"):
        loaded.append(Path(path))
        return model

    monkeypatch.setattr(hub, "load_model", load_model)
    model.calls.clear()
    for kwargs in ({}, {"channels_last": False}, {"precision": "bf16"}):
        seg = Segmenter(tmp_path / "run", **kwargs)
        seg.segment(image)
        assert seg.weights == tmp_path / "run" and f"weights='{tmp_path / 'run'}'" in repr(seg)
        assert f"precision='{kwargs.get('precision', 'fp32')}'" in repr(seg)
    assert loaded == [tmp_path / "run"] * 3
    assert model.calls == [(True, False), (False, False), (True, True)]


def _mean_grey_onnx(path: Path, config: dict | None = None) -> Path:
    """_MeanGrey written with onnx.helper (no exporter): logit = 20 * (channel mean - 0.5), with `config`
    embedded as `resunetpp export` embeds it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from resunetpp.inference.backends import ONNX_CONFIG_KEY

    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1], keepdims=1),
             helper.make_node("Sub", ["mean", "half"], ["centred"]),
             helper.make_node("Mul", ["centred", "twenty"], ["logits"])]
    graph = helper.make_graph(
        nodes, "mean_grey", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        initializer=[numpy_helper.from_array(np.array(0.5, np.float32), "half"),
                     numpy_helper.from_array(np.array(20.0, np.float32), "twenty")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if config is not None:
        helper.set_model_props(model, {ONNX_CONFIG_KEY: json.dumps(config)})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


_ONNX_CFG = {"input_size": [8, 12], "threshold": 0.6, "normalization": {"mean": [0.1, 0.2, 0.3], "std": [0.5] * 3}}


def _onnx_images():
    return [np.full((10, 10, 3), 140, np.uint8), disc_image(np.random.default_rng(10), 30, 20)[0]]


def test_onnxruntime_backend_runs_the_file_with_its_embedded_config(tmp_path, monkeypatch):
    import onnxruntime as ort

    path = _mean_grey_onnx(tmp_path / "export" / "model.onnx", _ONNX_CFG)
    sessions = []
    session = ort.InferenceSession

    def recording(model_path, opts, providers):
        sessions.append((model_path, opts.intra_op_num_threads, providers))
        return session(model_path, opts, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    images = _onnx_images()
    ref = Segmenter(_MeanGrey(), config=_ONNX_CFG).probabilities(images)
    seg = Segmenter(path, threads=1)
    assert (seg.backend, seg.weights, seg.input_size, seg.threshold) == ("onnxruntime", path, (8, 12), 0.6)
    for got, want in zip(seg.probabilities(images), ref):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert seg.segment(images[0])[0].all()  # 0.98 > 0.6
    # a folder holding model.onnx, with the backend named
    folder = Segmenter(path.parent, backend="onnxruntime")
    assert folder.weights == path and folder.backend == "onnxruntime"
    assert sessions == [(str(path), 1, ["CPUExecutionProvider"]), (str(path), 0, ["CPUExecutionProvider"])]
    message = ("onnxruntime runs the .onnx file's own precision; for bf16 use backend='openvino' or 'torch', "
               "for int8 quantise the export (`resunetpp.inference.export.quantize_int8`)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Segmenter(path, precision="bf16")


def test_openvino_backend_compiles_with_the_precision_and_threads_asked(tmp_path, monkeypatch):
    ov = pytest.importorskip("openvino", reason="the openvino extra is not installed")
    path = _mean_grey_onnx(tmp_path / "export" / "model.onnx", _ONNX_CFG)
    compiled = []

    class RecordingCore(ov.Core):
        def compile_model(self, model, device, config):
            compiled.append((device, dict(config)))
            return super().compile_model(model, device, config)

    monkeypatch.setattr(ov, "Core", RecordingCore)
    images = _onnx_images()
    ref = Segmenter(_MeanGrey(), config=_ONNX_CFG).probabilities(images)
    for precision, hint, atol in (("fp32", "f32", 1e-5), ("bf16", "bf16", 0.05)):
        seg = Segmenter(path.parent, backend="openvino", precision=precision, threads=1)
        assert (seg.backend, seg.weights, seg.precision, seg.threshold) == ("openvino", path, precision, 0.6)
        for got, want in zip(seg.probabilities(images), ref):
            np.testing.assert_allclose(got, want, atol=atol)
        assert compiled[-1] == ("CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                        "INFERENCE_NUM_THREADS": 1})
    assert len(compiled) == 2  # one static-shape compilation each: both images are (8, 12) once resized


def _fake_crf(calls):
    def crf_refine(image, prob, mode="mask", threshold=0.5, **kw):
        calls.append((mode, threshold, image.shape, prob.shape))
        return (1 - prob).astype(np.float32)  # an inverting "CRF": its labelling is easy to recognise
    return crf_refine


def test_crf_option_hands_the_mask_to_the_crf_without_the_extra(tmp_path, ckpt, monkeypatch):
    """The `--crf` path on any machine: a stand-in for pydensecrf2's refinement, whose labelling (its posterior
    > 0.5) must become the mask, while `prob` stays the model's own."""
    import resunetpp.inference.crf as C

    calls = []
    monkeypatch.setattr(C, "crf_available", lambda: True)
    monkeypatch.setattr(C, "crf_refine", _fake_crf(calls))
    image, _ = disc_image(np.random.default_rng(3), 40, 36)
    plain = Segmenter(ckpt)
    seg = Segmenter(ckpt, crf="bilateral", threshold=0.4)
    mask, prob = seg.segment(image)
    _, plain_prob = plain.segment(image)
    np.testing.assert_array_equal(prob, plain_prob)
    np.testing.assert_array_equal(mask, (1 - prob) > 0.5)
    assert calls == [("bilateral", 0.4, (40, 36, 3), (40, 36))]
    _write_rgb(tmp_path / "in" / "a.png", image)
    r = runner.invoke(app, ["predict", str(tmp_path / "in"), "-w", str(ckpt), "-o", str(tmp_path / "out"), "--crf"])
    assert r.exit_code == 0, r.output
    written = cv2.imread(str(tmp_path / "out" / "masks" / "a.png"), cv2.IMREAD_GRAYSCALE) > 0
    np.testing.assert_array_equal(written, (1 - plain_prob) > 0.5)
    assert calls[-1][:2] == ("mask", 0.5)  # --crf-mode defaults to the follow-up's "mask"


def test_crf_option_without_the_extra_is_a_usage_error(tmp_path, ckpt, monkeypatch):
    import resunetpp.inference.crf as C

    monkeypatch.setattr(C, "crf_available", lambda: False)
    _write_rgb(tmp_path / "in" / "a.png", np.zeros((16, 16, 3), np.uint8))
    r = runner.invoke(app, ["predict", str(tmp_path / "in"), "-w", str(ckpt), "-o", str(tmp_path / "out"), "--crf"])
    assert r.exit_code == 2 and "pip install" in r.output and "crf" in r.output
    assert not (tmp_path / "out").exists()


def test_min_area_drops_specks_smaller_than_the_fraction_of_the_image():
    from resunetpp.inference.segmenter import MIN_AREA
    from resunetpp.inference.transforms import drop_small_components

    prob = np.zeros((100, 100), np.float32)
    prob[10:30, 10:30] = 0.9  # 400 px: a polyp
    prob[30, 30] = 0.9  # touches the polyp's corner: one 8-connected component with it
    prob[60:63, 60:63] = 0.8  # 9 px = 0.09 % of the image: a speck
    prob[80:84, 80:83] = 0.6  # 12 px = 0.12 %
    image = np.zeros((100, 100, 3), np.uint8)
    seg = Segmenter(_MeanGrey(), config={"input_size": [8, 8]})
    assert seg.min_area == MIN_AREA == 0.001
    mask = seg.postprocess(image, prob)
    assert mask.dtype == bool and mask.sum() == 400 + 1 + 12 and not mask[60:63, 60:63].any() and mask[30, 30]
    assert seg.postprocess(image, prob, threshold=0.7).sum() == 401  # a given threshold, then the same filter
    assert Segmenter(_MeanGrey(), config={"input_size": [8, 8]}, min_area=0).postprocess(image, prob).sum() == 422
    assert drop_small_components(prob > 0.5, 0.0041).sum() == 401  # 401 px >= 0.0041 * 10,000; 12 px are not
    assert drop_small_components(prob > 0.5, 0.05).sum() == 0
    empty = np.zeros((5, 5), bool)
    assert drop_small_components(empty, 0.5) is empty
    for bad in (1.0, -0.1, float("nan"), "big"):
        with pytest.raises(ValueError, match=r"min_area must be a fraction of the image in \[0, 1\)"):
            Segmenter(_MeanGrey(), config={"input_size": [8, 8]}, min_area=bad)
    assert "min_area=0.001" in repr(seg)


def test_predict_cli_min_area(tmp_path, ckpt):
    rng = np.random.default_rng(3)
    image, truth = disc_image(rng, 64, 64)
    Image.fromarray(image).save(tmp_path / "a.png")
    for area, folder in ((0.0, "all"), (0.9, "none")):
        r = runner.invoke(app, ["predict", str(tmp_path / "a.png"), "--weights", str(ckpt), "--out",
                                str(tmp_path / folder), "--min-area", str(area), "--no-overlay"])
        assert r.exit_code == 0, r.output
    kept = np.array(Image.open(tmp_path / "all" / "masks" / "a.png")) > 0
    assert dice(kept, truth) > 0.8
    assert not (np.array(Image.open(tmp_path / "none" / "masks" / "a.png")) > 0).any()  # the disc is < 90 %
    r = runner.invoke(app, ["predict", str(tmp_path / "a.png"), "--weights", str(ckpt), "--out", str(tmp_path / "x"),
                            "--min-area", "1.5"])
    assert r.exit_code == 2 and "--min-area" in r.output and "0.99" in r.output


def test_the_segmenter_names_where_a_bad_config_came_from_and_exposes_the_one_it_runs(ckpt):
    """A config that breaks the model spec is refused naming its source (the `config` argument, or the module's
    own `pretrained_config`); `seg.config` is the spec the segmenter runs, defaults filled in."""
    from resunetpp.spec import ModelSpecError

    with pytest.raises(ModelSpecError, match=r"^config: field 'input_size'"):
        Segmenter(_MeanGrey(), config={"input_size": [0, 8]})
    module = _MeanGrey()
    module.pretrained_config = {"input_size": [8, 8], "threshold": 7}
    with pytest.raises(ModelSpecError, match=r"^the module's pretrained_config: field 'threshold'"):
        Segmenter(module)
    seg = Segmenter(ckpt)
    assert seg.config == seg.spec.to_dict() and seg.config["threshold"] == seg.threshold
    assert seg.config["input_size"] == list(seg.input_size) and "normalization" in seg.config
