"""What the rooms of the server share: its settings (limits and access), counters, the model's queue and
the thread pools (`ServeState`, one per app, at `app.state.serve`), and the token check.

With a token set, every `/v1/*` route but `/v1/health` needs `Authorization: Bearer <token>` (compared with
`hmac.compare_digest`); the WebSocket also accepts `?token=` (browsers cannot set headers on a WebSocket).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from starlette.requests import HTTPConnection

from resunetpp.inference.segmenter import Segmenter
from resunetpp.serve.batching import Batcher, Gate
from resunetpp.serve.decode import ApiError

DISCLAIMER = "Research use only. Not a medical device: not for diagnosis or treatment decisions."
TOKEN_ENV = "RESUNETPP_TOKEN"
ERROR_DOC = {"description": "a JSON error naming the problem", "content": {"application/json": {"example": {
    "error": "not_an_image", "message": "body: not an image ...", "status": 400}}}}


@dataclass
class ServeSettings:
    """Limits and access of one server. All sizes in bytes / pixels.

    Attributes:
        max_bytes: Request body (one image, a batch, or one stream frame).
        max_pixels: Per image, read from the header before decoding.
        queue_size: Requests inside the server at once (a memory bound); one more gets 503.
        max_queue_s: A request expected to wait longer than this for the model gets 503.
        infer_batch: Images per forward pass (concurrent requests are batched up to this); None: 8 on a GPU,
            1 on a CPU, where batching measured slower per image (20 clients on 2 cores: 2.97 requests/s
            at 8, 5.74 at 1; RESULTS.md).
        infer_workers: Forward passes at once, each on its own thread; None: up to 4 on a CPU with the torch
            backend (there the workers share the cores by the load: a lone request gets them all), else 1.
        batch_wait_ms: Once the model is free, wait at most this long for more images to batch.
        max_batch: Images per /v1/segment/batch request.
        max_streams: Concurrent WebSocket streams.
        stream_idle_s: A stream silent this long is closed (frees its max_streams slot).
        token: Required as a Bearer token when set.

    Raises:
        ValueError: A limit out of its range.
    """

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 25_000_000
    queue_size: int = 64
    max_queue_s: float = 30.0
    infer_batch: int | None = None
    infer_workers: int | None = None
    batch_wait_ms: float = 5.0
    max_batch: int = 16
    max_streams: int = 4
    stream_idle_s: float = 60.0
    token: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "queue_size", "infer_batch", "infer_workers", "max_batch",
                     "max_streams"):
            value = getattr(self, name)
            if name in ("infer_batch", "infer_workers") and value is None:
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
class Stats:
    """The server's counters (shown by /v1/health, read by tests)."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    busy_rejections: int = 0
    streams: int = 0
    frames_received: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    streams_idle_closed: int = 0


@dataclass
class ServeState:
    """One server's shared state: the model, its queue, the pools, the limits and the counters.

    The model runs on `infer_pool` (through `batcher`); decoding and encoding run on `work_pool`, so they
    overlap with the model.

    Attributes:
        seg: The segmenter behind every answer.
        settings: Limits and access, with `infer_batch` resolved.
        gate: Admission (requests inside, expected wait).
        batcher: The model's queue (dynamic batching).
        stats: Counters.
        infer_pool: The model's threads.
        work_pool: Decoding and encoding threads.
        clock: Seconds, judging a stream's idleness.
        idle_poll_s: How often a stream's idleness is checked.
    """

    seg: Segmenter
    settings: ServeSettings
    gate: Gate
    batcher: Batcher
    stats: Stats
    infer_pool: ThreadPoolExecutor
    work_pool: ThreadPoolExecutor
    clock: Callable[[], float]
    idle_poll_s: float

    @classmethod
    def open(cls, seg: Segmenter, settings: ServeSettings, clock: Callable[[], float] = time.monotonic,
             idle_poll_s: float = 1.0) -> ServeState:
        """Start the pools and the model's queue for `seg` under `settings`.

        Args:
            seg: The segmenter to serve.
            settings: Limits and access; `infer_batch` None becomes 8 on a GPU, 1 on a CPU, and
                `infer_workers` None up to 4 on a CPU with the torch backend, else 1.
            clock: Seconds, judging a stream's idleness.
            idle_poll_s: How often a stream's idleness is checked.

        Returns:
            The state, to be closed with `close()`.
        """
        on_cpu_torch = seg.backend == "torch" and _device(seg).type == "cpu"
        cores = torch.get_num_threads()
        if settings.infer_batch is None:
            settings = replace(settings, infer_batch=8 if _device(seg).type == "cuda" else 1)
        if settings.infer_workers is None:
            settings = replace(settings, infer_workers=min(cores, 4) if on_cpu_torch else 1)
        gate = Gate(settings.queue_size, settings.max_queue_s)
        infer_pool = ThreadPoolExecutor(max_workers=settings.infer_workers, thread_name_prefix="resunetpp-infer")
        work_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="resunetpp-io")
        batcher = Batcher(lambda images: seg.probabilities(images), infer_pool, gate, settings.infer_batch,
                          settings.batch_wait_ms / 1000, workers=settings.infer_workers,
                          set_threads=torch.set_num_threads if on_cpu_torch else None, cores=cores)
        return cls(seg, settings, gate, batcher, Stats(), infer_pool, work_pool, clock, idle_poll_s)

    def close(self) -> None:
        """Stop the model's queue and the pools (at the server's shutdown)."""
        self.batcher.close()
        self.infer_pool.shutdown(wait=False, cancel_futures=True)
        self.work_pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the work pool (decoding, encoding), so the event loop and the model go on."""
        return await asyncio.get_running_loop().run_in_executor(self.work_pool, fn, *args)

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """A place in the queue for the `with` block (`Gate.slot`), counting the requests refused as busy.

        Raises:
            ApiError: 503 `busy` when refused; any `ApiError` of the block passes through.
        """
        try:
            with self.gate.slot():
                yield
        except ApiError as e:
            if e.code == "busy":
                self.stats.busy_rejections += 1
            raise


def _device(seg: Segmenter) -> torch.device:
    """The torch device `seg` runs on (CPU for onnxruntime and OpenVINO)."""
    return getattr(getattr(seg, "_run", None), "device", torch.device("cpu"))


def state_of(connection: HTTPConnection) -> ServeState:
    """The shared state of the app serving `connection` (a request or a WebSocket)."""
    return connection.app.state.serve


def check_token(settings: ServeSettings, authorization: str | None, query_token: str | None = None) -> None:
    """Check the request's token, when the server has one.

    Args:
        settings: The server's settings (`token`).
        authorization: The Authorization header (`Bearer <token>`).
        query_token: The `?token=` of a WebSocket, used without the header.

    Raises:
        ApiError: 401 `missing_token` or `invalid_token`.
    """
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
