"""`resunetpp video` on short videos the tests write themselves (OpenCV, mp4v)."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers.inference import disc_image, save_disc_checkpoint, write_video  # noqa: F401
from resunetpp import Segmenter
from resunetpp.cli import app
from resunetpp.inference.video import lag_frames, process_video

runner = CliRunner()


def _read_video(path):
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames, fps


class _Brightness(torch.nn.Module):
    """A stand-in model with known output: logit = 40 * (mean channel value - 0.5), i.e. a
    probability of ~1 on white and ~0 on black, so smoothing lag can be counted exactly."""

    def forward(self, x):
        return 40 * (x.mean(dim=1, keepdim=True) - 0.5)


def test_video_cli_keeps_frames_size_fps_and_writes_csv(tmp_path):
    ckpt = save_disc_checkpoint(tmp_path / "run")
    rng = np.random.default_rng(20)
    pairs = [disc_image(rng, 50, 70) for _ in range(10)]  # 70x50: not a multiple of 8
    frames = [p[0] for p in pairs]
    src = write_video(tmp_path / "in.mp4", frames, fps=12.0)
    out = tmp_path / "out" / "seg.mp4"
    r = runner.invoke(app, ["video", str(src), "--weights", str(ckpt), "--out", str(out), "--batch-size", "4",
                            "--smooth", "0.3", "--no-readout"])
    assert r.exit_code == 0, r.output
    written, fps = _read_video(out)
    assert len(written) == 10 and written[0].shape == (50, 70, 3) and fps == pytest.approx(12.0)
    with open(out.with_suffix(".csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["frame"]) for r in rows] == list(range(10))
    assert float(rows[3]["timestamp_s"]) == pytest.approx(3 / 12, abs=1e-3)
    assert all(r["polyp"] == "1" and 0 < float(r["area_fraction"]) < 0.5 and float(r["latency_ms"]) > 0
               for r in rows)
    # the overlay is drawn on the polyp and nowhere else (no readout box: --no-readout): inside the disc
    # (away from its outline) the frame turns green, well outside it stays as it was, up to mp4v's error
    decoded, _ = _read_video(src)  # the frames as the model saw them (mp4v is lossy)
    diff = written[5].astype(float) - decoded[5]
    disc = pairs[5][1].astype(np.uint8)
    inside = cv2.erode(disc, np.ones((5, 5), np.uint8)).astype(bool)
    outside = ~cv2.dilate(disc, np.ones((7, 7), np.uint8)).astype(bool)
    assert inside.sum() > 20 and outside.sum() > 1000
    assert diff[inside][:, 1].mean() > 30 and diff[inside][:, 2].mean() < -30  # BGR: green up, red down
    assert np.abs(diff[outside].mean(0)).max() < 3  # per-channel means: the codec's noise averages out
    # --max-frames and a custom CSV path; no source -> a clear error, exit 1
    r = runner.invoke(app, ["video", str(src), "-w", str(ckpt), "-o", str(tmp_path / "short.mp4"), "--max-frames", "3",
                            "--csv", str(tmp_path / "short-frames.csv")])
    assert r.exit_code == 0, r.output
    assert len(_read_video(tmp_path / "short.mp4")[0]) == 3
    assert len((tmp_path / "short-frames.csv").read_text().splitlines()) == 4
    r = runner.invoke(app, ["video", str(tmp_path / "nope.mp4"), "-w", str(ckpt), "-o", str(tmp_path / "x.mp4")])
    assert r.exit_code == 3 and "nope.mp4" in r.output and "Traceback" not in r.output  # bad input


def test_smoothing_lag_matches_the_documented_formula(tmp_path):
    assert [lag_frames(a) for a in (0.0, 0.3, 0.5, 0.8, 0.9)] == [0, 0, 1, 3, 6]
    with pytest.raises(ValueError, match="threshold"):
        lag_frames(0.5, threshold=1.0)  # the mask never shows: no finite lag (was an endless loop)
    step = 4
    frames = [np.full((32, 32, 3), 0 if i < step else 255, np.uint8) for i in range(12)]
    src = write_video(tmp_path / "step.mp4", frames, fps=25.0)
    seg = Segmenter(_Brightness(), config={"input_size": [32, 32]})
    for alpha in (0.0, 0.5, 0.8):
        stats = process_video(seg, src, tmp_path / f"s{alpha}.mp4", smooth=alpha, batch_size=3, progress=False)
        assert stats.frames == 12 and not stats.interrupted
        with open(stats.csv_path) as fh:
            polyp = [int(r["polyp"]) for r in csv.DictReader(fh)]
        assert polyp.index(1) == step + lag_frames(alpha), (alpha, polyp)
        assert all(polyp[step + lag_frames(alpha):])


def test_interrupt_leaves_a_valid_video(tmp_path):
    frames = [np.full((40, 48, 3), 20 * i, np.uint8) for i in range(8)]
    src = write_video(tmp_path / "in.mp4", frames)

    class Interrupting(Segmenter):
        calls = 0

        def probabilities(self, images):
            Interrupting.calls += 1
            if Interrupting.calls == 3:
                raise KeyboardInterrupt
            return super().probabilities(images)

    seg = Interrupting(_Brightness(), config={"input_size": [40, 48]})
    stats = process_video(seg, src, tmp_path / "cut.mp4", batch_size=2, progress=False)
    assert stats.interrupted and stats.frames == 4
    written, _ = _read_video(tmp_path / "cut.mp4")
    assert len(written) == 4 and written[0].shape == (40, 48, 3)
    assert len(stats.csv_path.read_text().splitlines()) == 5
    assert not list(tmp_path.glob(".*partial*"))  # the temporary file was renamed


def test_unwritable_video_names_the_output(tmp_path, monkeypatch):
    src = write_video(tmp_path / "in.mp4", [np.zeros((32, 32, 3), np.uint8)] * 2)

    class Unopened:
        def __init__(self, *args):
            pass

        def isOpened(self):
            return False

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoWriter", Unopened)
    seg = Segmenter(_Brightness(), config={"input_size": [32, 32]})
    with pytest.raises(OSError, match="cannot write") as info:
        process_video(seg, src, tmp_path / "o.mp4", csv_path=tmp_path / "new" / "o.csv", progress=False,
                      codec="mp4v")  # OpenCV's writer (H.264 goes through PyAV: tests/inference/test_no_polyp.py)
    assert str(tmp_path / "o.mp4") in str(info.value)  # not a FileNotFoundError for the temporary file
    assert not (tmp_path / "o.mp4").exists()


def _half_white(h: int = 128, w: int = 192) -> np.ndarray:
    """Left half white (a "polyp" for `_Brightness`), right half dark grey."""
    frame = np.full((h, w, 3), 30, np.uint8)
    frame[:, : w // 2] = 255
    return frame


def _tint(value: int) -> np.ndarray:
    """The overlay's colour inside a mask, by hand: round(v * 0.65 + (0, 255, 0) * 0.35), as BGR."""
    rgb = [round(value * 0.65 + c * 0.35) for c in (0, 255, 0)]
    return np.array(rgb[::-1], float)


@pytest.mark.parametrize("readout", [True, False])
def test_overlay_tints_the_polyp_only_and_the_readout_box_only_its_corner(tmp_path, readout):
    frames = [_half_white() for _ in range(4)]
    src = write_video(tmp_path / "in.mp4", frames)
    seg = Segmenter(_Brightness(), config={"input_size": [32, 32]})
    stats = process_video(seg, src, tmp_path / "o.mp4", readout=readout, progress=False)
    assert stats.frames == 4
    out, _ = _read_video(tmp_path / "o.mp4")
    f = out[2].astype(float)
    # well inside the white half, below any readout box: the tint, up to mp4v's (chroma) compression error
    assert np.abs(f[60:120, 10:80].reshape(-1, 3).mean(0) - _tint(255)).max() < 10
    # the dark half (no polyp) is left as it was
    assert np.abs(f[60:120, 110:190].reshape(-1, 3).mean(0) - 30).max() < 10
    corner = f[2:12, 2:30].mean()  # where the readout box goes: darkened only when it is drawn
    tinted = _tint(255).mean()
    if readout:
        assert corner < tinted - 40  # a box at 0.4 of the scene, with text on it
    else:
        assert abs(corner - tinted) < 8


def test_no_readout_flag_reaches_process_video(tmp_path, monkeypatch):
    import resunetpp.inference.video as V

    seen = {}

    def spy(seg, source, out, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(V, "process_video", spy)
    ckpt = save_disc_checkpoint(tmp_path / "run")
    for flag, expected in (("--no-readout", False), ("--readout", True)):
        r = runner.invoke(app, ["video", "x.mp4", "-w", str(ckpt), "-o", str(tmp_path / "o.mp4"), flag])
        assert r.exit_code == 3 and "stop here" in r.output
        assert seen["readout"] is expected


class _Camera:
    """A stand-in for cv2.VideoCapture(index): `n` frames, no fps, then the stream ends; `on_read(i)` runs
    before frame i is returned."""

    opened: list = []

    def __init__(self, source, n=5, on_read=None, ok=True):
        _Camera.opened.append(source)
        self.i, self.n, self.on_read, self.ok = 0, n, on_read, ok

    def isOpened(self):
        return self.ok

    def get(self, prop):
        return 0.0  # cameras often report no fps and no frame count

    def read(self):
        if self.i >= self.n:
            return False, None
        if self.on_read:
            self.on_read(self.i)
        self.i += 1
        return True, cv2.cvtColor(_half_white(64, 96), cv2.COLOR_RGB2BGR)

    def release(self):
        pass


def test_camera_source_is_live_one_frame_per_batch_and_stamped_by_the_clock(tmp_path, monkeypatch):
    import resunetpp.inference.video as V

    calls = []

    class Counting(Segmenter):
        def probabilities(self, images):
            calls.append(len(images))
            return super().probabilities(images)

    _Camera.opened = []
    monkeypatch.setattr(V.cv2, "VideoCapture", _Camera)
    seg = Counting(_Brightness(), config={"input_size": [32, 32]})
    stats = process_video(seg, "0", tmp_path / "cam.mp4", progress=False)
    monkeypatch.undo()
    assert _Camera.opened == [0]  # the index as an int: OpenCV opens a camera, not a file named "0"
    assert calls == [1] * 5  # lowest latency: no waiting for a batch to fill
    assert stats.frames == 5 and stats.source_fps == 30.0 and stats.size == (96, 64) and not stats.interrupted
    with open(stats.csv_path) as fh:
        stamps = [float(r["timestamp_s"]) for r in csv.DictReader(fh)]
    assert stamps == sorted(stamps) and stamps[-1] < 60  # seconds since the start, not frame / fps
    assert stamps != [round(i / 30, 3) for i in range(5)]
    assert len(_read_video(tmp_path / "cam.mp4")[0]) == 5


def test_a_camera_that_cannot_open_is_a_clear_error(tmp_path, monkeypatch):
    import resunetpp.inference.video as V

    monkeypatch.setattr(V.cv2, "VideoCapture", lambda src: _Camera(src, ok=False))
    seg = Segmenter(_Brightness(), config={"input_size": [32, 32]})
    with pytest.raises(ValueError, match="camera 3: OpenCV cannot open it"):
        process_video(seg, "3", tmp_path / "x.mp4", progress=False)


def test_sigterm_stops_cleanly_with_a_valid_video_and_restores_the_handler(tmp_path, monkeypatch):
    import signal

    import resunetpp.inference.video as V

    def term_at_third(i):
        if i == 3:  # what the OS does on SIGTERM: call the handler installed for it. (A real os.kill in this
            # process crashes inside OpenVINO's CPU plugin once the export tests have loaded it.)
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler), "process_video installed no SIGTERM handler"
            handler(signal.SIGTERM, None)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(V.cv2, "VideoCapture", lambda src: _Camera(src, n=10, on_read=term_at_third))
    seg = Segmenter(_Brightness(), config={"input_size": [32, 32]})
    stats = process_video(seg, "0", tmp_path / "t.mp4", progress=False)
    monkeypatch.undo()
    assert stats.interrupted and stats.frames == 3
    assert signal.getsignal(signal.SIGTERM) is before
    assert len(_read_video(tmp_path / "t.mp4")[0]) == 3
    assert len(stats.csv_path.read_text().splitlines()) == 4
    assert not list(tmp_path.glob(".*partial*"))
