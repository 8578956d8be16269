"""'No polyp found' is said out loud by every file front end, and `video` writes a video that browsers play.

* `predict`: the CSV has the finding in words (and confidence, certainty); an overlay with nothing outlined
  carries "no polyp found" (it never looks like a failed run), one with a polyp its short finding, in the
  corner that hides least of the polyp.
* `video`: each frame's readout and CSV row carry the finding; the file is H.264 (PyAV's libx264) in MP4,
  and without PyAV it falls back to mp4v with a notice; both failing names the output.
* The plain-language readout and its certainty bands (`resunetpp.inference.findings`).
"""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers.inference import write_video
from resunetpp import Segmenter
from resunetpp.cli import app
from resunetpp.inference.findings import NO_POLYP, certainty, describe
from resunetpp.inference.overlay import draw_label, draw_overlay, draw_text
from resunetpp.inference.predict import predict_files
from resunetpp.inference.video import H264, MP4V, process_video

runner = CliRunner()


class Brightness(torch.nn.Module):
    """probability ~1 on white, ~0 on black."""

    def forward(self, x):
        return 40 * (x.mean(dim=1, keepdim=True) - 0.5)


def seg(size=(64, 96)) -> Segmenter:
    return Segmenter(Brightness(), config={"input_size": list(size)})


def frame(polyp: bool, h: int = 64, w: int = 96) -> np.ndarray:
    f = np.full((h, w, 3), 30, np.uint8)
    if polyp:
        f[10:40, 50:90] = 255  # 1,200 px of 6,144: 19.5 %
    return f


def test_certainty_bands_and_readout_text():
    assert [certainty(c) for c in (None, 0.99, 0.9, 0.89996, 0.8999, 0.75, 0.7499, 0.1)] == \
        [None, "high", "high", "high", "medium", "medium", "low", "low"]  # rounded to 4 decimals, as the API
    mask = np.zeros((10, 10), bool)
    prob = np.full((10, 10), 0.2, np.float32)
    f = describe(mask, prob)
    assert not f.polyp and f.text == NO_POLYP == f.short and f.certainty is None and f.confidence is None
    mask[:3, :4] = True
    prob[mask] = 0.8
    f = describe(mask, prob)
    assert f.text == "polyp outlined: 12.0 % of the image; model certainty medium"
    assert f.short == "polyp 12.0 %, certainty medium" and f.as_dict()["area_fraction"] == 0.12


def test_label_goes_to_the_corner_that_hides_least_of_the_polyp():
    image = np.full((240, 400, 3), 60, np.uint8)
    mask = np.zeros((240, 400), bool)
    mask[:60, :150] = True  # the polyp in the top-left corner
    mask[200:, :150] = True  # and another in the bottom-left one
    out = draw_label(draw_overlay(image, mask), "polyp 25.0 %, certainty high", mask)
    changed = (out != draw_overlay(image, mask)).any(axis=2)
    assert changed[:20, 200:].any() and not changed[:, :150].any()  # top-right: nothing drawn over a polyp
    empty = draw_label(image.copy(), NO_POLYP)
    assert (empty != image).any(axis=2)[:20, :100].any()
    np.testing.assert_array_equal(empty, draw_text(image.copy(), [NO_POLYP], "top-left"))  # one line, top-left


def test_predict_says_no_polyp_in_csv_and_overlay(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, polyp in (("with.png", True), ("without.png", False)):
        cv2.imwrite(str(folder / name), frame(polyp)[..., ::-1])
    out = tmp_path / "out"
    summary = predict_files(seg(), [folder], out, progress=False)
    rows = {r["input"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(summary.csv_path))}
    assert rows["without.png"]["polyp"] == "0" and rows["without.png"]["finding"] == NO_POLYP
    assert rows["without.png"]["certainty"] == rows["without.png"]["confidence"] == ""
    w = rows["with.png"]
    assert w["polyp"] == "1" and w["certainty"] == "high" and float(w["confidence"]) > 0.99
    assert w["finding"] == "polyp outlined: 19.5 % of the image; model certainty high"
    without = cv2.imread(str(out / "overlays" / "without.png"))
    assert (without != frame(False)).any()  # the overlay with nothing outlined is labelled, not blank


def _codec_of(path) -> str:
    av = pytest.importorskip("av", reason="PyAV is not installed (pip install av)")
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return f"{s.codec_context.name} {s.codec_context.pix_fmt} {s.frames}"


def test_video_is_h264_with_the_finding_in_readout_and_csv(tmp_path):
    pytest.importorskip("av", reason="PyAV is not installed (pip install av)")
    frames = [frame(i % 2 == 0, 63, 95) for i in range(6)]  # odd size: encoded one pixel larger
    src = write_video(tmp_path / "in.mp4", frames, fps=10.0)
    r = runner.invoke(app, ["video", str(src), "-w", "resunetpp-kvasir-seg", "-o", str(tmp_path / "o.mp4"),
                            "--max-frames", "1"])
    assert r.exit_code == 0, r.output
    assert "codec H.264" in r.output
    stats = process_video(seg((62, 94)), src, tmp_path / "out.mp4", progress=False)
    assert stats.codec == H264 and not stats.notice
    assert _codec_of(tmp_path / "out.mp4").startswith("h264 yuv420p")
    rows = list(csv.DictReader(open(stats.csv_path)))
    assert [r["finding"] == NO_POLYP for r in rows] == [i % 2 == 1 for i in range(6)]
    assert all(r["certainty"] == ("high" if r["polyp"] == "1" else "") for r in rows)
    cap = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 6


def test_video_falls_back_to_mp4v_with_a_notice_and_names_an_unwritable_output(tmp_path, monkeypatch):
    import resunetpp.inference.video as V

    src = write_video(tmp_path / "in.mp4", [frame(True)] * 3)

    def no_pyav(*args, **kwargs):
        raise ImportError("no av")

    monkeypatch.setattr(V, "_H264Writer", no_pyav)
    stats = process_video(seg(), src, tmp_path / "o.mp4", progress=False)
    assert stats.codec == MP4V and "PyAV is not installed" in stats.notice and "browsers" in stats.notice
    assert len(list(csv.DictReader(open(stats.csv_path)))) == 3
    with pytest.raises(OSError, match="cannot write H.264"):
        process_video(seg(), src, tmp_path / "h.mp4", progress=False, codec="h264")



LABEL = "polyp 25.0 %, certainty high"


def _label_box(shape, corner):
    """(y0, y1, x0, x1) of the box `draw_text` darkens for LABEL in `corner`, found from its pixels: the scene
    (200) darkened to 0.4 (80); the text's descenders may hang below the box, in other values."""
    blank = np.full(shape, 200, np.uint8)
    ys, xs = np.nonzero((draw_text(blank.copy(), [LABEL], corner) == 80).all(axis=2))
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


@pytest.mark.parametrize("shape", [(300, 700, 3), (1000, 1400, 3)])  # text scale 0.43 (thickness 1) and 1.43 (3)
@pytest.mark.parametrize("case", ["ring outside top-left", "column inside top-left", "row inside top-left",
                                  "only bottom-left free"])
def test_label_weighs_exactly_the_box_it_draws(case, shape):
    """draw_label counts the polyp pixels under the very box draw_text darkens, to the pixel: a polyp one pixel
    outside the top-left box does not count, one pixel inside does (against a few pixels in the top-right box),
    and the bottom corners are weighed where they are drawn."""
    image = np.full(shape, 200, np.uint8)
    mask = np.zeros(shape[:2], bool)
    tl, tr, bl, br = (_label_box(shape, c) for c in ("top-left", "top-right", "bottom-left", "bottom-right"))
    y1, x1 = tl[1], tl[3]
    for y0_, y1_, x0_, x1_ in (bl, br):
        mask[y0_:y1_, x0_:x1_] = True  # the bottom corners: fully covered
    cy, cx = (tr[0] + tr[1]) // 2, (tr[2] + tr[3]) // 2
    mask[cy:cy + 2, cx:cx + 2] = True  # the top-right: 4 pixels
    if case == "ring outside top-left":  # 0 under the box: top-left wins
        mask[:y1 + 1, x1] = True
        mask[y1, :x1 + 1] = True
        expected = "top-left"
    elif case == "column inside top-left":  # y1 pixels under the box, more than the top-right's 4
        mask[:y1, x1 - 1] = True
        expected = "top-right"
    elif case == "row inside top-left":
        mask[y1 - 1, :x1] = True
        expected = "top-right"
    else:  # every corner but the bottom-left covered
        mask[:] = True
        mask[bl[0]:bl[1], bl[2]:bl[3]] = False
        expected = "bottom-left"
    got = draw_label(image.copy(), LABEL, mask)
    np.testing.assert_array_equal(got, draw_text(image.copy(), [LABEL], expected))
