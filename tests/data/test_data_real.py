"""The real Kvasir-SEG and CVC-ClinicDB copies in ../shared/data (skipped when absent).

Counts and sizes come from listings and file headers; only a handful of files are decoded, to stay
inside the test-time budget.
"""

from __future__ import annotations

import torch

from resunetpp.data import SegmentationFolder, check_dataset, default_split, detect_layout, load_pairs, load_split
from resunetpp.data.check import header_size
from resunetpp.data.splits import make_split


def test_kvasir_seg(kvasir_dir):
    assert detect_layout(kvasir_dir) == "kvasir-seg"
    ds = SegmentationFolder(kvasir_dir)  # quick check: listing + headers of all 2000 files
    assert ds.name == "kvasir-seg" and len(ds) == 1000 and ds.report.ok
    sizes = {header_size(p) for p, _ in ds.pairs.values()}
    assert len(sizes) > 100  # Kvasir-SEG images vary in size (333 distinct)
    for k in (0, 500, 999):
        image, mask = ds[k]
        assert image.shape[0] == 3 and mask.shape[1:] == image.shape[1:]
        assert set(mask.unique().tolist()) == {0, 1}  # 3-channel JPEG masks binarised


def test_cvc_clinicdb_png_and_tif(clinicdb_dir):
    assert detect_layout(clinicdb_dir) == "cvc-clinicdb"
    png = SegmentationFolder(clinicdb_dir)
    assert png.source.image_dir == clinicdb_dir / "PNG" / "Original"
    assert png.ids == [str(i) for i in range(1, 613)]  # numeric ids sort naturally
    assert {header_size(p) for pair in png.pairs.values() for p in pair} == {(288, 384)}
    tif_dir = clinicdb_dir / "TIF"
    report = check_dataset(tif_dir)  # full check: decodes the 3-sample MinIsBlack TIFFs Pillow cannot open
    assert report.ok and report.good_ids == ["1", "2", "3", "100", "250", "404", "555", "612"]
    tif = load_pairs(tif_dir, size=None, progress=False)
    same = load_pairs(clinicdb_dir, ids=tif.ids, size=None, progress=False)
    assert tif.images.shape == (8, 3, 288, 384) and tif.name == same.name == "cvc-clinicdb"
    assert torch.equal(tif.images, same.images) and torch.equal(tif.masks, same.masks)
    assert set(tif.masks.unique().tolist()) == {0, 1}


def test_committed_splits_match_make_split_over_the_real_ids(kvasir_dir, clinicdb_dir):
    for name, root in (("kvasir-seg", kvasir_dir), ("cvc-clinicdb", clinicdb_dir)):
        ids = SegmentationFolder(root).ids
        committed = load_split(default_split(name))
        assert {k: committed[k] for k in ("train", "val", "test")} == make_split(ids, seed=0)
