"""Every front end gives the same answer on every Kvasir-SEG test image of the committed split: the API
(/v1/segment), `predict` (its masks and predictions.csv), `video` (its per-frame CSV) and the library agree on
polyp / no polyp, on the area to 1e-6 of the image (the goal: 0.1 %) and on the readout's words. The page
(Chromium) is checked on the images where the min-area filter matters in test_page_agreement.py.

The bundled model runs once per distinct image (a memo keyed on the pixels, shared by the front ends: what is
compared is everything after the forward pass, where the front ends once differed). `video` reads a one-frame
lossless video of each image, cropped to even sizes as video writers need; its answer is compared with the
library's on that crop. The figures are written to $RESUNETPP_ARTIFACTS/agreement-kvasir.json.
Slow (the bundled model on 100 full-size images on a CPU: minutes), and skipped without the dataset.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from resunetpp import Segmenter
from resunetpp.inference.findings import describe
from resunetpp.inference.predict import predict_files
from resunetpp.inference.video import process_video
from resunetpp.io import read_image

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("RESUNETPP_ARTIFACTS", ROOT / "build" / "test-artifacts"))


class MemoSegmenter(Segmenter):
    """The bundled Segmenter, its forward pass computed once per distinct image."""

    memo: dict = {}

    def probabilities(self, images):
        keys = [hashlib.sha1(np.ascontiguousarray(im).tobytes() + str(im.shape).encode()).hexdigest() for im in images]
        todo = [(k, im) for k, im in zip(keys, images) if k not in self.memo]
        if todo:
            for (k, _), p in zip(todo, super().probabilities([im for _, im in todo])):
                self.memo[k] = p
        return [self.memo[k] for k in keys]


@pytest.fixture(scope="module")
def setting(kvasir_dir):
    split = json.loads((ROOT / "src" / "resunetpp" / "splits" / "kvasir-seg.json").read_text())
    files = [kvasir_dir / "images" / f"{i}.jpg" for i in split["test"]]
    missing = [f for f in files if not f.is_file()]
    if missing:
        pytest.skip(f"{len(missing)} test images missing under {kvasir_dir}, e.g. {missing[0]}")
    return MemoSegmenter(), files


def test_api_predict_csv_video_and_library_agree_on_every_test_image(setting, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from resunetpp.serve import create_app

    seg, files = setting
    summary = predict_files(seg, files, tmp_path / "preds", progress=False)
    rows = {Path(r["input"]).stem: r for r in csv.DictReader(open(summary.csv_path))}
    client = TestClient(create_app(seg))
    figures = {"images": len(files), "polyp": 0, "no_polyp": 0, "filter_changed": 0, "disagreements": [],
               "max_area_difference": 0.0}
    for f in files:
        image = read_image(f)
        (p,) = seg.probabilities([image])
        lib = describe(seg.postprocess(image, p), p)
        raw = describe(p > seg.threshold, p)
        figures["polyp" if lib.polyp else "no_polyp"] += 1
        figures["filter_changed"] += raw.area_fraction != lib.area_fraction
        api = client.post("/v1/segment", files={"file": (f.name, f.read_bytes(), "image/jpeg")}).json()
        row = rows[f.stem]
        mask = cv2.imread(str(tmp_path / "preds" / row["mask"]), cv2.IMREAD_GRAYSCALE) > 127
        # video: a one-frame lossless video of the image cropped to even sizes
        h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
        crop = np.ascontiguousarray(image[:h, :w])
        src = tmp_path / "v" / f"{f.stem}.avi"
        src.parent.mkdir(exist_ok=True)
        writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"png "), 25, (w, h))
        writer.write(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
        writer.release()
        stats = process_video(seg, src, tmp_path / "v" / f"{f.stem}.mp4", progress=False)
        (vrow,) = list(csv.DictReader(open(stats.csv_path)))
        (pc,) = seg.probabilities([crop])
        lib_crop = describe(seg.postprocess(crop, pc), pc)
        answers = {"api": (api["polyp"], api["area_fraction"], api["finding"]),
                   "predict csv": (row["polyp"] == "1", float(row["area_fraction"]), row["finding"]),
                   "predict mask": (bool(mask.any()), round(float(mask.mean()), 6), lib.text),
                   "library": (lib.polyp, round(lib.area_fraction, 6), lib.text)}
        for name, (polyp, area, text) in answers.items():
            figures["max_area_difference"] = max(figures["max_area_difference"], abs(area - lib.area_fraction))
            if polyp != lib.polyp or abs(area - lib.area_fraction) > 1e-6 or text != lib.text:
                figures["disagreements"].append([f.stem, name, polyp, area, text, lib.text])
        video = ((vrow["polyp"] == "1"), float(vrow["area_fraction"]), vrow["finding"])
        if video[0] != lib_crop.polyp or abs(video[1] - lib_crop.area_fraction) > 1e-6 or video[2] != lib_crop.text:
            figures["disagreements"].append([f.stem, "video", vrow["polyp"], vrow["area_fraction"], vrow["finding"],
                                             lib_crop.text])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "agreement-kvasir.json").write_text(json.dumps(figures, indent=1))
    assert figures["images"] == 100 and not figures["disagreements"], figures["disagreements"][:10]
    assert figures["filter_changed"] > 0  # the min-area filter mattered on some images: the case that went wrong
