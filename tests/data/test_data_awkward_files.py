"""Awkward dataset files: empty folders, 0/1 and soft masks, compressed TIFFs, broken symlinks, huge images."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from resunetpp import io as rio
from resunetpp.cli import app
from resunetpp.data import check_dataset
from resunetpp.inference.predict import collect_inputs

runner = CliRunner()


def _dataset(root, masks: dict[str, np.ndarray]):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem, m in masks.items():
        Image.fromarray(np.full(m.shape + (3,), 90, np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(m).save(root / "masks" / f"{stem}.png")
    return root


def _disc(value: int, size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((yy - 16) ** 2 + (xx - 16) ** 2) < 64).astype(np.uint8) * value


def test_empty_images_and_masks_fail_the_check(tmp_path):
    _dataset(tmp_path / "empty", {})
    report = check_dataset(tmp_path / "empty")
    assert not report.ok and "nothing to train" in report.format()
    r = runner.invoke(app, ["data", "check", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "0 usable pairs, FAILED" in r.output


def test_01_masks_are_detected_and_read_as_labels(tmp_path):
    root = _dataset(tmp_path / "d", {"a": _disc(1), "b": _disc(1)})
    assert rio.read_mask(root / "masks" / "a.png").sum() == _disc(1).sum()  # auto: 0/1 read as labels
    assert rio.read_mask(root / "masks" / "a.png", "255").sum() == 0
    assert rio.read_mask(root / "masks" / "a.png", "01").sum() == _disc(1).sum()
    r = runner.invoke(app, ["data", "check", str(root)])
    assert r.exit_code == 0 and "0/1" in r.output and "mask values" in r.output, r.output
    r = runner.invoke(app, ["data", "check", str(root), "--mask-values", "255"])
    assert "largest grey level is 1" in r.output and "mask values 01" in r.output, r.output
    faint = _dataset(tmp_path / "faint", {"a": _disc(40)})
    report = check_dataset(faint)
    assert any("largest grey level is 40" in p.what for p in report.warnings)
    with pytest.raises(ValueError, match="unknown mask values"):
        rio.read_mask(root / "masks" / "a.png", "0-1")


def test_soft_masks_warn_with_the_fraction(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))
    report = check_dataset(_dataset(tmp_path / "soft", {"a": ramp, "b": _disc(255)}))
    soft = [p for p in report.warnings if "soft mask" in p.what]
    assert len(soft) == 1 and soft[0].path.name == "a.png" and "% of its pixels" in soft[0].what
    assert report.ok


@pytest.mark.parametrize("compression", ["lzw", "deflate", "jpeg"])
def test_compressed_tiffs_are_readable(tmp_path, compression):
    rgb = np.zeros((24, 40, 3), np.uint8)
    rgb[:, :20] = (200, 100, 50)
    path = tmp_path / f"x-{compression}.tif"
    Image.fromarray(rgb).save(path, compression={"lzw": "tiff_lzw", "deflate": "tiff_adobe_deflate",
                                                 "jpeg": "jpeg"}[compression])
    got = rio.read_image(path)
    assert got.shape == (24, 40, 3)
    assert np.abs(got.astype(int) - rgb).max() <= (12 if compression == "jpeg" else 0)
    tifffile.imwrite(tmp_path / "plain.tif", rgb)  # the uncompressed path still goes through tifffile
    assert (rio.read_image(tmp_path / "plain.tif") == rgb).all()


def test_dangling_symlinks_are_reported(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "ok.png")
    os.symlink(tmp_path / "gone.png", src / "dangling.png")
    listing = collect_inputs([src])
    assert [p.name for p in listing.files] == ["ok.png"]
    assert len(listing.missing) == 1 and "broken symbolic link" in listing.missing[0][1]
    root = _dataset(tmp_path / "d", {"a": _disc(255)})
    os.symlink(tmp_path / "gone.png", root / "images" / "b.png")
    report = check_dataset(root)
    assert not report.ok and any("broken symbolic link" in p.what for p in report.problems)


def test_decompression_bomb_warning_does_not_leak(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: Pillow warns (bomb error only above 2000)
    monkeypatch.setattr(rio, "MAX_PIXELS", 1500)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(rio.ImageReadError, match="image too large"):
            rio.read_image(path)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
