"""File-level prediction, what `resunetpp predict` runs: input collection (files, folders, globs),
output naming, masks/overlays/probability maps on disk and `predictions.csv`, over a `Segmenter`.

A file that can't be used does not stop the run: it gets an `error:` line naming it and a CSV row
with the reason; every other file is written. A full disk stops the run with the summary; Ctrl-C
prints it too. Nothing is left behind for a row the CSV marks as failed.
"""

from __future__ import annotations

import csv
import errno
import glob
import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np
from tqdm import tqdm

from resunetpp.inference.coco import CocoWriter
from resunetpp.inference.findings import describe
from resunetpp.inference.overlay import draw_label, draw_overlay
from resunetpp.inference.segmenter import Segmenter
from resunetpp.io import IMAGE_EXTENSIONS, ImageReadError, read_image
from resunetpp.progress import progress_bar
from resunetpp.utils import output_folder

CSV_COLUMNS = ("input", "mask", "overlay", "prob", "height", "width", "area_fraction", "polyp",
               "confidence", "certainty", "finding", "x0", "y0", "x1", "y1", "time_ms", "error")
PROB_FORMATS = ("png", "npy")


@dataclass
class InputList:
    files: list[Path]
    missing: list[tuple[str, str]] = field(default_factory=list)  # (input as given, reason)
    skipped: list[Path] = field(default_factory=list)  # non-image files found inside folders


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> InputList:
    """Expand files, folders (recursively: files with an image extension; hidden files ignored)
    and glob patterns into a sorted, de-duplicated file list. Files named explicitly are kept
    whatever their extension (reading them reports what is wrong)."""
    found: dict[Path, None] = {}
    result = InputList(files=[])
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue
                if f.is_symlink() and not f.exists():  # reported, never dropped silently
                    result.missing.append((str(f), f"broken symbolic link (points to {os.readlink(f)})"))
                    continue
                if not f.is_file():
                    continue
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    found[f] = None
                else:
                    result.skipped.append(f)
        elif p.exists():
            found[p] = None
        elif p.is_symlink():
            result.missing.append((str(raw), f"broken symbolic link (points to {os.readlink(p)})"))
        elif glob.has_magic(str(raw)):
            matches = [Path(m) for m in sorted(glob.glob(str(raw), recursive=True)) if Path(m).is_file()]
            if not matches:
                result.missing.append((str(raw), "no files match this pattern"))
            for m in matches:
                found[m] = None
        else:
            result.missing.append((str(raw), "no such file or folder"))
    result.files = list(found)
    return result


def common_root(files: Sequence[Path]) -> Path:
    """The deepest folder holding every file of `files` (absolute), or "." for none."""
    if not files:
        return Path(".")
    return Path(os.path.commonpath([os.path.abspath(f.parent) for f in files]))


def output_names(files: Sequence[Path]) -> list[Path]:
    """Relative output paths (".png") that keep the inputs' folder structure below their deepest
    common folder, so same-named files in different folders never collide; two inputs that
    differ only by extension keep it in the name (a.jpg -> a.jpg.png)."""
    if not files:
        return []
    root = common_root(files)
    rel = [Path(os.path.abspath(f)).relative_to(root) for f in files]
    stems = [r.with_suffix(".png") for r in rel]
    counts: dict[Path, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else r.with_name(r.name + ".png") for s, r in zip(stems, rel)]


@dataclass
class PredictSummary:
    rows: list[dict[str, Any]]
    csv_path: Path
    skipped: list[Path]
    not_done: int = 0            # inputs never attempted (the run stopped early)
    stopped: str = ""            # why it stopped early ("" when it ran to the end)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["error"]]

    def line(self, out: str | os.PathLike) -> str:
        """The one-line summary `resunetpp predict` prints."""
        ok = len(self.rows) - len(self.failed)
        found = sum(1 for r in self.rows if r["polyp"] == 1)
        rest = f", {self.not_done} not done" if self.not_done else ""
        return (f"{ok} image(s) segmented, {found} with a polyp, {len(self.failed)} failed{rest}; "
                f"results in {out} (predictions.csv)")


class PredictOutputError(ValueError):
    """`out_dir` cannot be used: it is a file, lies under a file, or cannot be created or written."""


class PredictStopped(Exception):
    """The disk filled up (or the CSV could not be written): the run stopped; `summary` says what was done."""

    def __init__(self, message: str, summary: PredictSummary):
        super().__init__(message)
        self.summary = summary


class PredictInterrupted(KeyboardInterrupt):
    """Ctrl-C during `predict_files`; `summary` says what was written (the CSV is complete for it)."""

    def __init__(self, summary: PredictSummary):
        super().__init__("interrupted")
        self.summary = summary


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create `out` (and its parents) or raise `PredictOutputError` with one line saying what to do.
    An existing file is never replaced by the folder."""
    try:
        return output_folder(out)
    except OSError as e:
        raise PredictOutputError(str(e)) from None


def _os_reason(e: BaseException) -> str:
    if isinstance(e, OSError) and (getattr(e, "reason", None) or e.strerror):
        return getattr(e, "reason", None) or e.strerror  # reason: utils' one-line errors, without the path
    return f"{type(e).__name__}: {e}"


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the foreground, x1/y1 exclusive (numpy slicing), or None if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if not len(ys):
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _write_bytes(path: Path, data: bytes, written: list[Path]) -> None:
    """Write `data` to `path`, recording it in `written` first so that a failed row can be undone.
    An OSError keeps its errno and reason (e.g. ENOSPC, "No space left on device")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written.append(path)
    with open(path, "wb") as fh:
        fh.write(data)


def _write_png(path: Path, array: np.ndarray, written: list[Path]) -> None:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode this PNG ({array.shape} {array.dtype})")
    _write_bytes(path, buf.tobytes(), written)


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _timed_read(path: Path) -> tuple[np.ndarray | None, str, float]:
    t = time.perf_counter()
    try:
        return read_image(path), "", time.perf_counter() - t
    except ImageReadError as e:
        return None, str(e), time.perf_counter() - t
    except Exception as e:  # a reader bug must not stop a long run either
        return None, f"{path}: {type(e).__name__}: {e}", time.perf_counter() - t


def _print_error(message: str) -> None:
    tqdm.write(f"error: {message}", file=sys.stderr)


def predict_files(segmenter: Segmenter, inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                  batch_size: int = 4, save_prob: str | None = None, overlay: bool = True, progress: bool = True,
                  on_error: Callable[[str], None] | None = _print_error,
                  coco: str | os.PathLike | None = None) -> PredictSummary:
    """Segment image files and write their masks, overlays, probability maps and `predictions.csv`.

    A file that cannot be read or processed gets a CSV row with its error and `on_error(message)` (the message
    starts with the path); every other file is still done. The CSV has one row per input, written as the run
    goes, with the finding in words (`resunetpp.inference.findings`) and `time_ms`, that file's wall time:
    reading, its share of its batch's forward pass, post-processing and writing.

    Args:
        segmenter: The model.
        inputs: Files (kept whatever their extension), folders (searched recursively for images; hidden files
            ignored) and glob patterns.
        out_dir: The output folder, created if missing: masks/<rel>.png (0/255), predictions.csv and the below.
        batch_size: Images per forward pass (>= 1); a failed batch is retried image by image.
        save_prob: Also save the probability maps: "png" probs/<rel>.png (8-bit, round(255 p)) or "npy"
            probs/<rel>.npy (float32); None saves none.
        overlay: Write overlays/<rel>.png: the polyp tinted and outlined, and its finding written in the corner
            that hides least of it ("no polyp found" or "polyp 11.3 %, certainty high").
        progress: Show a progress bar.
        on_error: Called with each failed file's message (default: an `error:` line on stderr); None: silent.
        coco: Also write this COCO instance file (`resunetpp.inference.coco`: one image entry per segmented
            input, one RLE annotation per predicted polyp), at the end, after Ctrl-C or a full disk too, for what
            was done.

    Returns:
        The rows written, the CSV's path and the non-image files skipped in folders.

    Raises:
        ValueError: `save_prob` or `batch_size` out of range.
        PredictOutputError: `out_dir`, its CSV or the COCO file cannot be written.
        PredictStopped: The disk filled up or the CSV could not be written; its `summary` says what was done.
        PredictInterrupted: Ctrl-C (a KeyboardInterrupt); its `summary` says what was done.
    """
    _check_options(save_prob, batch_size)
    out = prepare_out_dir(out_dir)
    listing = collect_inputs(inputs)
    csv_path = out / "predictions.csv"
    summary = PredictSummary(rows=[], csv_path=csv_path, skipped=listing.skipped)
    run = _Run(segmenter, out, listing, _open_csv(csv_path), summary, report=on_error or (lambda _m: None),
               save_prob=save_prob, overlay=overlay, coco=CocoWriter() if coco is not None else None)
    try:
        run.run(batch_size, progress)
    except (PredictStopped, KeyboardInterrupt) as e:
        run.write_coco(coco)
        done = {r["input"] for r in summary.rows} & {str(f) for f in listing.files}
        summary.not_done = len(listing.files) - len(done)
        if isinstance(e, PredictStopped):
            summary.stopped = "disk full"
            raise
        summary.stopped = "interrupted"
        raise PredictInterrupted(summary) from None
    run.write_coco(coco)
    return summary


def _check_options(save_prob: str | None, batch_size: int) -> None:
    if save_prob is not None and save_prob not in PROB_FORMATS:
        raise ValueError(f"save_prob must be one of {', '.join(PROB_FORMATS)} or None, got {save_prob!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _open_csv(csv_path: Path) -> IO[str]:
    """`csv_path` opened for writing, or `PredictOutputError` saying why it cannot be."""
    if csv_path.is_dir():
        raise PredictOutputError(f"{csv_path}: is a folder; remove it or choose another output folder")
    try:
        return open(csv_path, "w", newline="")
    except OSError as e:
        raise PredictOutputError(f"{csv_path}: cannot write it ({_os_reason(e)}); choose an output folder you can "
                                 "write to") from None


def _read_ahead(pool: ThreadPoolExecutor, files: list[Path],
                batch_size: int) -> Iterator[tuple[list[int], list[tuple[np.ndarray | None, str, float]]]]:
    """Each batch of indices into `files` with its reads; the next batch is read while this one is computed."""
    batches = [list(range(i, min(i + batch_size, len(files)))) for i in range(0, len(files), batch_size)]

    def submit(batch: list[int]) -> list[Future]:
        return [pool.submit(_timed_read, files[i]) for i in batch]

    pending = submit(batches[0]) if batches else []
    for k, batch in enumerate(batches):
        reads = [f.result() for f in pending]
        pending = submit(batches[k + 1]) if k + 1 < len(batches) else []
        yield batch, reads


class _Run:
    """One `predict_files` run: its CSV, written row by row, and what each input file becomes."""

    def __init__(self, segmenter: Segmenter, out: Path, listing: InputList, fh: IO[str], summary: PredictSummary,
                 report: Callable[[str], None], save_prob: str | None, overlay: bool, coco: CocoWriter | None):
        self.segmenter, self.out, self.listing, self.fh, self.summary = segmenter, out, listing, fh, summary
        self.report, self.save_prob, self.overlay, self.coco = report, save_prob, overlay, coco
        self.files = listing.files
        self.names = output_names(self.files)
        self.coco_root = common_root(self.files)  # COCO file names as the outputs are named
        self.writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)

    def run(self, batch_size: int, progress: bool) -> None:
        """Every input, batch by batch; the CSV is flushed after each batch."""
        with self.fh, ThreadPoolExecutor(max_workers=2) as pool, \
                progress_bar(total=len(self.files), unit="img", disable=not progress, desc="predict") as bar:
            self.writer.writeheader()
            for src, reason in self.listing.missing:
                self.fail(src, f"{src}: {reason}")
            for batch, reads in _read_ahead(pool, self.files, batch_size):
                self.segment(batch, reads)
                try:
                    self.fh.flush()
                except OSError as e:
                    raise PredictStopped(self.csv_error(e), self.summary) from None
                bar.update(len(batch))

    def write_coco(self, path: str | os.PathLike | None) -> None:
        """The COCO file of what was done, if one was asked for."""
        if self.coco is None:
            return
        try:
            self.coco.write(path)
        except OSError as e:
            raise PredictOutputError(f"{path}: cannot write the COCO file ({_os_reason(e)})") from None

    def csv_error(self, e: OSError) -> str:
        return f"{self.summary.csv_path}: cannot write the CSV ({_os_reason(e)})"

    def record(self, row: dict[str, Any]) -> None:
        self.summary.rows.append(row)
        try:
            self.writer.writerow(row)
        except OSError as e:
            raise PredictStopped(self.csv_error(e), self.summary) from None

    def fail(self, src: str, message: str, seconds: float = 0.0, quiet: bool = False) -> None:
        row = dict.fromkeys(CSV_COLUMNS, "")
        row.update(input=src, time_ms=f"{seconds * 1000:.1f}", error=message)
        self.record(row)
        if not quiet:
            self.report(message)

    def segment(self, batch: list[int], reads: list[tuple[np.ndarray | None, str, float]]) -> None:
        """One batch: the files read (failed reads get their rows), one forward pass, each file written."""
        good = []
        for i, (image, err, secs) in zip(batch, reads):
            if image is None:
                self.fail(str(self.files[i]), err, secs)
            else:
                good.append((i, image, secs))
        if not good:
            return
        t0 = time.perf_counter()
        results = _infer(self.segmenter, [g[1] for g in good])
        share = (time.perf_counter() - t0) / len(good)
        for (i, image, secs), (prob, err) in zip(good, results):
            if prob is None:
                self.fail(str(self.files[i]), f"{self.files[i]}: inference failed ({err})", secs)
            else:
                self.write(i, image, prob, secs, share)

    def write(self, i: int, image: np.ndarray, prob: np.ndarray, secs: float, share: float) -> None:
        """File `i`'s outputs and row; if one output fails, none is left behind and the row says why. A full
        disk stops the run (`PredictStopped`)."""
        src = self.files[i]
        t1 = time.perf_counter()
        written: list[Path] = []
        try:
            row = self.write_outputs(src, self.names[i], image, prob, written)
        except BaseException as e:
            _remove(written)  # no mask left behind for a row the CSV marks as failed
            if not isinstance(e, Exception):
                raise
            if isinstance(e, OSError) and e.errno in _DISK_FULL:  # said once, by the caller
                message = f"{src}: not written: {_os_reason(e)} in {self.out}"
                self.fail(str(src), message, secs, quiet=True)
                raise PredictStopped(message, self.summary) from None
            self.fail(str(src), f"{src}: not written: {_os_reason(e)}", secs)
            return
        row["time_ms"] = f"{(secs + share + time.perf_counter() - t1) * 1000:.1f}"
        self.record(row)

    def write_outputs(self, src: Path, name: Path, image: np.ndarray, prob: np.ndarray,
                      written: list[Path]) -> dict[str, Any]:
        """Mask, overlay and probability map of `src` under their folders; its CSV row (without time_ms)."""
        out = self.out
        mask = self.segmenter.postprocess(image, prob)
        finding = describe(mask, prob)
        row = dict.fromkeys(CSV_COLUMNS, "")
        _write_png(out / "masks" / name, mask.astype(np.uint8) * 255, written)
        row["mask"] = str(Path("masks") / name)
        if self.overlay:
            view = draw_label(draw_overlay(image, mask), finding.short, mask)
            _write_png(out / "overlays" / name, cv2.cvtColor(view, cv2.COLOR_RGB2BGR), written)
            row["overlay"] = str(Path("overlays") / name)
        if self.save_prob == "png":
            _write_png(out / "probs" / name, np.round(prob * 255).astype(np.uint8), written)
            row["prob"] = str(Path("probs") / name)
        elif self.save_prob == "npy":
            buf = io.BytesIO()
            np.save(buf, prob.astype(np.float32))
            _write_bytes(out / "probs" / name.with_suffix(".npy"), buf.getvalue(), written)
            row["prob"] = str(Path("probs") / name.with_suffix(".npy"))
        box = bounding_box(mask)
        row.update(input=str(src), height=mask.shape[0], width=mask.shape[1],
                   area_fraction=f"{mask.mean():.6f}", polyp=int(finding.polyp), finding=finding.text,
                   confidence="" if finding.confidence is None else f"{finding.confidence:.4f}",
                   certainty=finding.certainty or "")
        if box:
            row.update(zip(("x0", "y0", "x1", "y1"), box))
        if self.coco is not None:  # last: only an image whose files were all written is listed
            self.coco.add(Path(os.path.abspath(src)).relative_to(self.coco_root).as_posix(), mask, prob)
        return row


def _infer(segmenter: Segmenter, images: list[np.ndarray]) -> list[tuple[np.ndarray | None, str]]:
    """(prob, "") or (None, error) per image. A failed batch is retried image by image, so an input
    that breaks the model (or a batch too big for the device) fails alone, not its batch-mates."""
    try:
        return [(p, "") for p in segmenter.probabilities(images)]
    except Exception as e:
        if len(images) == 1:
            return [(None, f"{type(e).__name__}: {e}")]
        return [r for im in images for r in _infer(segmenter, [im])]
