"""`resunetpp serve`: a thin layer over `resunetpp.serve.create_app` and uvicorn.

Exit codes: 0 after a clean stop (Ctrl-C); otherwise the table of `resunetpp.cli.common`, as for every
command: 3 for no or unusable weights, 2 for a bad option, a missing optional package or a non-local
address without a token.
"""

from __future__ import annotations

import ipaddress
import os
from types import ModuleType

import typer

from resunetpp.cli.common import ExitCode, errors, fail, number
from resunetpp.cli.infer import BACKEND_HELP, MIN_AREA_HELP, PRECISION_HELP, Backend, Precision, make_segmenter

TOKEN_ENV = "RESUNETPP_TOKEN"  # the same name as resunetpp.serve.TOKEN_ENV (not imported: fastapi is optional)


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the CLI."""
    app.command("serve")(serve)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 in brackets or not) is this machine only."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    weights: str | None = typer.Option(None, "--weights", "-w", help="Checkpoint folder (config.json + "
                                       "model.safetensors), .safetensors file, or .onnx model. Default: the bundled "
                                       "trained weights."),
    host: str = typer.Option("127.0.0.1", help="Address to bind. Anything but a loopback address needs a token."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    backend: Backend | None = typer.Option(None, help=BACKEND_HELP),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
    precision: Precision = typer.Option(Precision("fp32"), help=PRECISION_HELP),
    threads: int | None = typer.Option(None, min=1, help="onnxruntime / OpenVINO threads."),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, callback=number(0, 1),
                                           help="Default: the checkpoint's config."),
    tta: bool = typer.Option(False, "--tta", help="Flip test-time augmentation (3x the compute)."),
    min_area: float | None = typer.Option(None, min=0.0, max=0.99, callback=number(0, 0.99), help=MIN_AREA_HELP),
    token: str | None = typer.Option(None, envvar=TOKEN_ENV, show_envvar=True,
                                     help="Require 'Authorization: Bearer TOKEN' on the API. Required when --host "
                                     "is not a loopback address."),
    max_bytes: int = typer.Option(32 * 1024 * 1024, min=1, help="Largest request body (bytes)."),
    max_pixels: int = typer.Option(25_000_000, min=1, help="Largest image (pixels), checked before decoding."),
    queue_size: int = typer.Option(64, min=1, help="Requests inside the server at once (a memory bound); one more "
                                   "gets 503."),
    max_queue_s: float = typer.Option(30.0, "--max-queue-s", callback=number(0, above=True),
                                      help="Admission: a request expected to wait longer than this many seconds for "
                                      "the model (images waiting x recent time per image) gets 503 + Retry-After."),
    infer_batch: int | None = typer.Option(None, "--infer-batch", min=1, help="Images per forward pass: concurrent "
                                           "requests are batched up to this (default: 8 on a GPU, 1 on a CPU)."),
    infer_workers: int | None = typer.Option(None, "--infer-workers", min=1, help="Forward passes at once (default: "
                                             "up to 4 on a CPU with the torch backend, else 1). On a CPU with torch "
                                             "they share the cores by the load: a lone request gets them all."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", callback=number(0, 10_000),
                                        help="Once the model is free, wait at most this long for more images."),
    max_batch: int = typer.Option(16, min=1, help="Images per /v1/segment/batch request."),
    max_streams: int = typer.Option(4, min=1, help="Concurrent WebSocket streams."),
    stream_idle_s: float = typer.Option(60.0, "--stream-idle-s", callback=number(0, above=True),
                                        help="Close a WebSocket stream silent for this many seconds (frees its slot)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the browser page (/) and the HTTP API (/v1/..., OpenAPI at /docs) for polyp segmentation.

    Research use only: not a medical device.
    """
    uvicorn, serving = _serve_extra()
    _check_host(host, token)
    seg = make_segmenter(weights, backend, device, tta, False, None, threshold, threads, precision, min_area)
    with errors():
        settings = serving.ServeSettings(
            max_bytes=max_bytes, max_pixels=max_pixels, queue_size=queue_size, max_queue_s=max_queue_s,
            infer_batch=infer_batch, infer_workers=infer_workers, batch_wait_ms=batch_wait_ms, max_batch=max_batch,
            max_streams=max_streams, stream_idle_s=stream_idle_s, token=token or None)
    app = serving.create_app(seg, settings)
    ws = serving.websocket_library()
    if ws == "none":
        typer.echo("warning: neither websockets nor wsproto is installed, so /v1/stream (video and webcam on the "
                   "page) is off: pip install websockets", err=True)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"resunetpp serve: {seg!r}\n  page http://{shown}:{port}/  API docs http://{shown}:{port}/docs"
               f"{'  (token required)' if settings.token else ''}\n  research use only, not a medical device")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    uvicorn.run(app, host=host, port=port, log_level=log_level, ws=ws)


def _serve_extra() -> tuple[ModuleType, ModuleType]:
    """uvicorn and `resunetpp.serve`, imported here only: they need the optional `serve` extra."""
    try:
        import uvicorn

        import resunetpp.serve as serving
    except ImportError as e:
        raise fail(f"the serve command needs the optional packages fastapi, uvicorn and python-multipart "
                   f"({e}): pip install \"resunetpp[serve]\"", ExitCode.USAGE) from None
    return uvicorn, serving


def _check_host(host: str, token: str | None) -> None:
    """Warn about a non-loopback address, and refuse it without a token."""
    if is_loopback(host):
        return
    typer.echo(f"warning: binding to {host} makes the API reachable from other machines; requests must carry "
               "the token, and traffic is not encrypted (put a TLS proxy in front).", err=True)
    if not token:
        raise fail(f"--host {host} is not a loopback address, so a token is required: pass --token or set "
                   f"{TOKEN_ENV}, e.g. {TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe())')",
                   ExitCode.USAGE)
