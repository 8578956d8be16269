"""Video: segment a file or a camera stream frame by frame and write an overlay video.

Conventions
-----------
* Source: a video file, or a camera index given as an integer string ("0"). Frames are decoded
  with OpenCV (BGR) and converted to RGB for the `Segmenter`.
* Output: an MP4 with the source's size and fps (30 when the source does not say), each frame the
  overlay of `resunetpp.inference.overlay.draw_overlay` plus a readout in the top-left corner: processing rate
  (frames/s over the last 30 frames), the frame's latency and its finding ("polyp 11.3 %, certainty
  high" or "no polyp found", `resunetpp.inference.findings`). The codec is H.264 (libx264, yuv420p, CRF 18, the
  index at the front) through PyAV, which browsers play inline; without PyAV (or when it cannot encode)
  it falls back to OpenCV's "mp4v" (MPEG-4 Part 2, which browsers do not play) and says so
  (`VideoStats.codec`, `VideoStats.notice`; `codec="mp4v"` asks for it). H.264 in yuv420p needs even
  sizes: an odd width or height is encoded one pixel larger, the last column / row repeated.
  A per-frame CSV has frame, timestamp_s, polyp, area_fraction, latency_ms, certainty, finding.
* Latency: from the moment the frame was grabbed to the moment its overlay was written, so
  batching (frames waiting for their batch to fill) is included. Timestamps are frame / fps for
  files and seconds since the start for cameras.
* `smooth=alpha` (0 <= alpha < 1) blends probability maps across frames, an exponential moving
  average p_t = alpha * p_{t-1} + (1 - alpha) * q_t of the model's q_t, before thresholding. It
  removes flicker but adds lag: after a step of q from 0 to 1 the average is 1 - alpha^(k+1) on
  the k-th frame after the step, so with threshold 0.5 the polyp first shows k frames late, with
  k = 0 for alpha < 0.5, k = 1 for alpha = 0.5 (0.75 on that frame), k = 3 for 0.8 (120 ms at
  25 fps) and k = 6 for 0.9 (240 ms). A polyp that leaves lingers as long.
* A clean stop at the end of the stream, after `max_frames`, or on KeyboardInterrupt / SIGINT
  (and SIGTERM): the writer is released in `finally`, so the file is always a valid video of
  the frames done so far. It is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from resunetpp.inference.findings import describe
from resunetpp.inference.overlay import draw_overlay, draw_text
from resunetpp.inference.segmenter import Segmenter

CSV_COLUMNS = ("frame", "timestamp_s", "polyp", "area_fraction", "latency_ms", "certainty", "finding")
DEFAULT_FPS = 30.0
CODECS = ("auto", "h264", "mp4v")
H264 = "H.264 (libx264 through PyAV)"
MP4V = "mp4v (MPEG-4 Part 2 through OpenCV)"
MP4V_NOTICE = ("the video is mp4v, which browsers do not play inline; install PyAV (pip install av, a "
               "dependency of resunetpp) for H.264")


class _H264Writer:
    """H.264 in MP4 through PyAV (its wheels ship libx264): what browsers play."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        import av

        self.size = size
        self.even = (size[0] + size[0] % 2, size[1] + size[1] % 2)
        self.container = av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"})
        try:
            self.stream = self.container.add_stream("libx264", rate=Fraction(round(fps * 1000), 1000))
            self.stream.width, self.stream.height = self.even
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": "18", "preset": "veryfast"}
            self._frame = av.VideoFrame
        except Exception:
            self.container.close()
            raise

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape[1::-1] != self.even:
            rgb = cv2.copyMakeBorder(rgb, 0, self.even[1] - rgb.shape[0], 0, self.even[0] - rgb.shape[1],
                                     cv2.BORDER_REPLICATE)
        for packet in self.stream.encode(self._frame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            self.container.mux(packet)

    def release(self) -> None:
        try:
            for packet in self.stream.encode(None):  # flush the encoder's delayed frames
                self.container.mux(packet)
        finally:
            self.container.close()


class _Mp4vWriter:
    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        if not self.writer.isOpened():
            self.writer.release()
            raise OSError("OpenCV cannot write an mp4v video here")

    def write(self, rgb: np.ndarray) -> None:
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def release(self) -> None:
        self.writer.release()


def open_writer(path: Path, fps: float, size: tuple[int, int], codec: str = "auto"):
    """(writer, codec description, notice or "") for an MP4 at `path`: H.264 through PyAV unless
    `codec="mp4v"`, or PyAV is missing or fails ("auto" then falls back to mp4v with a notice)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    reason = ""
    if codec in ("auto", "h264"):
        try:
            return _H264Writer(path, fps, size), H264, ""
        except ImportError:
            reason = "PyAV is not installed"
        except Exception as e:  # e.g. a PyAV build without libx264
            reason = f"PyAV cannot encode H.264 here ({type(e).__name__}: {e})"
        if codec == "h264":
            raise OSError(f"{path}: cannot write H.264: {reason}")
        path.unlink(missing_ok=True)
    try:
        writer = _Mp4vWriter(path, fps, size)
    except OSError as e:
        raise OSError(f"{path}: {e}" + (f"; and {reason}" if reason else "")) from None
    return writer, MP4V, (f"{reason}: " if reason else "") + MP4V_NOTICE if codec == "auto" else ""


@dataclass
class VideoStats:
    frames: int
    source_fps: float
    size: tuple[int, int]  # (width, height)
    mean_latency_ms: float
    processing_fps: float  # frames written per second of wall time
    interrupted: bool
    out_path: Path
    csv_path: Path
    codec: str = H264  # which encoder wrote out_path (H264 or MP4V)
    notice: str = ""  # why it is not H.264, when it fell back


def lag_frames(alpha: float, threshold: float = 0.5) -> int:
    """Frames after a 0 -> 1 step in probability before the smoothed value exceeds `threshold`."""
    if not 0 <= alpha < 1:
        raise ValueError(f"smoothing alpha must lie in [0, 1), got {alpha}")
    if not 0 <= threshold < 1:  # at 1 the mask never shows: the loop below would not end
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    if alpha == 0:
        return 0
    k = 0  # smallest k with 1 - alpha^(k+1) > threshold
    while 1 - alpha ** (k + 1) <= threshold:
        k += 1
    return k


def open_source(source: str | int | os.PathLike) -> tuple[cv2.VideoCapture, bool]:
    """(capture, is_live) for a file path or a camera index."""
    live = isinstance(source, int) or str(source).isdigit()
    if live:
        cap = cv2.VideoCapture(int(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: video file not found")
        cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        what = f"camera {int(source)}" if live else f"{source}"
        raise ValueError(f"{what}: OpenCV cannot open it as a video source")
    return cap, live


class _Stop:
    """Turn SIGTERM into KeyboardInterrupt for the duration of a run (main thread only)."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise KeyboardInterrupt

            self.previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def process_video(segmenter: Segmenter, source: str | int | os.PathLike, out: str | os.PathLike,
                  csv_path: str | os.PathLike | None = None, batch_size: int | None = None, smooth: float = 0.0,
                  max_frames: int | None = None, readout: bool = True, progress: bool = True,
                  codec: str = "auto") -> VideoStats:
    """Segment every frame of `source` and write the overlay video `out` and its CSV.

    batch_size defaults to 1 for cameras (lowest latency) and 4 for files (throughput).
    csv_path defaults to `out` with ".csv". codec: "auto" (H.264, else mp4v with a notice), "h264", "mp4v".
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    from resunetpp.progress import progress_bar

    if not 0 <= smooth < 1:
        raise ValueError(f"--smooth must lie in [0, 1), got {smooth}")
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"{out}: the output must be an .mp4 file")
    csv_path = Path(csv_path) if csv_path else out.with_suffix(".csv")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    cap, live = open_source(source)
    batch_size = batch_size or (1 if live else 4)
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if 0 < fps < 1000 else DEFAULT_FPS
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if not live else 0
    total = min(total, max_frames) if (total > 0 and max_frames) else (max_frames or total or None)

    tmp = out.with_name(f".{out.stem}.partial.mp4")  # the container is chosen from the extension
    writer = None
    codec_used, notice = "", ""
    size: tuple[int, int] = (0, 0)
    ema: np.ndarray | None = None
    written = 0
    latencies: list[float] = []
    done_times: deque[float] = deque(maxlen=30)
    interrupted = False
    start = time.perf_counter()
    try:
        fh = open(csv_path, "w", newline="")
    except OSError:
        cap.release()
        raise
    rows = csv.writer(fh)
    rows.writerow(CSV_COLUMNS)
    bar = progress_bar(total=total, unit="frame", disable=not progress, desc="video")
    try:
        with _Stop():
            while max_frames is None or written < max_frames:
                frames, grabbed = [], []
                while len(frames) < batch_size and (max_frames is None or written + len(frames) < max_frames):
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    grabbed.append(time.perf_counter())
                    frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                if not frames:
                    break
                if writer is None:
                    size = (frames[0].shape[1], frames[0].shape[0])
                    try:  # kept out of `writer` until open: `finally` must not rename a missing file
                        writer, codec_used, notice = open_writer(tmp, fps, size, codec)
                    except OSError as e:
                        raise OSError(str(e).replace(str(tmp), str(out))) from None
                probs = segmenter.probabilities(frames)
                for frame, prob, t_grab in zip(frames, probs, grabbed):
                    if smooth > 0:
                        ema = prob if ema is None or ema.shape != prob.shape else smooth * ema + (1 - smooth) * prob
                        prob = ema
                    mask = segmenter.postprocess(frame, prob)
                    finding = describe(mask, prob)
                    view = draw_overlay(frame, mask)
                    if view.shape[1::-1] != size:  # a stream that changes size mid-way
                        view = cv2.resize(view, size, interpolation=cv2.INTER_AREA)
                    now = time.perf_counter()
                    latency = (now - t_grab) * 1000
                    if readout:
                        rate = (len(done_times) / (now - done_times[0])) if len(done_times) > 1 else float("nan")
                        text = [f"{rate:5.1f} fps" if rate == rate else "  --- fps", f"{latency:5.0f} ms",
                                finding.short]
                        draw_text(view, text)
                    writer.write(view)
                    done_times.append(time.perf_counter())
                    latencies.append(latency)
                    stamp = (t_grab - start) if live else written / fps
                    rows.writerow([written, f"{stamp:.3f}", int(finding.polyp), f"{finding.area_fraction:.6f}",
                                   f"{latency:.1f}", finding.certainty or "", finding.text])
                    written += 1
                bar.update(len(frames))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        cap.release()
        fh.close()
        if writer is not None:
            writer.release()  # writes the MP4 index: the file is valid whatever stopped the loop
            os.replace(tmp, out)
    if written == 0:
        raise ValueError(f"{source}: interrupted before the first frame" if interrupted
                         else f"{source}: no frames could be read")
    elapsed = time.perf_counter() - start
    return VideoStats(frames=written, source_fps=fps, size=size, mean_latency_ms=float(np.mean(latencies)),
                      processing_fps=written / elapsed if elapsed > 0 else float("nan"), interrupted=interrupted,
                      out_path=out, csv_path=csv_path, codec=codec_used, notice=notice)
