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
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from resunetpp.inference.segmenter import Segmenter
from resunetpp.io import IMAGE_EXTENSIONS, ImageReadError, read_image

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


def output_names(files: Sequence[Path]) -> list[Path]:
    """Relative output paths (".png") that keep the inputs' folder structure below their deepest
    common folder, so same-named files in different folders never collide; two inputs that
    differ only by extension keep it in the name (a.jpg -> a.jpg.png)."""
    if not files:
        return []
    parents = [os.path.abspath(f.parent) for f in files]
    root = Path(os.path.commonpath(parents))
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
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PredictOutputError(f"{out}: exists and is a file, not a folder; choose a folder for --out "
                                 "(nothing was written)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((a for a in [out, *out.parents] if a.exists() and not a.is_dir()), out.parent)
        raise PredictOutputError(f"{out}: cannot create this folder because {blocker} is a file; "
                                 "choose another --out") from None
    except PermissionError:
        raise PredictOutputError(f"{out}: cannot create this folder: permission denied; choose a folder you can "
                                 "write to for --out") from None
    except OSError as e:
        raise PredictOutputError(f"{out}: cannot create this folder ({e.strerror}); choose another --out") from None
    return out


def _os_reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
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
    from tqdm import tqdm

    tqdm.write(f"error: {message}", file=sys.stderr)


def predict_files(segmenter: Segmenter, inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                  batch_size: int = 4, save_prob: str | None = None, overlay: bool = True, progress: bool = True,
                  on_error: Callable[[str], None] | None = _print_error,
                  coco: str | os.PathLike | None = None) -> PredictSummary:
    """Segment image files and write, under `out_dir`: masks/<rel>.png (0/255), overlays/<rel>.png
    (the polyp tinted and outlined, and its finding written in the corner that hides least of it: "no polyp
    found" or "polyp 11.3 %, certainty high"), with save_prob="png" probs/<rel>.png (8-bit, round(255 p)) or
    "npy" probs/<rel>.npy (float32), and predictions.csv (one row per input, written as the run goes; the
    finding in words, `resunetpp.inference.findings`). With `coco`, also that COCO instance file
    (`resunetpp.inference.coco`:
    one image entry per segmented input, one RLE annotation per predicted polyp), written at the end, after
    Ctrl-C or a full disk too, for what was done.

    A file that cannot be read or processed gets a row with its error and `on_error(message)`
    (the message starts with the path); every other file is still done. `time_ms` is that file's
    wall time: reading, its share of its batch's forward pass, post-processing and writing.
    """
    from resunetpp.progress import progress_bar

    if save_prob is not None and save_prob not in PROB_FORMATS:
        raise ValueError(f"save_prob must be one of {', '.join(PROB_FORMATS)} or None, got {save_prob!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = prepare_out_dir(out_dir)
    listing = collect_inputs(inputs)
    names = output_names(listing.files)
    rows: list[dict[str, Any]] = []
    csv_path = out / "predictions.csv"
    if csv_path.is_dir():
        raise PredictOutputError(f"{csv_path}: is a folder; remove it or choose another --out")
    report = on_error or (lambda _m: None)
    summary = PredictSummary(rows=rows, csv_path=csv_path, skipped=listing.skipped)
    try:
        fh = open(csv_path, "w", newline="")
    except OSError as e:
        raise PredictOutputError(f"{csv_path}: cannot write it ({_os_reason(e)}); choose a folder you can write "
                                 "to for --out") from None
    writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
    coco_writer = None
    if coco is not None:
        from resunetpp.inference.coco import CocoWriter

        coco_writer = CocoWriter()
        coco_root = (Path(os.path.commonpath([os.path.abspath(f.parent) for f in listing.files]))
                     if listing.files else Path("."))

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        try:
            writer.writerow(row)
        except OSError as e:
            raise PredictStopped(f"{csv_path}: cannot write the CSV ({_os_reason(e)})", summary) from None

    def fail(src: str, message: str, seconds: float = 0.0, quiet: bool = False) -> None:
        row = dict.fromkeys(CSV_COLUMNS, "")
        row.update(input=src, time_ms=f"{seconds * 1000:.1f}", error=message)
        record(row)
        if not quiet:
            report(message)

    batches = [list(range(i, min(i + batch_size, len(listing.files))))
               for i in range(0, len(listing.files), batch_size)]
    try:
        with fh, ThreadPoolExecutor(max_workers=2) as pool, \
                progress_bar(total=len(listing.files), unit="img", disable=not progress, desc="predict") as bar:
            writer.writeheader()
            for src, reason in listing.missing:
                fail(src, f"{src}: {reason}")

            def submit(b: list[int]) -> list[Future]:
                return [pool.submit(_timed_read, listing.files[i]) for i in b]

            pending = submit(batches[0]) if batches else []
            for k, batch in enumerate(batches):
                reads = [f.result() for f in pending]
                pending = submit(batches[k + 1]) if k + 1 < len(batches) else []  # read ahead while computing
                good = []
                for i, (image, err, secs) in zip(batch, reads):
                    if image is None:
                        fail(str(listing.files[i]), err, secs)
                    else:
                        good.append((i, image, secs))
                if good:
                    t0 = time.perf_counter()
                    results = _infer(segmenter, [g[1] for g in good])
                    share = (time.perf_counter() - t0) / len(good)
                    for (i, image, secs), (prob, err) in zip(good, results):
                        src = listing.files[i]
                        if prob is None:
                            fail(str(src), f"{src}: inference failed ({err})", secs)
                            continue
                        t1 = time.perf_counter()
                        written: list[Path] = []
                        try:
                            row = _write_outputs(segmenter, src, names[i], out, image, prob, save_prob, overlay,
                                                 written, coco_writer, coco_root if coco_writer else None)
                        except BaseException as e:
                            _remove(written)  # no mask left behind for a row the CSV marks as failed
                            if not isinstance(e, Exception):
                                raise
                            if isinstance(e, OSError) and e.errno in _DISK_FULL:  # said once, by the caller
                                message = f"{src}: not written: {_os_reason(e)} in {out}"
                                fail(str(src), message, secs, quiet=True)
                                raise PredictStopped(message, summary) from None
                            fail(str(src), f"{src}: not written: {_os_reason(e)}", secs)
                            continue
                        row["time_ms"] = f"{(secs + share + time.perf_counter() - t1) * 1000:.1f}"
                        record(row)
                try:
                    fh.flush()
                except OSError as e:
                    raise PredictStopped(f"{csv_path}: cannot write the CSV ({_os_reason(e)})", summary) from None
                bar.update(len(batch))
    except (PredictStopped, KeyboardInterrupt) as e:
        if coco_writer is not None:
            _write_coco(coco_writer, coco)
        summary.not_done = len(listing.files) - len({r["input"] for r in rows} & {str(f) for f in listing.files})
        if isinstance(e, PredictStopped):
            summary.stopped = "disk full"
            raise
        summary.stopped = "interrupted"
        raise PredictInterrupted(summary) from None
    if coco_writer is not None:
        _write_coco(coco_writer, coco)
    return summary


def _write_coco(writer, path: str | os.PathLike) -> None:
    try:
        writer.write(path)
    except OSError as e:
        raise PredictOutputError(f"{path}: cannot write the COCO file ({_os_reason(e)})") from None


def _infer(segmenter: Segmenter, images: list[np.ndarray]) -> list[tuple[np.ndarray | None, str]]:
    """(prob, "") or (None, error) per image. A failed batch is retried image by image, so an input
    that breaks the model (or a batch too big for the device) fails alone, not its batch-mates."""
    try:
        return [(p, "") for p in segmenter.probabilities(images)]
    except Exception as e:
        if len(images) == 1:
            return [(None, f"{type(e).__name__}: {e}")]
        return [r for im in images for r in _infer(segmenter, [im])]


def _write_outputs(segmenter: Segmenter, src: Path, name: Path, out: Path, image: np.ndarray, prob: np.ndarray,
                   save_prob: str | None, overlay: bool, written: list[Path], coco_writer=None,
                   coco_root: Path | None = None) -> dict[str, Any]:
    import io

    from resunetpp.inference.findings import describe
    from resunetpp.inference.overlay import draw_label, draw_overlay

    mask = segmenter.postprocess(image, prob)
    finding = describe(mask, prob)
    row = dict.fromkeys(CSV_COLUMNS, "")
    _write_png(out / "masks" / name, mask.astype(np.uint8) * 255, written)
    row["mask"] = str(Path("masks") / name)
    if overlay:
        view = draw_label(draw_overlay(image, mask), finding.short, mask)
        _write_png(out / "overlays" / name, cv2.cvtColor(view, cv2.COLOR_RGB2BGR), written)
        row["overlay"] = str(Path("overlays") / name)
    if save_prob == "png":
        _write_png(out / "probs" / name, np.round(prob * 255).astype(np.uint8), written)
        row["prob"] = str(Path("probs") / name)
    elif save_prob == "npy":
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
    if coco_writer is not None:  # last: only an image whose files were all written is listed
        coco_writer.add(Path(os.path.abspath(src)).relative_to(coco_root).as_posix(), mask, prob)
    return row
