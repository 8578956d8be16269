"""Readers, layouts and the integrity check on synthetic fixtures built in tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers.data import blob_image, blob_mask, make_dataset, write_mask, write_rgb
from resunetpp.cli import app
from resunetpp.data import (
    DatasetCheckError,
    SegmentationFolder,
    check_dataset,
    detect_layout,
    load_pairs,
)
from resunetpp.data.layouts import locate, natural_sorted

runner = CliRunner()


# ---------------------------------------------------------------- layouts


def test_detect_named_layouts(tmp_path):
    kv = make_dataset(tmp_path / "Kvasir-SEG", n=2, image_ext=".jpg", mask_ext=".jpg")
    assert detect_layout(kv) == "kvasir-seg"
    cvc = tmp_path / "CVC-ClinicDB"
    make_dataset(cvc / "PNG", n=3, image_dir="Original", mask_dir="Ground Truth")
    make_dataset(cvc / "TIF", n=2, image_dir="Original", mask_dir="Ground Truth", image_ext=".tif", mask_ext=".tif")
    assert detect_layout(cvc) == "cvc-clinicdb"
    src = locate(cvc)
    assert src.image_dir == cvc / "PNG" / "Original" and src.name == "cvc-clinicdb"  # PNG preferred
    tif = SegmentationFolder(cvc / "TIF")
    assert tif.name == "cvc-clinicdb" and tif.ids == ["1", "2"]
    plain = make_dataset(tmp_path / "my polyps", n=2)
    assert detect_layout(plain) == "folder"
    assert SegmentationFolder(plain).name == "my-polyps"
    # override: the layout flag names the dataset
    assert SegmentationFolder(plain, layout="kvasir-seg").name == "kvasir-seg"
    # a download folder holding one dataset folder
    dl = tmp_path / "download"
    make_dataset(dl / "Kvasir-SEG", n=2)
    (dl / "kvasir-seg.zip").write_bytes(b"x")
    assert detect_layout(dl) == "kvasir-seg"
    assert SegmentationFolder(dl).root == dl / "Kvasir-SEG"


def test_no_layout_errors_name_the_folder(tmp_path):
    (tmp_path / "empty" / "stuff").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty: no dataset layout found \(found stuff/\)"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere: folder not found"):
        SegmentationFolder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown layout"):
        SegmentationFolder(tmp_path / "empty", layout="kvasir")
    make_dataset(tmp_path / "two" / "a", n=1)
    make_dataset(tmp_path / "two" / "b", n=1)
    with pytest.raises(ValueError, match="several datasets"):
        detect_layout(tmp_path / "two")


def test_natural_sort():
    assert natural_sorted(["10", "2", "1", "a10", "a9", "b"]) == ["1", "2", "10", "a9", "a10", "b"]


def test_every_extension_pairs_by_stem(tmp_path):
    exts = [".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"]
    for k, ext in enumerate(exts):
        m = blob_mask(32, 40, k)
        write_rgb(tmp_path / "images" / f"{k}{ext}", blob_image(m, k))
        write_mask(tmp_path / "masks" / f"{k}{exts[-1 - k]}", m)  # mask format differs from image's
    ds = SegmentationFolder(tmp_path)
    assert ds.ids == [str(k) for k in range(6)]
    for k in range(6):
        image, mask = ds[k]
        assert image.shape == (3, 32, 40) and image.dtype == torch.uint8
        assert mask.shape == (1, 32, 40) and mask.dtype == torch.uint8
        truth = torch.from_numpy(blob_mask(32, 40, k))
        assert torch.equal(mask[0].bool(), truth)


def test_odd_image_formats_and_noisy_masks(tmp_path):
    h, w = 30, 36
    m = blob_mask(h, w, 1)
    rgb = blob_image(m, 1)
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    Image.fromarray(np.dstack([rgb, np.full((h, w), 128, np.uint8)])).save(imgs / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(imgs / "palette.png")
    Image.fromarray(rgb[:, :, 0]).save(imgs / "gray.jpg")
    tifffile.imwrite(imgs / "sixteen.tif", rgb.astype(np.uint16) * 257)  # 16-bit
    # CVC-ClinicDB style: 3 samples tagged MinIsBlack, which Pillow cannot open
    tifffile.imwrite(imgs / "minisblack.tif", rgb, photometric="minisblack", planarconfig="contig")
    with pytest.raises(OSError):
        Image.open(imgs / "minisblack.tif").convert("RGB")
    for stem in ("rgba", "palette", "gray", "sixteen", "minisblack"):
        write_mask(masks / f"{stem}.png", m)
    # 3-channel JPEG mask with ringing, and an 8-bit mask with faint 1..20 values like CVC-ClinicDB
    write_rgb(imgs / "jpegmask.png", rgb)
    write_rgb(masks / "jpegmask.jpg", np.repeat(m[:, :, None] * np.uint8(255), 3, axis=2), quality=60)
    write_rgb(imgs / "faint.png", rgb)
    faint = np.where(m, 255, np.random.default_rng(0).integers(1, 21, m.shape)).astype(np.uint8)
    Image.fromarray(faint).save(masks / "faint.png")

    assert check_dataset(tmp_path).ok
    pairs = load_pairs(tmp_path, size=None, progress=False)
    truth = torch.from_numpy(m)
    for k, i in enumerate(pairs.ids):
        assert pairs.images[k].shape == (3, h, w)
        got = pairs.masks[k, 0].bool()
        assert set(pairs.masks[k].unique().tolist()) <= {0, 1}
        assert (got != truth).float().mean() < 0.01, i
    k = pairs.ids.index("sixteen")
    assert torch.equal(pairs.images[k].permute(1, 2, 0), torch.from_numpy(rgb))  # 16-bit scaled back exactly
    k = pairs.ids.index("minisblack")
    assert torch.equal(pairs.images[k].permute(1, 2, 0), torch.from_numpy(rgb))
    k = pairs.ids.index("gray")
    assert torch.equal(pairs.images[k][0], pairs.images[k][1])  # grayscale repeated


def test_resize_keeps_masks_binary_and_aligned(tmp_path):
    make_dataset(tmp_path, n=3, size=(90, 120), vary_size=True)
    ds = SegmentationFolder(tmp_path, size=(24, 32))
    pairs = load_pairs(tmp_path, size=(24, 32), progress=False)
    assert pairs.images.shape == (3, 3, 24, 32) and pairs.masks.shape == (3, 1, 24, 32)
    for k in range(3):
        image, mask = ds[k]
        assert torch.equal(image, pairs.images[k]) and torch.equal(mask, pairs.masks[k])
        assert set(mask.unique().tolist()) <= {0, 1}
        red = image[0].float() > 130  # the polyp colour follows the mask
        assert (red != mask[0].bool()).float().mean() < 0.08
    with pytest.raises(ValueError, match="different sizes"):
        load_pairs(tmp_path, size=None, progress=False)
    assert load_pairs(tmp_path, size="24x32", progress=False).images.shape[2:] == (24, 32)
    with pytest.raises(ValueError, match="HxW"):
        load_pairs(tmp_path, size="big", progress=False)


def test_ids_subset_and_missing_ids(tmp_path):
    make_dataset(tmp_path, n=12)
    ds = SegmentationFolder(tmp_path, ids=["10", "2"])
    assert ds.ids == ["10", "2"] and len(ds) == 2
    assert SegmentationFolder(tmp_path).ids[:3] == ["1", "2", "3"]
    with pytest.raises(KeyError, match="not in the dataset: 13"):
        SegmentationFolder(tmp_path, ids=["1", "13"])
    pairs = load_pairs(tmp_path, ids=["3", "1"], size=16, progress=False)
    assert pairs.ids == ["3", "1"]
    sub = pairs.select(["1"])
    assert torch.equal(sub.images[0], pairs.images[1])
    with pytest.raises(KeyError, match="not loaded: 9"):
        pairs.select(["9"])


# ---------------------------------------------------------------- the check: one bad case at a time


def _bad(tmp_path, case):
    root = make_dataset(tmp_path / "ds", n=4)
    imgs, masks = root / "images", root / "masks"
    if case == "empty_file":
        (imgs / "2.png").write_bytes(b"")
        return root, imgs / "2.png", "empty file", "2"
    if case == "garbage":
        (imgs / "2.png").unlink()
        (imgs / "2.jpg").write_bytes(b"this is not a jpeg at all" * 20)
        return root, imgs / "2.jpg", "not a readable image", "2"
    if case == "mask_without_image":
        write_mask(masks / "7.png", blob_mask(40, 48, 7))
        return root, masks / "7.png", "no image 7", "7"
    if case == "image_without_mask":
        (masks / "3.png").unlink()
        return root, imgs / "3.png", "no mask 3", "3"
    if case == "size_mismatch":
        write_mask(masks / "4.png", blob_mask(20, 20, 4))
        return root, masks / "4.png", "mask is 20x20 but its image 4.png is 48x40", "4"
    if case == "duplicate":
        write_rgb(imgs / "1.jpg", blob_image(blob_mask(40, 48, 1), 1))
        return root, imgs / "1.jpg", "duplicate id '1': 1.jpg, 1.png", "1"
    if case == "bad_mask":
        (masks / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        return root, masks / "2.png", "not a readable image", "2"
    raise AssertionError(case)


BAD_CASES = ["empty_file", "garbage", "mask_without_image", "image_without_mask", "size_mismatch", "duplicate",
             "bad_mask"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_each_bad_case_is_reported_with_its_file(tmp_path, case):
    root, path, what, bad_id = _bad(tmp_path, case)
    report = check_dataset(root)
    assert not report.ok
    assert [(p.path, what in p.what) for p in report.problems] == [(path, True)]
    assert bad_id not in report.good_ids and len(report.good_ids) == 4 - (bad_id != "7")
    text = report.format()
    assert str(path) in text and "FAILED" in text
    # opening it for training refuses with the same report ...
    with pytest.raises(DatasetCheckError) as err:
        SegmentationFolder(root)
    assert str(path) in str(err.value) and what in str(err.value)
    with pytest.raises(DatasetCheckError) as err:
        load_pairs(root, size=16, progress=False)
    assert str(err.value) == "dataset check failed:\n" + report.format()
    # ... unless told to skip the bad pairs, which it lists
    with pytest.warns(UserWarning, match=f"skipping 1 unusable pair.*{bad_id}") as rec:
        ds = SegmentationFolder(root, skip_bad=True)
    assert str(path) in str(rec[0].message)
    assert bad_id not in ds.ids and ds.ids == report.good_ids
    with pytest.warns(UserWarning):
        pairs = load_pairs(root, size=16, skip_bad=True, progress=False)
    assert pairs.ids == report.good_ids


def test_truncated_file_is_found_by_the_full_check_only(tmp_path):
    root = make_dataset(tmp_path / "ds", n=3, image_ext=".jpg", size=(64, 64))
    data = (root / "images" / "2.jpg").read_bytes()
    (root / "images" / "2.jpg").write_bytes(data[: len(data) // 2])
    assert check_dataset(root, deep=False).ok  # header is fine
    report = check_dataset(root)
    assert [p.path.name for p in report.problems] == ["2.jpg"]
    ds = SegmentationFolder(root)  # quick check passes; decoding names the file
    from resunetpp.io import ImageReadError

    with pytest.raises(ImageReadError, match="2.jpg"):
        ds[1]
    with pytest.raises(DatasetCheckError, match="2.jpg"):
        load_pairs(root, progress=False)


def test_warnings_do_not_fail_the_check(tmp_path):
    root = make_dataset(tmp_path / "ds", n=3)
    (root / "images" / "Thumbs.db").write_bytes(b"\0" * 10)
    (root / "masks" / "README").write_text("masks")
    (root / "images" / ".DS_Store").write_bytes(b"\0")
    (root / "images" / "old").mkdir()
    write_mask(root / "masks" / "3.png", np.zeros((40, 48), bool))  # all background
    report = check_dataset(root)
    assert report.ok and report.good_ids == ["1", "2", "3"]
    kinds = {(p.path.name, p.what.split(" (")[0]) for p in report.warnings}
    assert kinds == {("Thumbs.db", "not an image file"), ("README", "not an image file"),
                     (".DS_Store", "not an image file"), ("old", "subfolder ignored"),
                     ("3.png", "mask is all background")}
    assert report.counts["non-image files"] == 4 and report.counts["all-empty masks"] == 1
    assert len(SegmentationFolder(root)) == 3


def test_cli_check(tmp_path):
    good = make_dataset(tmp_path / "good", n=3)
    r = runner.invoke(app, ["data", "check", str(good)])
    assert r.exit_code == 0, r.output
    assert "3 usable pairs, OK" in r.output
    root, path, what, _ = _bad(tmp_path, "size_mismatch")
    r = runner.invoke(app, ["data", "check", str(root)])
    assert r.exit_code == 1
    assert "FAILED" in r.output and str(path) in r.output and what in r.output
    r = runner.invoke(app, ["data", "check", str(tmp_path / "missing")])
    assert r.exit_code == 3 and "missing: folder not found" in r.output  # bad input


def test_cli_split_refuses_then_skips_bad(tmp_path):
    root, path, _, bad_id = _bad(tmp_path, "garbage")
    out = tmp_path / "split.json"
    r = runner.invoke(app, ["data", "split", str(root), "--out", str(out)])
    assert r.exit_code == 3 and str(path) in r.output and not out.exists()  # bad input: nothing written
    r = runner.invoke(app, ["data", "split", str(root), "--out", str(out), "--skip-bad", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and str(path) in r.output
    split = json.loads(out.read_text())
    assert split["seed"] == 3 and split["dataset"] == "ds"
    assert sorted(split["train"] + split["val"] + split["test"]) == ["1", "3", "4"]
