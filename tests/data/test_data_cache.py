"""Prepared cache round trip, in-memory batches, and the `data prepare` / `data show` commands."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers.data import make_dataset
from resunetpp.cli import app
from resunetpp.data import (
    DatasetCheckError,
    SegmentationFolder,
    check_dataset,
    default_split,
    detect_layout,
    load_pairs,
    load_split,
    prepare_cache,
)
from resunetpp.data.cache import _write_split

runner = CliRunner()


def test_cache_round_trip(tmp_path):
    raw = make_dataset(tmp_path / "polyps", n=7, size=(50, 70), vary_size=True, image_ext=".jpg")
    out = prepare_cache(raw, tmp_path / "cache", size=(32, 40), progress=False)
    assert detect_layout(out) == "cache"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "polyps" and manifest["size"] == [32, 40]
    assert manifest["ids"] == [str(i) for i in range(1, 8)] and manifest["skipped"] == []
    split = load_split(out / "split.json")  # not a known dataset: made with seed 0
    assert split["dataset"] == "polyps" and sorted(split["train"] + split["val"] + split["test"], key=int) == \
        manifest["ids"]

    folder = load_pairs(raw, size=(32, 40), progress=False)
    cached = load_pairs(out, size=None, progress=False)  # None: the cache's own size
    assert cached.name == folder.name == "polyps" and cached.ids == folder.ids
    assert torch.equal(cached.masks, folder.masks)  # PNG masks: lossless
    assert torch.equal(cached.images, folder.images)  # lossless WebP: bit-identical to the source resized
    assert manifest["image_ext"] == ".webp" and manifest["version"] == 2
    assert load_pairs(out, size=(32, 40), ids=["3", "1"], progress=False).ids == ["3", "1"]
    with pytest.raises(ValueError, match="holds 32x40 .* not 256x256"):
        load_pairs(out, size=256, progress=False)
    # the cache also reads as a folder, and passes the check
    ds = SegmentationFolder(out)
    assert ds.name == "polyps" and len(ds) == 7 and ds[0][0].shape == (3, 32, 40)
    assert check_dataset(out).ok
    # a corrupt cached file is named
    (out / "images" / "4.webp").write_bytes(b"broken")
    with pytest.raises(DatasetCheckError, match=r"4\.webp: corrupt cached file"):
        load_pairs(out, size=None, progress=False)
    assert [p.path.name for p in check_dataset(out).problems] == ["4.webp"]
    # preparing again replaces the cache; a foreign non-empty folder is refused
    prepare_cache(raw, out, size=16, progress=False)
    assert load_pairs(out, size=None, progress=False).images.shape == (7, 3, 16, 16)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy: exists and is not a cache"):
        prepare_cache(raw, tmp_path / "busy", progress=False)


def test_cache_refuses_bad_data_unless_skipped(tmp_path):
    raw = make_dataset(tmp_path / "ds", n=4)
    (raw / "images" / "3.png").write_bytes(b"")
    with pytest.raises(DatasetCheckError, match=r"3\.png: empty file"):
        prepare_cache(raw, tmp_path / "cache", size=16, progress=False)
    assert not (tmp_path / "cache").exists()
    with pytest.warns(UserWarning, match="skipping 1 unusable"):
        out = prepare_cache(raw, tmp_path / "cache", size=16, skip_bad=True, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ids"] == ["1", "2", "4"] and manifest["skipped"] == ["3"]


def test_known_dataset_gets_the_committed_split(tmp_path):
    committed = load_split(default_split("cvc-clinicdb"))
    ids = committed["train"] + committed["val"] + committed["test"]
    note = _write_split(tmp_path / "split.json", "cvc-clinicdb", ids)
    assert note.startswith("committed") and (tmp_path / "split.json").read_bytes() == \
        default_split("cvc-clinicdb").read_bytes()
    note = _write_split(tmp_path / "sub.json", "cvc-clinicdb", ids[:8])  # e.g. only the TIF subset
    assert note == "make_split(ids, seed=0)" and len(load_split(tmp_path / "sub.json")["test"]) == 1


def test_cli_prepare_and_show(tmp_path):
    raw = make_dataset(tmp_path / "ds", n=6, size=(40, 48))
    r = runner.invoke(app, ["data", "prepare", str(raw), "--size", "24x32", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "6 pairs at 24x32 (HxW)" in r.output and " MB" in r.output
    for src, extra in ((raw, []), (tmp_path / "c", ["--augment", "paper", "--seed", "3"])):
        out = tmp_path / f"grid{len(extra)}.png"
        r = runner.invoke(app, ["data", "show", str(src), "--n", "4", "--out", str(out), "--size", "32", *extra])
        assert r.exit_code == 0, r.output
        with Image.open(out) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 200
            assert np.asarray(im.convert("RGB")).std() > 10  # a picture, not a blank page
    r = runner.invoke(app, ["data", "show", str(raw), "--out", str(tmp_path / "x.png"), "--augment", "heavy"])
    assert r.exit_code == 2 and "'heavy' is not one of" in r.output and "paper" in r.output  # usage error
    shutil.rmtree(raw / "masks")
    r = runner.invoke(app, ["data", "prepare", str(raw), "--out", str(tmp_path / "d")])
    assert r.exit_code == 3 and "no dataset layout found" in r.output  # bad input


def test_lossy_jpeg_cache_still_available(tmp_path):
    raw = make_dataset(tmp_path / "polyps", n=4, size=(50, 70), image_ext=".jpg")
    out = prepare_cache(raw, tmp_path / "jpeg", size=(32, 40), quality=95, progress=False)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i}.jpg" for i in range(1, 5)]
    folder = load_pairs(raw, size=(32, 40), progress=False)
    cached = load_pairs(out, size=None, progress=False)
    mse = (cached.images.float() - folder.images.float()).pow(2).mean()
    assert 0 < mse and 10 * torch.log10(255**2 / mse) > 30  # JPEG q95 (4:2:0): close, not exact
    with pytest.raises(ValueError, match="JPEG quality 0: must be 1..100"):
        prepare_cache(raw, tmp_path / "bad", quality=0, progress=False)


@pytest.mark.slow
def test_real_cache_is_bit_identical(clinicdb_dir, tmp_path):
    from resunetpp.data import SegmentationFolder as Folder

    ids = Folder(clinicdb_dir).ids[:6]  # a few real frames: 384x288 -> 256x256 (area), masks nearest
    sub = tmp_path / "cvc"
    for part in ("Original", "Ground Truth"):
        (sub / part).mkdir(parents=True)
    src = Folder(clinicdb_dir, ids=ids)
    for i in ids:
        image, mask = src.pairs[i]
        (sub / "Original" / image.name).symlink_to(image.resolve())
        (sub / "Ground Truth" / mask.name).symlink_to(mask.resolve())
    out = prepare_cache(sub, tmp_path / "cache", size=256, progress=False)
    a, b = load_pairs(sub, size=256, progress=False), load_pairs(out, size=None, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
