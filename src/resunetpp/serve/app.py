"""`create_app(segmenter)`: the FastAPI app behind `resunetpp serve` (HTTP API, WebSocket stream, page).

Every prediction goes through the library's `Segmenter.probabilities` and `Segmenter.postprocess`
(there is no second inference path); the server only decodes requests, queues them and formats the
answers. Its rooms, each a router over the shared `ServeState` (`state.py`):

* `page.py`: the browser page and its files, `GET /v1/health`, `GET /v1/model`;
* `images.py`: `POST /v1/segment` and `POST /v1/segment/batch`, reading uploads in memory;
* `stream.py`: `WS /v1/stream`, live frames with stale ones dropped;
* `batching.py`: admission (`Gate`: 503 with `Retry-After` when the expected wait is too long) and the
  dynamic batching of concurrent images into one forward pass (`Batcher`).

Errors are JSON `{"error": code, "message": text, "status": http}`; bad input gets a 4xx naming the
problem (codes: empty, not_an_image, truncated, corrupt_image, too_many_pixels, body_too_large,
unsupported_media_type, bad_multipart, no_image, too_many_images, missing_token, invalid_token,
invalid_parameter, busy; on the stream also idle_timeout).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from resunetpp.inference.segmenter import Segmenter
from resunetpp.serve.decode import ApiError
from resunetpp.serve.images import router as image_routes
from resunetpp.serve.page import STATIC_DIR
from resunetpp.serve.page import router as page_routes
from resunetpp.serve.state import DISCLAIMER, TOKEN_ENV, ServeSettings, ServeState
from resunetpp.serve.stream import router as stream_routes
from resunetpp.version import __version__

__all__ = ["DISCLAIMER", "STATIC_DIR", "TOKEN_ENV", "ServeSettings", "create_app"]


def create_app(segmenter: Segmenter | str | Path, settings: ServeSettings | None = None,
               clock: Callable[[], float] = time.monotonic, idle_poll_s: float = 1.0) -> FastAPI:
    """The FastAPI app serving `segmenter`.

    Args:
        segmenter: A `Segmenter`, or weights to build one with defaults.
        settings: Limits and access; default `ServeSettings()`.
        clock: Seconds, judging a stream's idleness (tests inject one).
        idle_poll_s: How often a stream's idleness is checked.

    Returns:
        The app; its shared state is `app.state.serve` (also `app.state.segmenter`, `.settings`, `.gate`,
        `.stats`, `.batcher`).
    """
    seg = segmenter if isinstance(segmenter, Segmenter) else Segmenter(segmenter)
    state = ServeState.open(seg, settings or ServeSettings(), clock, idle_poll_s)
    app = FastAPI(title="resunetpp", version=__version__, lifespan=_lifespan,
                  description="ResUNet++ polyp segmentation over HTTP. " + DISCLAIMER)
    app.state.serve = state
    app.state.segmenter, app.state.settings, app.state.gate = state.seg, state.settings, state.gate
    app.state.stats, app.state.batcher = state.stats, state.batcher
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    app.include_router(page_routes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(image_routes)
    app.include_router(stream_routes)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.serve.close()


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return JSONResponse({"error": "invalid_parameter", "message": problems, "status": 422}, status_code=422)


async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse({"error": code, "message": str(exc.detail), "status": exc.status_code},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _internal(_request: Request, exc: Exception) -> JSONResponse:  # a bug, not bad input: still JSON
    return JSONResponse({"error": "internal_error", "message": f"{type(exc).__name__}: {exc}", "status": 500},
                        status_code=500)


ERROR_HANDLERS = {ApiError: _api_error, RequestValidationError: _invalid, StarletteHTTPException: _http,
                  Exception: _internal}
