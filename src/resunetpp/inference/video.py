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
from resunetpp.inference.transforms import smooth_prob
from resunetpp.progress import progress_bar

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
        import av  # heavy (FFmpeg's libraries), and `open_writer` falls back to mp4v without it

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
    """Segment every frame of `source` and write the overlay video `out` and its per-frame CSV.

    Args:
        segmenter: The model that segments the frames.
        source: A video file, or a camera index (an int or an integer string, "0").
        out: The output video, an .mp4 file (written under a temporary name, renamed at the end).
        csv_path: The per-frame CSV (default: `out` with ".csv").
        batch_size: Frames per forward pass (default: 1 for cameras, lowest latency; 4 for files, throughput).
        smooth: Exponential smoothing alpha of the probability maps across frames, in [0, 1) (module
            docstring); 0 leaves them as they are.
        max_frames: Stop after this many frames (default: the whole stream).
        readout: Whether to draw the rate, latency and finding in the top-left corner.
        progress: Whether to show a progress bar.
        codec: "auto" (H.264, else mp4v with a notice), "h264" or "mp4v".

    Returns:
        The frames written, the rates and latency, whether it was interrupted, the paths and the codec used.

    Raises:
        ValueError: An option out of range, an output that is not .mp4, a source OpenCV cannot open, or no
            frame read (or an interruption before the first one).
        FileNotFoundError: The video file does not exist.
        OSError: The video or the CSV cannot be written.
    """
    out = Path(out)
    _check_options(out, codec, smooth, batch_size)
    csv_path = Path(csv_path) if csv_path else out.with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    cap, live = open_source(source)
    run = _Run(segmenter, out, _frame_rate(cap), live, smooth, readout, codec)
    try:
        fh = open(csv_path, "w", newline="")
    except OSError:
        cap.release()
        raise
    rows = csv.writer(fh)
    rows.writerow(CSV_COLUMNS)
    bar = progress_bar(total=_frame_total(cap, live, max_frames), unit="frame", disable=not progress, desc="video")
    interrupted = False
    try:
        with _Stop():
            run.frames(cap, rows, batch_size or (1 if live else 4), max_frames, bar)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        cap.release()
        fh.close()
        run.close()
    if run.written == 0:
        raise ValueError(f"{source}: interrupted before the first frame" if interrupted
                         else f"{source}: no frames could be read")
    return run.stats(interrupted, csv_path)


def _check_options(out: Path, codec: str, smooth: float, batch_size: int | None) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth must lie in [0, 1), got {smooth}")
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"{out}: the output must be an .mp4 file")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _frame_rate(cap: cv2.VideoCapture) -> float:
    """The source's fps, or `DEFAULT_FPS` when it does not say (or says nonsense)."""
    fps = cap.get(cv2.CAP_PROP_FPS)
    return fps if 0 < fps < 1000 else DEFAULT_FPS


def _frame_total(cap: cv2.VideoCapture, live: bool, max_frames: int | None) -> int | None:
    """The frames the run will do, for the progress bar: None when unknown (a camera without `max_frames`)."""
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if not live else 0
    return min(total, max_frames) if (total > 0 and max_frames) else (max_frames or total or None)


def _read_frames(cap: cv2.VideoCapture, count: int) -> tuple[list[np.ndarray], list[float]]:
    """Up to `count` RGB frames (fewer at the end of the stream) and the moments they were grabbed."""
    frames, grabbed = [], []
    while len(frames) < count:
        ok, bgr = cap.read()
        if not ok:
            break
        grabbed.append(time.perf_counter())
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return frames, grabbed


class _Run:
    """One `process_video` run: the writer (opened on the first frame, at its size), the smoothed
    probability, the frames written and their latencies."""

    def __init__(self, segmenter: Segmenter, out: Path, fps: float, live: bool, smooth: float, readout: bool,
                 codec: str):
        self.segmenter, self.out, self.fps, self.live = segmenter, out, fps, live
        self.smooth, self.readout, self.codec = smooth, readout, codec
        self.tmp = out.with_name(f".{out.stem}.partial.mp4")  # the container is chosen from the extension
        self.writer = None
        self.codec_used, self.notice = "", ""
        self.size: tuple[int, int] = (0, 0)
        self.ema: np.ndarray | None = None
        self.written = 0
        self.latencies: list[float] = []
        self.done_times: deque[float] = deque(maxlen=30)
        self.start = time.perf_counter()

    def frames(self, cap: cv2.VideoCapture, rows, batch_size: int, max_frames: int | None, bar) -> None:
        """Every frame of `cap` (up to `max_frames`), `batch_size` per forward pass."""
        while max_frames is None or self.written < max_frames:
            count = batch_size if max_frames is None else min(batch_size, max_frames - self.written)
            frames, grabbed = _read_frames(cap, count)
            if not frames:
                break
            if self.writer is None:
                self.open(frames[0])
            probs = self.segmenter.probabilities(frames)
            for frame, prob, t_grab in zip(frames, probs, grabbed):
                self.write(frame, prob, t_grab, rows)
            bar.update(len(frames))

    def open(self, frame: np.ndarray) -> None:
        self.size = (frame.shape[1], frame.shape[0])
        try:  # kept out of `writer` until open: `close` must not rename a missing file
            self.writer, self.codec_used, self.notice = open_writer(self.tmp, self.fps, self.size, self.codec)
        except OSError as e:
            raise OSError(str(e).replace(str(self.tmp), str(self.out))) from None

    def write(self, frame: np.ndarray, prob: np.ndarray, t_grab: float, rows) -> None:
        """One frame: its probability smoothed, its overlay (and readout) written, its CSV row."""
        if self.smooth > 0:
            prob = self.ema = smooth_prob(self.ema, prob, self.smooth)
        mask = self.segmenter.postprocess(frame, prob)
        finding = describe(mask, prob)
        view = draw_overlay(frame, mask)
        if view.shape[1::-1] != self.size:  # a stream that changes size mid-way
            view = cv2.resize(view, self.size, interpolation=cv2.INTER_AREA)
        now = time.perf_counter()
        latency = (now - t_grab) * 1000
        if self.readout:
            draw_text(view, self.readout_lines(now, latency, finding.short))
        self.writer.write(view)
        self.done_times.append(time.perf_counter())
        self.latencies.append(latency)
        stamp = (t_grab - self.start) if self.live else self.written / self.fps
        rows.writerow([self.written, f"{stamp:.3f}", int(finding.polyp), f"{finding.area_fraction:.6f}",
                       f"{latency:.1f}", finding.certainty or "", finding.text])
        self.written += 1

    def readout_lines(self, now: float, latency: float, finding: str) -> list[str]:
        """Rate over the last 30 frames, this frame's latency and its finding."""
        done = self.done_times
        rate = (len(done) / (now - done[0])) if len(done) > 1 else float("nan")
        return [f"{rate:5.1f} fps" if rate == rate else "  --- fps", f"{latency:5.0f} ms", finding]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()  # writes the MP4 index: the file is valid whatever stopped the loop
            os.replace(self.tmp, self.out)

    def stats(self, interrupted: bool, csv_path: Path) -> VideoStats:
        elapsed = time.perf_counter() - self.start
        return VideoStats(frames=self.written, source_fps=self.fps, size=self.size,
                          mean_latency_ms=float(np.mean(self.latencies)),
                          processing_fps=self.written / elapsed if elapsed > 0 else float("nan"),
                          interrupted=interrupted, out_path=self.out, csv_path=csv_path, codec=self.codec_used,
                          notice=self.notice)
