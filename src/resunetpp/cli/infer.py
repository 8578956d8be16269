"""`resunetpp predict`, `resunetpp video` and `resunetpp export`: thin layers over
`resunetpp.inference.segmenter`, `resunetpp.inference.video` and `resunetpp.inference.export`.

Exit codes: the table in `resunetpp.cli.common` (0 ok, 1 partial failure, 2 usage error, 3 bad
input, 130 interrupted), as for every command.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

import resunetpp.inference.video
from resunetpp.cli.common import ExitCode, choices, errors, fail, number
from resunetpp.hub import bundled_weights
from resunetpp.inference.backends import BACKENDS, PRECISIONS
from resunetpp.inference.crf import CRF_MODES
from resunetpp.inference.export import CALIB_METHODS, EXPORTERS, export_onnx, quantize_int8
from resunetpp.inference.predict import (
    IMAGE_EXTENSIONS,
    PROB_FORMATS,
    PredictInterrupted,
    PredictStopped,
    predict_files,
)
from resunetpp.inference.segmenter import Segmenter
from resunetpp.progress import LogProgress

# choices generated from the library's own tuples, so the CLI can never offer what the library refuses
Backend = choices("Backend", BACKENDS)
Precision = choices("Precision", PRECISIONS)
CrfMode = choices("CrfMode", CRF_MODES)
ProbFormat = choices("ProbFormat", PROB_FORMATS)
Exporter = choices("Exporter", EXPORTERS)
CalibMethod = choices("CalibMethod", CALIB_METHODS)

WEIGHTS_HELP = ("Checkpoint folder (config.json + model.safetensors), .safetensors file, or .onnx model. "
                "Default: the bundled trained weights.")
DEVICE_HELP = "auto (cuda if available, else cpu) | cpu | cuda | cuda:N."
BACKEND_HELP = "Default: onnxruntime for .onnx weights, else torch. openvino (an .onnx file) needs the openvino extra."
MIN_AREA_HELP = ("Drop predicted components smaller than this fraction of the image (false-alarm specks); "
                 "0 keeps all. Default: the checkpoint's min_area (0.001 unless its config.json sets one).")
PRECISION_HELP = ("bf16: torch autocast or OpenVINO bf16 (fastest accurate CPU choice with --backend openvino); "
                  "onnxruntime runs the model file's own precision.")


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
    app.command("video")(video)
    app.command("export")(export)


def make_segmenter(weights, backend, device, tta, crf, crf_mode, threshold, threads, precision, min_area):
    """The `Segmenter` of predict, video and serve; a damaged model, a missing extra or a device this machine
    lacks is one `error:` line with the exit code of `common.exit_code` (3, 2 and 2)."""
    with errors():
        return Segmenter(weights, device=device, backend=backend.value if backend else None, tta=tta,
                         crf=crf_mode.value if crf else None, threshold=threshold, threads=threads,
                         precision=precision.value, min_area=min_area)


def predict(
    inputs: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) and glob patterns."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    weights: str | None = typer.Option(None, "--weights", "-w", help=WEIGHTS_HELP),
    backend: Backend | None = typer.Option(None, help=BACKEND_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    batch_size: int = typer.Option(4, "--batch-size", "-b", min=1, help="Images per forward pass."),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, callback=number(0, 1),
                                           help="Default: the checkpoint's config."),
    tta: bool = typer.Option(False, "--tta", help="Average identity, horizontal- and vertical-flip predictions."),
    crf: bool = typer.Option(False, "--crf",
                             help=r"Dense-CRF post-processing (needs the crf extra: pip install 'resunetpp\[crf]')."),
    crf_mode: CrfMode = typer.Option(CrfMode("mask"), help="mask: the ResUNet++ follow-up's settings; bilateral: "
                                     "soft probabilities + colour term."),
    min_area: float | None = typer.Option(None, min=0.0, max=0.99, callback=number(0, 0.99), help=MIN_AREA_HELP),
    save_prob: bool = typer.Option(False, "--save-prob", help="Also write the probability maps under probs/."),
    prob_format: ProbFormat = typer.Option(ProbFormat("png"), help="png: 8-bit, round(255 p); npy: float32."),
    overlay: bool = typer.Option(True, "--overlay/--no-overlay", help="Write overlays/ images."),
    threads: int | None = typer.Option(None, min=1, help="onnxruntime / OpenVINO threads."),
    precision: Precision = typer.Option(Precision("fp32"), help=PRECISION_HELP),
    coco: Path | None = typer.Option(None, "--coco", help="Also write the predicted polyps as COCO instance "
                                     "annotations (RLE masks, one image entry per input) to this JSON file: "
                                     "pre-annotations for labelling tools."),
) -> None:
    """Segment polyps in images: masks/, overlays/ (and probs/) under --out, plus predictions.csv.

    Masks (0/255 PNG) and overlays have each input's own size; folder structure is kept.
    Inputs that fail are named on stderr and in the CSV; the others are still done (exit code 1).
    Ctrl-C stops after the current image and prints what was written (exit code 130).
    """
    seg = make_segmenter(weights, backend, device, tta, crf, crf_mode, threshold, threads, precision, min_area)
    try:
        with errors():  # an --out that cannot be written: PredictOutputError, bad input
            summary = predict_files(seg, inputs, out, batch_size=batch_size,
                                    save_prob=prob_format.value if save_prob else None, overlay=overlay, coco=coco)
    except PredictStopped as e:
        typer.echo(f"error: {e}; stopped. Free some space (or choose another --out) and run again", err=True)
        typer.echo(e.summary.line(out))
        raise typer.Exit(ExitCode.PARTIAL) from None
    except PredictInterrupted as e:
        typer.echo(f"interrupted: {e.summary.line(out)}")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    if summary.skipped:
        LogProgress.write(f"note: skipped {len(summary.skipped)} file(s) without an image extension "
                          f"({', '.join(IMAGE_EXTENSIONS)}), e.g. {summary.skipped[0]}", file=sys.stderr)
    typer.echo(summary.line(out))
    if summary.failed or not summary.rows:
        raise typer.Exit(ExitCode.PARTIAL)


def video(
    source: str = typer.Argument(..., help="A video file, or a camera index such as 0."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .mp4 (overlay video)."),
    weights: str | None = typer.Option(None, "--weights", "-w", help=WEIGHTS_HELP),
    backend: Backend | None = typer.Option(None, help=BACKEND_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", min=1,
                                          help="Frames per forward pass. Default: 1 for cameras, 4 for files."),
    smooth: float = typer.Option(0.0, min=0.0, max=0.99, callback=number(0, 0.99),
                                 help="EMA weight of the previous frames' probabilities "
                                 "(0 = off); less flicker, more lag (0.5: +1 frame, 0.8: +3)."),
    max_frames: int | None = typer.Option(None, min=1, help="Stop after this many frames."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Per-frame CSV. Default: OUT with .csv."),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, callback=number(0, 1),
                                           help="Default: the checkpoint's config."),
    tta: bool = typer.Option(False, "--tta", help="Flip test-time augmentation (3x the compute)."),
    min_area: float | None = typer.Option(None, min=0.0, max=0.99, callback=number(0, 0.99), help=MIN_AREA_HELP),
    threads: int | None = typer.Option(None, min=1, help="onnxruntime / OpenVINO threads."),
    precision: Precision = typer.Option(Precision("fp32"), help=PRECISION_HELP),
    readout: bool = typer.Option(True, "--readout/--no-readout", help="Draw fps and latency in the corner."),
) -> None:
    """Segment a video or camera stream into an overlay video with an fps/latency readout and a per-frame CSV.

    Ctrl-C stops cleanly: the video written so far stays valid.
    """
    seg = make_segmenter(weights, backend, device, tta, False, CrfMode("mask"), threshold, threads, precision,
                     min_area)
    with errors(plain=ExitCode.BAD_INPUT):  # a source OpenCV cannot open is bad input
        # called through its module: tests replace resunetpp.inference.video.process_video
        stats = resunetpp.inference.video.process_video(seg, source, out, csv_path=csv_path, batch_size=batch_size,
                                                        smooth=smooth, max_frames=max_frames, readout=readout)
    stop = "interrupted" if stats.interrupted else "done"
    typer.echo(f"{stop}: {stats.frames} frames {stats.size[0]}x{stats.size[1]} at {stats.source_fps:g} fps -> "
               f"{stats.out_path}; processing {stats.processing_fps:.1f} frames/s, mean latency "
               f"{stats.mean_latency_ms:.0f} ms; per-frame CSV {stats.csv_path}; codec {stats.codec}")
    if stats.notice:
        typer.echo(f"note: {stats.notice}", err=True)
    if stats.interrupted:
        raise typer.Exit(ExitCode.INTERRUPTED)


def export(
    out: Path = typer.Option(..., "--out", "-o", help="Output .onnx file."),
    weights: str | None = typer.Option(None, "--weights", "-w",
                                       help="Checkpoint folder or .safetensors. Default: the bundled weights."),
    fmt: str = typer.Option("onnx", "--format", help="Export format (only onnx)."),
    opset: int = typer.Option(18, min=17, help="ONNX opset (the dynamo exporter needs >= 18); one the exporter "
                              "cannot emit is refused, never replaced by another."),
    exporter: Exporter = typer.Option(Exporter("dynamo"), help="torch.onnx exporter: dynamo (torch.export) or legacy "
                                      "(TorchScript)."),
    int8: bool = typer.Option(False, "--int8", help="Static int8 quantisation (QDQ, per-channel); --out is then the "
                              "int8 model and the fp32 one is kept as OUT-fp32.onnx."),
    calib: Path | None = typer.Option(None, help="Folder of training images for int8 calibration."),
    calib_count: int = typer.Option(64, min=1, help="Calibration images (spread over the folder)."),
    calib_method: CalibMethod = typer.Option(CalibMethod("minmax"), help="Calibration method."),
) -> None:
    """Export to ONNX (dynamic batch/height/width), check parity with PyTorch, optionally quantise to int8."""
    if fmt != "onnx":
        raise fail(f"unsupported --format {fmt!r}: only onnx", ExitCode.USAGE)
    if out.suffix != ".onnx":  # checked here too: with --int8 only the fp32 sibling reaches export_onnx
        raise fail(f"{out}: the output file name must end in .onnx", ExitCode.USAGE)
    if int8 and calib is None:
        raise fail("--int8 needs --calib DIR: a folder of training images to calibrate on", ExitCode.USAGE)
    if calib is not None and not calib.exists():
        raise fail(f"{calib}: calibration folder not found", ExitCode.BAD_INPUT)
    with errors():  # a damaged model 3, an opset the exporter cannot emit 2, a failed parity check 1
        src = weights if weights is not None else bundled_weights()
        fp32 = out.with_name(f"{out.stem}-fp32.onnx") if int8 else out
        report = export_onnx(src, fp32, opset=opset, exporter=exporter.value)
    typer.echo(f"exported {report.path} ({report.exporter} exporter, opset {report.opset}); parity vs PyTorch on "
               f"{', '.join('x'.join(map(str, s)) for s in report.checked_shapes)}: max |logit diff| "
               f"{report.max_abs_diff:.2e} (limit 1e-4)")
    if report.config_path:
        typer.echo(f"wrote {report.config_path}")
    if int8:
        try:
            with errors(plain=ExitCode.BAD_INPUT):
                quantize_int8(fp32, out, calib, count=calib_count, method=calib_method.value)
        except typer.Exit:
            raise
        except Exception as e:  # onnxruntime's quantiser raises bare Exceptions
            raise fail(f"int8 quantisation of {fp32} failed: {type(e).__name__}: {e}", ExitCode.PARTIAL) from None
        typer.echo(f"int8 model {out} (calibrated on up to {calib_count} images from {calib}, {calib_method.value})")
