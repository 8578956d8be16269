"""`predict --coco FILE`: the predicted polyps as COCO instance annotations, read back with pycocotools."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.inference import disc_image, save_disc_checkpoint
from resunetpp.cli import app
from resunetpp.inference.coco import rle_encode

pycoco_mask = pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed (the dev extra)")
from pycocotools.coco import COCO  # noqa: E402

runner = CliRunner()


def test_rle_is_pycocotools_own_encoding():
    rng = np.random.default_rng(1)
    masks = [rng.random((h, w)) < p for h, w, p in ((1, 1, 0.5), (7, 3, 0.2), (40, 33, 0.5), (64, 80, 0.9))]
    masks += [np.ones((5, 6), bool), np.zeros((5, 6), bool)]
    big = np.zeros((700, 900), bool)
    big[100:600, 50:850] = True  # counts far above 32: several characters each
    for m in [*masks, big]:
        ref = pycoco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
        mine = rle_encode(m)
        assert mine["counts"] == ref["counts"].decode() and mine["size"] == list(ref["size"])
        assert (pycoco_mask.decode({"size": mine["size"], "counts": mine["counts"].encode()}) == m).all()


def test_predict_coco_reads_back_as_the_masks_written(tmp_path):
    ckpt = save_disc_checkpoint(tmp_path / "run")
    rng = np.random.default_rng(5)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    names = ["a.png", "sub/b.png", "empty.png"]
    for name in names[:2]:
        cv2.imwrite(str(tmp_path / "in" / name), disc_image(rng, 96, 128)[0][..., ::-1])
    cv2.imwrite(str(tmp_path / "in" / "empty.png"), np.full((80, 100, 3), 20, np.uint8))
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    coco_path = tmp_path / "pre" / "coco.json"
    r = runner.invoke(app, ["predict", str(tmp_path / "in"), "-w", str(ckpt), "-o", str(tmp_path / "out"),
                            "--coco", str(coco_path)])
    assert r.exit_code == 1, r.output  # the broken file fails alone
    coco = COCO(str(coco_path))
    images = {im["file_name"]: im for im in coco.dataset["images"]}
    assert sorted(images) == sorted(names)  # one entry per segmented input, polyp or not; the broken one not
    assert coco.dataset["categories"] == [{"id": 1, "name": "polyp", "supercategory": "lesion"}]
    for name in names:
        im = images[name]
        written = cv2.imread(str(tmp_path / "out" / "masks" / name), cv2.IMREAD_GRAYSCALE) > 127
        assert (im["height"], im["width"]) == written.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
        union = np.zeros(written.shape, bool)
        for a in anns:
            m = coco.annToMask(a).astype(bool)
            assert a["area"] == m.sum() and a["iscrowd"] == 0 and 0 < a["score"] <= 1
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(m)
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert not (union & m).any()  # instances do not overlap
            union |= m
        assert (union == written).all(), name
        assert (len(anns) > 0) == (name != "empty.png")
    json.loads(coco_path.read_text())  # plain JSON
