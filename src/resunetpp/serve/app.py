"""`create_app(segmenter)`: the FastAPI app behind `resunetpp serve` (HTTP API, WebSocket stream, page).

Every prediction goes through the library's `Segmenter.probabilities` and `Segmenter.postprocess`
(there is no second inference path); this module only decodes requests, queues them and formats
the answers.

Design
------
* Requests are decoded in memory (`decode.decode_image`); nothing is written to disk. Multipart
  bodies are parsed in memory too (python-multipart's streaming parser, not Starlette's spooled
  temporary files). The body size is capped while it streams in (`max_bytes`).
* Dynamic batching: images of concurrent requests (and stream frames) are gathered into one forward
  pass (`Batcher`): up to `infer_batch` images, waiting at most `batch_wait_ms` for more once the model
  is free. The model runs on one worker thread (its own intra-op threads use the cores); decoding and
  encoding run on a second small pool, so they overlap with the model. Each answer reports its time
  in the queue (`timing_ms.queue`, `X-Queue-Ms`) and how many images shared its forward pass.
* Admission by expected waiting time: a request is refused with 503 and `Retry-After` when the
  images already waiting, at the recent model time per image, would keep it queued longer than
  `max_queue_s`; `queue_size` is only a memory bound on requests inside the server at once.
* `WS /v1/stream`: the client sends encoded frames (binary messages); a client silent for longer than
  `stream_idle_s` is sent `{"error": "idle_timeout"}` and closed, so idle clients cannot hold the
  `max_streams` slots. A receiver task always keeps only the newest unprocessed frame, so when the
  model is slower than the camera stale frames are dropped (each answer's `dropped` counts the frames
  skipped so far on this stream) and the answer is always for the newest frame. Frames are numbered
  from 1 in the order they arrive (`frame`).
* Errors are JSON `{"error": code, "message": text, "status": http}`; bad input gets a 4xx naming
  the problem (codes: empty, not_an_image, truncated, corrupt_image, too_many_pixels, body_too_large,
  unsupported_media_type, bad_multipart, no_image, too_many_images, missing_token, invalid_token,
  invalid_parameter, busy; on the stream also idle_timeout).
* With a token set, every `/v1/*` route but `/v1/health` needs `Authorization: Bearer <token>`
  (compared with `hmac.compare_digest`); the WebSocket also accepts `?token=` (browsers cannot set
  headers on a WebSocket). The page and its files are public; they hold no data.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hmac
import json
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.websockets import WebSocketDisconnect

from resunetpp.inference.findings import describe, threshold_levels
from resunetpp.inference.overlay import draw_overlay
from resunetpp.inference.segmenter import Segmenter
from resunetpp.serve.decode import ApiError, decode_image
from resunetpp.version import __version__

STATIC_DIR = Path(__file__).parent / "static"
DISCLAIMER = "Research use only. Not a medical device: not for diagnosis or treatment decisions."
MAX_COMPONENTS = 100  # components listed per image (largest first); `components_total` counts all
TOKEN_ENV = "RESUNETPP_TOKEN"


@dataclass
class ServeSettings:
    """Limits and access of one server. All sizes in bytes / pixels."""

    max_bytes: int = 32 * 1024 * 1024  # request body (one image, a batch, or one stream frame)
    max_pixels: int = 25_000_000  # per image, read from the header before decoding
    queue_size: int = 64  # requests inside the server at once (a memory bound); one more gets 503
    max_queue_s: float = 30.0  # a request expected to wait longer than this for the model gets 503
    # images per forward pass (concurrent requests are batched up to this); None: 8 on a GPU, 1 on a CPU, where
    # batching measured slower per image (20 clients on 2 cores: 2.97 requests/s at 8, 5.74 at 1; RESULTS.md)
    infer_batch: int | None = None
    infer_workers: int = 1  # forward passes at once (each on its own thread; `resunetpp serve` gives each a core)
    batch_wait_ms: float = 5.0  # once the model is free, wait at most this long for more images to batch
    max_batch: int = 16  # images per /v1/segment/batch request
    max_streams: int = 4  # concurrent WebSocket streams
    stream_idle_s: float = 60.0  # a stream silent this long is closed (frees its max_streams slot)
    token: str | None = None  # required as a Bearer token when set

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "queue_size", "infer_batch", "infer_workers", "max_batch",
                     "max_streams"):
            value = getattr(self, name)
            if name == "infer_batch" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_queue_s", "stream_idle_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.batch_wait_ms, (int, float)) or not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"batch_wait_ms must lie in [0, 10000], got {self.batch_wait_ms!r}")


@dataclass
class _Stats:
    started: float = field(default_factory=time.time)
    requests: int = 0
    busy_rejections: int = 0
    streams: int = 0
    frames_received: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    streams_idle_closed: int = 0


class Gate:
    """Admission: a counter of requests in the server (at most `capacity`) and the expected wait for the
    model (`expected_wait_s`: images waiting times the recent model seconds per image, at most
    `max_wait_s`). `slot()` raises 503 (with Retry-After) when either is exceeded."""

    def __init__(self, capacity: int, max_wait_s: float = math.inf, workers: int = 1):
        if capacity < 1:
            raise ValueError(f"queue_size must be >= 1, got {capacity}")
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self.workers = workers  # forward passes running at once: the queue drains that much faster
        self.pending = 0
        self.images_waiting = 0  # submitted to the model, not yet answered (the Batcher counts them)
        self.s_per_image: float | None = None  # running mean of model seconds per image, None until measured
        self.mean_s = 0.25  # running mean seconds per request, for Retry-After
        self._lock = threading.Lock()
        self.refusal = ""

    def expected_wait_s(self, extra: int = 1) -> float:
        """Seconds a new request of `extra` images would wait for the model, from the recent batches."""
        if self.s_per_image is None:
            return 0.0
        return (max(self.images_waiting, self.pending) + extra) * self.s_per_image / self.workers

    def observe_batch(self, images: int, seconds: float) -> None:
        per = seconds / max(1, images)
        with self._lock:
            self.s_per_image = per if self.s_per_image is None else 0.7 * self.s_per_image + 0.3 * per

    def try_enter(self, force: bool = False) -> bool:
        with self._lock:
            if not force:
                if self.pending >= self.capacity:
                    self.refusal = "full"
                    return False
                if self.expected_wait_s() > self.max_wait_s:
                    self.refusal = "wait"
                    return False
            self.pending += 1
            return True

    def leave(self, seconds: float) -> None:
        with self._lock:
            self.pending -= 1
            self.mean_s = 0.8 * self.mean_s + 0.2 * seconds

    def retry_after(self) -> int:
        if self.refusal == "wait":
            return max(1, math.ceil(self.expected_wait_s() - self.max_wait_s))
        return max(1, int(np.ceil(self.mean_s * max(1, self.pending))))

    @contextlib.contextmanager
    def slot(self, force: bool = False):
        if not self.try_enter(force):
            seconds = self.retry_after()
            if self.refusal == "wait":
                why = (f"server busy: a new request would wait about {self.expected_wait_s():.1f} s for the model, "
                       f"over the limit of {self.max_wait_s:g} s")
            else:
                why = f"server busy: {self.pending} request(s) in progress, queue size {self.capacity}"
            raise ApiError(503, "busy", f"{why}; retry after {seconds} s", headers={"Retry-After": str(seconds)})
        t = time.perf_counter()
        try:
            yield
        finally:
            self.leave(time.perf_counter() - t)


@dataclass
class Batched:
    """What the model gave one submission: its probabilities, and how it was run."""

    probs: list[np.ndarray]
    queue_ms: float  # from submission to the start of its forward pass
    infer_ms: float  # the forward pass (shared with the others of its batch)
    batch_images: int  # images in that forward pass


class Batcher:
    """Dynamic batching: the images of concurrent submissions go through `run_model` (a list of images ->
    a list of probability maps) together, up to `max_images` per pass. When the model frees up, whatever
    is waiting is taken at once; if that is fewer than `max_images`, it waits at most `max_wait_s` for more.
    A submission is never split (a /v1/segment/batch request larger than `max_images` runs alone). The
    model runs on `pool`, `workers` batches at once (the pool needs that many threads); `gate` is told the
    images waiting and the model time per image."""

    def __init__(self, run_model: Callable[[list[np.ndarray]], list[np.ndarray]], pool: ThreadPoolExecutor,
                 gate: Gate, max_images: int = 8, max_wait_s: float = 0.005,
                 clock: Callable[[], float] = time.perf_counter, workers: int = 1):
        self.run_model, self.pool, self.gate = run_model, pool, gate
        self.max_images, self.max_wait_s, self.clock = max_images, max_wait_s, clock
        self.workers = workers
        self.batches = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and not any(w.done() for w in self._tasks):
            return
        self._loop = loop  # a new event loop (a test client without lifespan): start afresh on it
        self._items: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._tasks = [loop.create_task(self._work()) for _ in range(self.workers)]

    async def submit(self, images: list[np.ndarray]) -> Batched:
        self._start()
        future = self._loop.create_future()
        self._items.append((images, future, self.clock()))
        self.gate.images_waiting += len(images)
        self._wake.set()
        return await future

    def _take(self, batch: list, n: int) -> int:
        while self._items and n + len(self._items[0][0]) <= self.max_images:
            item = self._items.popleft()
            batch.append(item)
            n += len(item[0])
        return n

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._items:
                first = self._items.popleft()
                batch = [first]
                n = self._take(batch, len(first[0]))
                deadline = self.clock() + self.max_wait_s
                while n < self.max_images and self.max_wait_s > 0 and (left := deadline - self.clock()) > 0:
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), left)
                    before = n
                    n = self._take(batch, n)
                    if n == before and self._items:  # the next one does not fit: run what we have
                        break
                await self._run(batch, n)

    async def _run(self, batch: list, n: int) -> None:
        images = [im for item in batch for im in item[0]]
        started = self.clock()

        def job():
            t0 = time.perf_counter()
            probs = self.run_model(images)
            return probs, time.perf_counter() - t0

        try:
            probs, seconds = await self._loop.run_in_executor(self.pool, job)
        except Exception as e:  # every request of the batch gets the error (a JSON 500); the server goes on
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(e)
            return
        finally:
            self.gate.images_waiting -= n
        self.batches += 1
        self.gate.observe_batch(n, seconds)
        i = 0
        for item_images, future, submitted in batch:
            k = len(item_images)
            if not future.done():  # a client gone meanwhile cancelled its future
                future.set_result(Batched(probs[i:i + k], (started - submitted) * 1000, seconds * 1000, n))
            i += k

    def close(self) -> None:
        for worker in getattr(self, "_tasks", ()):
            if not worker.done():
                with contextlib.suppress(RuntimeError):  # its loop already closed
                    worker.get_loop().call_soon_threadsafe(worker.cancel)


# ----------------------------------------------------------------------------------------------
# Requests: body, multipart, token
# ----------------------------------------------------------------------------------------------

@dataclass
class Upload:
    name: str  # "body" for a raw body, else the file name or the form field
    content_type: str
    data: bytes


RAW_TYPES = ("image/", "application/octet-stream")


def _media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def _is_image_type(media: str) -> bool:
    return not media or media.startswith(RAW_TYPES)


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, "body_too_large", f"request body of {int(length):,} bytes is over the limit of "
                       f"{limit:,} bytes (the server's --max-bytes)")
    chunks, n = [], 0
    try:
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise ApiError(413, "body_too_large", f"request body is over the limit of {limit:,} bytes "
                               "(the server's --max-bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client closed the connection before the body ended") from None
    return b"".join(chunks)


def parse_multipart(body: bytes, content_type: str) -> list[Upload]:
    """The file parts of a multipart/form-data body, parsed in memory."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary parameter")
    parts: list[Upload] = []
    cur: dict[str, Any] = {}
    name_buf: list[bytes] = []
    value_buf: list[bytes] = []

    def on_part_begin():
        cur.clear()
        cur.update(headers={}, data=[])

    def on_header_field(d, s, e):
        name_buf.append(d[s:e])

    def on_header_value(d, s, e):
        value_buf.append(d[s:e])

    def on_header_end():
        cur["headers"][b"".join(name_buf).strip().lower()] = b"".join(value_buf).strip()
        name_buf.clear()
        value_buf.clear()

    def on_part_data(d, s, e):
        cur["data"].append(d[s:e])

    def on_part_end():
        _, opts = parse_options_header(cur["headers"].get(b"content-disposition", b""))
        field_name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts.get(b"filename")
        media = _media_type(cur["headers"].get(b"content-type", b"").decode("latin-1"))
        if filename is None and field_name not in ("file", "files", "image", "images") \
                and not media.startswith("image/"):
            return  # an ordinary form field
        label = filename.decode("utf-8", "replace") if filename else field_name or "file"
        parts.append(Upload(name=label, content_type=media, data=b"".join(cur["data"])))

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as e:
        raise ApiError(400, "bad_multipart", f"malformed multipart/form-data body ({type(e).__name__}: {e})") from None
    return parts


async def read_uploads(request: Request, settings: ServeSettings) -> list[Upload]:
    """The images of a request: the file parts of a multipart body, or the raw body (image/*)."""
    media = _media_type(request.headers.get("content-type"))
    if media.startswith("multipart/"):
        if media != "multipart/form-data":
            raise ApiError(415, "unsupported_media_type", f"Content-Type {media}: use multipart/form-data")
        body = await _read_body(request, settings.max_bytes)
        return parse_multipart(body, request.headers["content-type"])
    if not _is_image_type(media):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {media} is not an image: send the file as the body with Content-Type "
                       "image/jpeg, image/png, ... (or application/octet-stream), or as multipart/form-data")
    return [Upload(name="body", content_type=media, data=await _read_body(request, settings.max_bytes))]


def check_token(settings: ServeSettings, authorization: str | None, query_token: str | None = None) -> None:
    if not settings.token:
        return
    supplied = None
    if authorization and authorization[:7].lower() == "bearer ":
        supplied = authorization[7:].strip()
    elif query_token:
        supplied = query_token
    headers = {"WWW-Authenticate": "Bearer"}
    if not supplied:
        raise ApiError(401, "missing_token", "this server requires a token: send the header "
                       "'Authorization: Bearer <token>'", headers)
    if not hmac.compare_digest(supplied.encode("utf-8"), settings.token.encode("utf-8")):
        raise ApiError(401, "invalid_token", "the token does not match this server's token", headers)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

def encode_png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return buf.tobytes()


def encode_prob16(prob: np.ndarray) -> bytes:
    """The probability map as an RGB PNG with 16 bits: p = (256 R + G) / 65535, B = 0.
    (Browsers read 8 bits per channel from a canvas, so a 16-bit grey PNG would lose precision.)"""
    p16 = np.round(np.clip(prob, 0, 1) * 65535).astype(np.uint16)
    bgr = np.stack([np.zeros_like(p16, np.uint8), (p16 & 255).astype(np.uint8), (p16 >> 8).astype(np.uint8)], -1)
    return encode_png(bgr)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def components(mask: np.ndarray, prob: np.ndarray, polygons: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Connected components (8-connectivity) of the mask, largest first: box [x0, y0, x1, y1] (x1/y1
    exclusive), area in pixels and as a fraction, confidence = mean probability inside, and with
    `polygons` the outer contour [[x, y], ...] in image pixels."""
    m = mask.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return [], 0
    sums = np.bincount(labels.ravel(), weights=prob.ravel().astype(np.float64), minlength=n)
    order = sorted(range(1, n), key=lambda i: -int(stats[i, cv2.CC_STAT_AREA]))
    total = mask.size
    out = []
    for i in order[:MAX_COMPONENTS]:
        x, y, w, h, area = (int(v) for v in stats[i])
        comp: dict[str, Any] = {"box": [x, y, x + w, y + h], "area": area, "area_fraction": round(area / total, 6),
                                "confidence": round(float(sums[i] / area), 4)}
        if polygons:
            sub = (labels[y:y + h, x:x + w] == i).astype(np.uint8)
            contours, _ = cv2.findContours(sub, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            c = max(contours, key=cv2.contourArea)
            c = cv2.approxPolyDP(c, 1.0, True) if len(c) > 8 else c
            comp["polygon"] = [[int(px) + x, int(py) + y] for px, py in c[:, 0, :]]
        out.append(comp)
    return out, n - 1


def analyse(mask: np.ndarray, prob: np.ndarray, polygons: bool = False) -> dict[str, Any]:
    comps, total = components(mask, prob, polygons)
    finding = describe(mask, prob)  # polyp / no polyp, certainty and the readout, as every front end says them
    return {
        "polyp": bool(total),
        "area_fraction": round(float(mask.mean()), 6),
        "confidence": finding.confidence,
        "certainty": finding.certainty,
        "finding": finding.text,
        "max_probability": round(float(prob.max()), 4),
        "components": comps,
        "components_total": total,
    }


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------

IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary", "description": "the image file"}}, "required": ["file"]}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
BATCH_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}, "required": ["files"]}}},
}
ERROR_DOC = {"description": "a JSON error naming the problem", "content": {"application/json": {"example": {
    "error": "not_an_image", "message": "body: not an image ...", "status": 400}}}}


def _model_card(seg: Segmenter, settings: ServeSettings) -> dict[str, Any]:
    cfg = seg.config
    params = None
    model = getattr(getattr(seg, "_run", None), "model", None)
    if model is not None:
        params = sum(p.numel() for p in model.parameters())
    card_text = None
    if seg.weights is not None:
        folder = seg.weights if Path(seg.weights).is_dir() else Path(seg.weights).parent
        for name in ("MODEL_CARD.md", "README.md"):
            if (folder / name).is_file():
                card_text = (folder / name).read_text(errors="replace")[:20000]
                break
    return {
        "model": cfg.get("model"),
        "model_kwargs": cfg.get("model_kwargs", {}),
        "parameters": params,
        "weights": Path(seg.weights).name if seg.weights else None,
        "backend": seg.backend,
        "precision": seg.precision,
        "input_size": list(seg.input_size),
        "threshold": seg.threshold,
        "normalization": {"mean": seg.mean, "std": seg.std},
        "tta": seg.tta,
        "crf": seg.crf,
        "min_area": seg.min_area,
        "dataset": cfg.get("dataset"),
        "split": cfg.get("split") if isinstance(cfg.get("split"), (str, type(None))) else "custom",
        "metrics": cfg.get("metrics"),
        "trained_with_version": cfg.get("version"),
        "server_version": __version__,
        "intended_use": DISCLAIMER,
        "card": card_text,
        "limits": asdict(settings) | {"token": None},
    }


def share_cores(seg: Segmenter, workers: int) -> None:
    """With the torch backend and several inference workers, give each cores / workers threads, so no thread
    waits at a barrier for one that another worker paused. Process-wide, so `resunetpp serve` calls it, not
    `create_app` (tests build many apps in one process)."""
    if seg.backend == "torch" and workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def create_app(segmenter: Segmenter | str | Path, settings: ServeSettings | None = None,
               clock: Callable[[], float] = time.monotonic, idle_poll_s: float = 1.0) -> FastAPI:
    """The FastAPI app serving `segmenter` (a `Segmenter`, or weights to build one with defaults).
    `clock` (seconds) judges a stream's idleness, checked every `idle_poll_s`; tests inject both."""
    seg = segmenter if isinstance(segmenter, Segmenter) else Segmenter(segmenter)
    settings = settings or ServeSettings()
    if settings.infer_batch is None:
        on_gpu = getattr(getattr(seg, "_run", None), "device", torch.device("cpu")).type == "cuda"
        settings = replace(settings, infer_batch=8 if on_gpu else 1)
    gate = Gate(settings.queue_size, settings.max_queue_s, settings.infer_workers)
    stats = _Stats()
    infer_pool = ThreadPoolExecutor(max_workers=settings.infer_workers, thread_name_prefix="resunetpp-infer")
    work_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="resunetpp-io")
    batcher = Batcher(lambda images: seg.probabilities(images), infer_pool, gate, settings.infer_batch,
                      settings.batch_wait_ms / 1000, workers=settings.infer_workers)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()
        infer_pool.shutdown(wait=False, cancel_futures=True)
        work_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="resunetpp", version=__version__, lifespan=lifespan,
                  description="ResUNet++ polyp segmentation over HTTP. " + DISCLAIMER)
    app.state.segmenter, app.state.settings, app.state.gate, app.state.stats = seg, settings, gate, stats
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": "invalid_parameter", "message": problems, "status": 422}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "message": str(exc.detail), "status": exc.status_code},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_request, exc: Exception):  # a bug, not bad input: still a JSON answer
        return JSONResponse({"error": "internal_error", "message": f"{type(exc).__name__}: {exc}", "status": 500},
                            status_code=500)

    async def run(pool, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def probabilities(images: list[np.ndarray]) -> Batched:
        return await batcher.submit(images)  # batched with the other requests' images (`Batcher`)

    def mask_of(image: np.ndarray, prob: np.ndarray, threshold: float | None) -> np.ndarray:
        return seg.postprocess(image, prob, threshold)

    def decode(upload: Upload) -> np.ndarray:
        what = "body" if upload.name == "body" else f"file {upload.name!r}"
        if upload.content_type and not _is_image_type(upload.content_type):
            raise ApiError(415, "unsupported_media_type", f"{what}: Content-Type {upload.content_type} is not an image")
        if len(upload.data) > settings.max_bytes:
            raise ApiError(413, "body_too_large", f"{what}: {len(upload.data):,} bytes, over the limit of "
                           f"{settings.max_bytes:,}")
        return decode_image(upload.data, what, settings.max_pixels)

    def model_brief() -> dict[str, Any]:
        return {"name": seg.config.get("model"), "weights": Path(seg.weights).name if seg.weights else None,
                "backend": seg.backend, "precision": seg.precision, "input_size": list(seg.input_size)}

    def result_json(image, prob, threshold, polygons, want_prob, want_levels=False) -> dict[str, Any]:
        mask = mask_of(image, prob, threshold)
        out = {"width": int(image.shape[1]), "height": int(image.shape[0]), "model": model_brief(),
               "threshold": seg.threshold if threshold is None else threshold, **analyse(mask, prob, polygons),
               "mask_png": b64(encode_png(mask.astype(np.uint8) * 255))}
        if want_prob:
            out["prob_png"] = b64(encode_prob16(prob))
        if want_levels and seg.crf is None:  # the page's exact post-processing at every slider threshold
            out["levels_png"], out["min_area"] = b64(encode_png(threshold_levels(prob))), seg.min_area
        return out

    def result_png(image, prob, threshold, output, opacity) -> tuple[bytes, dict[str, str]]:
        mask = mask_of(image, prob, threshold)
        if output == "overlay":
            data = encode_png(cv2.cvtColor(draw_overlay(image, mask, alpha=opacity), cv2.COLOR_RGB2BGR))
        elif output == "prob":
            data = encode_png(np.round(prob * 255).astype(np.uint8))
        else:
            data = encode_png(mask.astype(np.uint8) * 255)
        return data, {"X-Polyp": str(int(mask.any())), "X-Area-Fraction": f"{mask.mean():.6f}",
                      "X-Threshold": str(seg.threshold if threshold is None else threshold)}

    # -- the page --
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                                       "connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # -- the API --
    @app.get("/v1/health", tags=["service"])
    async def health():
        """Liveness and load; no token needed."""
        return {"status": "ok", "version": __version__, "auth_required": bool(settings.token),
                "queue": {"pending": gate.pending, "capacity": gate.capacity},
                "batching": {"images_waiting": gate.images_waiting,
                             "expected_wait_s": round(gate.expected_wait_s(), 2), "max_queue_s": settings.max_queue_s,
                             "infer_batch": settings.infer_batch, "batches": batcher.batches,
                             "model_ms_per_image": None if gate.s_per_image is None else
                             round(gate.s_per_image * 1000, 1)},
                "streams": stats.streams, "uptime_s": round(time.time() - stats.started, 1)}

    @app.get("/v1/model", tags=["service"], responses={401: ERROR_DOC})
    async def model(request: Request):
        """The model card: architecture, weights, input size, threshold, preprocessing, metrics, limits."""
        check_token(settings, request.headers.get("authorization"))
        return _model_card(seg, settings)

    @app.post("/v1/segment", tags=["segment"], openapi_extra={"requestBody": IMAGE_BODY},
              responses={200: {"content": {"image/png": {}}}, 400: ERROR_DOC, 401: ERROR_DOC, 413: ERROR_DOC,
                         415: ERROR_DOC, 503: ERROR_DOC})
    async def segment(
        request: Request,
        format: Literal["json", "png"] = Query("json", description="json: the analysis; png: one image"),
        output: Literal["mask", "overlay", "prob"] = Query(
            "mask", description="with format=png: the 0/255 mask, the overlay, or the 8-bit probability map"),
        threshold: float | None = Query(None, ge=0.0, le=1.0, description="default: the model's"),
        polygons: bool = Query(False, description="add each component's outline polygon"),
        prob: bool = Query(False, description="add prob_png: the probability map, 16-bit in R (high) and G (low)"),
        levels: bool = Query(False, description="add levels_png (L: prob > i/100 exactly where L > i) and min_area, "
                             "for redrawing the post-processed mask at any threshold 0.00-1.00 (not with a CRF)"),
        opacity: float = Query(0.35, ge=0.0, le=1.0, description="overlay tint weight (format=png&output=overlay)"),
    ):
        """Segment one image, sent as multipart/form-data (one file) or as the raw body (Content-Type image/*).

        JSON: width, height, model, threshold, polyp, area_fraction, confidence (mean probability inside the
        mask), max_probability, components [{box [x0, y0, x1, y1], area, area_fraction, confidence,
        polygon?}], mask_png (base64 PNG, 0/255, the image's size), prob_png? and timing_ms."""
        check_token(settings, request.headers.get("authorization"))
        stats.requests += 1
        t = time.perf_counter()
        try:
            with gate.slot():
                uploads = await read_uploads(request, settings)
                if not uploads:
                    raise ApiError(400, "no_image", "the multipart body has no file part; send the image as 'file'")
                if len(uploads) > 1:
                    raise ApiError(400, "too_many_images", f"{len(uploads)} files sent: /v1/segment takes one image, "
                                   "/v1/segment/batch takes several")
                t_dec = time.perf_counter()
                image = await run(work_pool, decode, uploads[0])
                decode_ms = (time.perf_counter() - t_dec) * 1000
                done = await probabilities([image])
                (p,), wait_ms, infer_ms = done.probs, done.queue_ms, done.infer_ms
                if format == "png":
                    data, headers = await run(work_pool, result_png, image, p, threshold, output, opacity)
                    headers.update({"X-Inference-Ms": f"{infer_ms:.1f}", "X-Queue-Ms": f"{wait_ms:.1f}",
                                    "X-Batch-Images": str(done.batch_images)})
                    return Response(data, media_type="image/png", headers=headers)
                out = await run(work_pool, result_json, image, p, threshold, polygons, prob, levels)
                out["batch_images"] = done.batch_images
        except ApiError as e:
            if e.code == "busy":
                stats.busy_rejections += 1
            raise
        out["timing_ms"] = {"decode": round(decode_ms, 1), "queue": round(wait_ms, 1), "inference": round(infer_ms, 1),
                            "total": round((time.perf_counter() - t) * 1000, 1)}
        return out

    @app.post("/v1/segment/batch", tags=["segment"], openapi_extra={"requestBody": BATCH_BODY},
              responses={400: ERROR_DOC, 401: ERROR_DOC, 413: ERROR_DOC, 415: ERROR_DOC, 503: ERROR_DOC})
    async def segment_batch(
        request: Request,
        threshold: float | None = Query(None, ge=0.0, le=1.0, description="default: the model's"),
        polygons: bool = Query(False, description="add each component's outline polygon"),
        prob: bool = Query(False, description="add prob_png to each result"),
    ):
        """Segment several images (multipart/form-data, one file part each, at most max_batch) in one forward
        pass. `results` follows the order of the parts; an image that cannot be used gets
        {"name", "error", "message", "status"} in its place and the others are still segmented."""
        check_token(settings, request.headers.get("authorization"))
        stats.requests += 1
        t = time.perf_counter()
        if not _media_type(request.headers.get("content-type")).startswith("multipart/"):
            raise ApiError(415, "unsupported_media_type", "/v1/segment/batch takes multipart/form-data with one "
                           "file part per image (for one raw image use /v1/segment)")
        try:
            with gate.slot():
                uploads = await read_uploads(request, settings)
                if not uploads:
                    raise ApiError(400, "no_image", "the multipart body has no file part")
                if len(uploads) > settings.max_batch:
                    raise ApiError(413, "too_many_images", f"{len(uploads)} images, over the limit of "
                                   f"{settings.max_batch} per batch (the server's --max-batch)")
                decoded: list[np.ndarray | ApiError] = []
                for u in uploads:
                    try:
                        decoded.append(await run(work_pool, decode, u))
                    except ApiError as e:
                        decoded.append(e)
                good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
                done = await probabilities([decoded[i] for i in good]) if good else Batched([], 0.0, 0.0, 0)
                probs, wait_ms, infer_ms = done.probs, done.queue_ms, done.infer_ms
                results: list[dict[str, Any]] = []
                by_index = dict(zip(good, probs))
                for i, (u, d) in enumerate(zip(uploads, decoded)):
                    if isinstance(d, ApiError):
                        results.append({"name": u.name, **d.body()})
                    else:
                        r = await run(work_pool, result_json, d, by_index[i], threshold, polygons, prob)
                        results.append({"name": u.name, **r})
        except ApiError as e:
            if e.code == "busy":
                stats.busy_rejections += 1
            raise
        return {"results": results, "images": len(results), "failed": len(results) - len(good),
                "batch_images": done.batch_images,
                "timing_ms": {"queue": round(wait_ms, 1), "inference": round(infer_ms, 1),
                              "total": round((time.perf_counter() - t) * 1000, 1)}}

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
        """Frames in (binary messages: JPEG, PNG, WebP), one JSON answer per processed frame out. See module doc."""
        q = ws.query_params
        try:
            check_token(settings, ws.headers.get("authorization"), q.get("token"))
        except ApiError as e:
            await ws.close(code=1008, reason=e.message[:120])
            return
        opts = {"output": q.get("output", "mask"), "threshold": q.get("threshold")}
        await ws.accept()
        if stats.streams >= settings.max_streams:
            await ws.send_text(json.dumps({"error": "busy", "status": 503, "message":
                                          f"{stats.streams} streams open, the limit is {settings.max_streams}"}))
            await ws.close(code=1013)
            return
        try:
            opts = _stream_options(opts)
        except ApiError as e:
            await ws.send_text(json.dumps(e.body()))
            await ws.close(code=1008)
            return
        stats.streams += 1
        latest: list[Any] = [None]  # (seq, bytes, t_received)
        state = {"seq": 0, "dropped": 0, "closed": False}
        wake = asyncio.Event()

        last_heard = [clock()]

        async def receive():
            try:
                while True:
                    try:
                        msg = await asyncio.wait_for(ws.receive(), min(idle_poll_s, settings.stream_idle_s))
                    except asyncio.TimeoutError:
                        if clock() - last_heard[0] < settings.stream_idle_s:
                            continue
                        stats.streams_idle_closed += 1
                        await ws.send_text(json.dumps({"error": "idle_timeout", "status": 408, "message":
                                                       f"no frame or message for {settings.stream_idle_s:g} s: "
                                                       "stream closed (reconnect to go on)"}))
                        await ws.close(code=1001)
                        break
                    last_heard[0] = clock()
                    if msg["type"] == "websocket.disconnect":
                        break
                    if msg.get("bytes") is not None:
                        state["seq"] += 1
                        stats.frames_received += 1
                        if latest[0] is not None:  # never processed: stale now
                            state["dropped"] += 1
                            stats.frames_dropped += 1
                        latest[0] = (state["seq"], msg["bytes"], time.perf_counter())
                        wake.set()
                    elif msg.get("text"):
                        try:
                            opts.update(_stream_options({**opts, **json.loads(msg["text"])}))
                        except (ApiError, ValueError, TypeError) as e:
                            err = e.body() if isinstance(e, ApiError) else {"error": "invalid_parameter",
                                                                             "message": str(e), "status": 400}
                            await ws.send_text(json.dumps(err))
            except (WebSocketDisconnect, RuntimeError):
                pass
            finally:
                state["closed"] = True
                wake.set()

        def frame_job(seq: int, data: bytes) -> dict[str, Any]:
            try:
                if len(data) > settings.max_bytes:
                    raise ApiError(413, "body_too_large",
                                   f"frame {seq}: {len(data):,} bytes, over the limit of {settings.max_bytes:,}")
                image = decode_image(data, f"frame {seq}", settings.max_pixels)
            except ApiError as e:
                return {"frame": seq, **e.body()}
            return {"image": image}

        receiver = asyncio.create_task(receive())
        try:
            while True:
                await wake.wait()
                wake.clear()
                if state["closed"]:
                    break
                item, latest[0] = latest[0], None
                if item is None:
                    continue
                seq, data, t_recv = item
                with gate.slot(force=True):  # streams are bounded by max_streams, never refused per frame
                    dec = await run(work_pool, frame_job, seq, data)
                    if "image" not in dec:
                        answer = dec
                    else:
                        image = dec["image"]
                        done = await probabilities([image])
                        (p,), infer_ms = done.probs, done.infer_ms
                        answer = await run(work_pool, _stream_answer, seg, image, p, dict(opts))
                        answer.update(frame=seq, inference_ms=round(infer_ms, 1))
                if "image" in dec:
                    answer.update(queue_ms=round(done.queue_ms, 1))
                answer.update(dropped=state["dropped"], latency_ms=round((time.perf_counter() - t_recv) * 1000, 1))
                stats.frames_processed += 1
                if state["closed"]:
                    break
                await ws.send_text(json.dumps(answer))
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            stats.streams -= 1
            receiver.cancel()
            with contextlib.suppress(BaseException):
                await receiver
            with contextlib.suppress(Exception):
                await ws.close()

    return app


def _stream_options(opts: dict[str, Any]) -> dict[str, Any]:
    out = {"output": opts.get("output", "mask"), "threshold": opts.get("threshold")}
    if out["output"] not in ("mask", "overlay", "none"):
        raise ApiError(400, "invalid_parameter", f"output must be mask, overlay or none, got {out['output']!r}")
    if out["threshold"] not in (None, ""):
        try:
            t = float(out["threshold"])
        except (TypeError, ValueError):
            raise ApiError(400, "invalid_parameter", f"threshold must be a number, got {out['threshold']!r}") from None
        if not 0.0 <= t <= 1.0:
            raise ApiError(400, "invalid_parameter", f"threshold must lie in [0, 1], got {t}")
        out["threshold"] = t
    else:
        out["threshold"] = None
    return out


def _stream_answer(seg: Segmenter, image: np.ndarray, prob: np.ndarray, opts: dict[str, Any]) -> dict[str, Any]:
    t = opts["threshold"]
    mask = seg.postprocess(image, prob, t)
    out: dict[str, Any] = {"width": int(image.shape[1]), "height": int(image.shape[0]),
                           "threshold": seg.threshold if t is None else t, **analyse(mask, prob)}
    if opts["output"] == "mask":
        out["mask_png"] = b64(encode_png(mask.astype(np.uint8) * 255))
    elif opts["output"] == "overlay":
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(draw_overlay(image, mask), cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 85])
        out["overlay_jpeg"] = b64(buf.tobytes())
    return out
