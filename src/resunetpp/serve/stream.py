"""`WS /v1/stream`: live segmentation of a camera or video, one JSON answer per processed frame.

The client sends encoded frames (binary messages: JPEG, PNG, WebP) and may change the options (`output`:
mask, overlay or none; `threshold`) with a JSON text message. A client silent for longer than
`stream_idle_s` is sent `{"error": "idle_timeout"}` and closed, so idle clients cannot hold the
`max_streams` slots. A receiver task always keeps only the newest unprocessed frame, so when the model is
slower than the camera stale frames are dropped (each answer's `dropped` counts the frames skipped so far
on this stream) and the answer is always for the newest frame. Frames are numbered from 1 in the order
they arrive (`frame`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import time
from typing import Any

import cv2
import numpy as np
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from resunetpp.inference.overlay import draw_overlay
from resunetpp.inference.segmenter import Segmenter
from resunetpp.serve.decode import ApiError, decode_image
from resunetpp.serve.results import analyse, b64, encode_png
from resunetpp.serve.state import ServeSettings, ServeState, check_token, state_of

router = APIRouter()


@router.websocket("/v1/stream")
async def stream(ws: WebSocket):
    """Frames in (binary messages: JPEG, PNG, WebP), one JSON answer per processed frame out. See module doc."""
    state = state_of(ws)
    opts = await _open(ws, state)
    if opts is not None:
        await StreamSession(ws, state, opts).run()


async def _open(ws: WebSocket, state: ServeState) -> dict[str, Any] | None:
    """Accept the stream and return its options, or refuse it (token, max_streams, options) and return None."""
    settings, q = state.settings, ws.query_params
    try:
        check_token(settings, ws.headers.get("authorization"), q.get("token"))
    except ApiError as e:
        await ws.close(code=1008, reason=e.message[:120])
        return None
    opts = {"output": q.get("output", "mask"), "threshold": q.get("threshold")}
    await ws.accept()
    if state.stats.streams >= settings.max_streams:
        await ws.send_text(json.dumps({"error": "busy", "status": 503, "message":
                                      f"{state.stats.streams} streams open, the limit is {settings.max_streams}"}))
        await ws.close(code=1013)
        return None
    try:
        return _stream_options(opts)
    except ApiError as e:
        await ws.send_text(json.dumps(e.body()))
        await ws.close(code=1008)
        return None


class StreamSession:
    """One open stream: a receiver task keeps the newest frame, the answering loop segments it.

    Args:
        ws: The accepted WebSocket.
        state: The server's shared state.
        opts: The stream's options (`_stream_options`); text messages update them.
    """

    def __init__(self, ws: WebSocket, state: ServeState, opts: dict[str, Any]):
        self.ws, self.state, self.opts = ws, state, opts
        self.latest: tuple[int, bytes, float] | None = None  # (seq, bytes, t_received), not yet taken
        self.seq = 0
        self.dropped = 0
        self.closed = False
        self.wake = asyncio.Event()
        self.last_heard = state.clock()

    async def run(self) -> None:
        """Answer frames until the client leaves or idles out; the stream's slot is held meanwhile."""
        stats = self.state.stats
        stats.streams += 1
        receiver = asyncio.create_task(self.receive())
        try:
            await self.answer_frames()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            stats.streams -= 1
            receiver.cancel()
            with contextlib.suppress(BaseException):
                await receiver
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def answer_frames(self) -> None:
        """Take the newest frame each time the receiver wakes this loop; answer it unless the stream closed."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.closed:
                break
            item, self.latest = self.latest, None
            if item is None:
                continue
            answer = await self.answer(*item)
            self.state.stats.frames_processed += 1
            if self.closed:
                break
            await self.ws.send_text(json.dumps(answer))

    async def answer(self, seq: int, data: bytes, t_recv: float) -> dict[str, Any]:
        """The answer to frame `seq`: its analysis, or the error that refused it."""
        state = self.state
        with state.gate.slot(force=True):  # streams are bounded by max_streams, never refused per frame
            dec = await state.run(_decode_frame, state.settings, seq, data)
            if "image" not in dec:
                answer = dec
            else:
                image = dec["image"]
                done = await state.batcher.submit([image])
                (p,) = done.probs
                answer = await state.run(_stream_answer, state.seg, image, p, dict(self.opts))
                answer.update(frame=seq, inference_ms=round(done.infer_ms, 1), queue_ms=round(done.queue_ms, 1))
        answer.update(dropped=self.dropped, latency_ms=round((time.perf_counter() - t_recv) * 1000, 1))
        return answer

    async def receive(self) -> None:
        """Read messages until the client leaves or idles out: a frame replaces the newest, text sets options."""
        try:
            while (msg := await self._receive_or_idle()) is not None:
                if msg["type"] == "websocket.disconnect":
                    break
                if msg.get("bytes") is not None:
                    self._keep_newest(msg["bytes"])
                elif msg.get("text"):
                    await self._set_options(msg["text"])
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.closed = True
            self.wake.set()

    async def _receive_or_idle(self) -> dict[str, Any] | None:
        """The next message, or None once the client was silent for `stream_idle_s` (then told and closed)."""
        state, idle_s = self.state, self.state.settings.stream_idle_s
        while True:
            try:
                msg = await asyncio.wait_for(self.ws.receive(), min(state.idle_poll_s, idle_s))
            except asyncio.TimeoutError:
                if state.clock() - self.last_heard < idle_s:
                    continue
                state.stats.streams_idle_closed += 1
                await self.ws.send_text(json.dumps({"error": "idle_timeout", "status": 408, "message":
                                                    f"no frame or message for {idle_s:g} s: "
                                                    "stream closed (reconnect to go on)"}))
                await self.ws.close(code=1001)
                return None
            self.last_heard = state.clock()
            return msg

    def _keep_newest(self, data: bytes) -> None:
        stats = self.state.stats
        self.seq += 1
        stats.frames_received += 1
        if self.latest is not None:  # never processed: stale now
            self.dropped += 1
            stats.frames_dropped += 1
        self.latest = (self.seq, data, time.perf_counter())
        self.wake.set()

    async def _set_options(self, text: str) -> None:
        try:
            self.opts.update(_stream_options({**self.opts, **json.loads(text)}))
        except (ApiError, ValueError, TypeError) as e:
            err = e.body() if isinstance(e, ApiError) else {"error": "invalid_parameter",
                                                             "message": str(e), "status": 400}
            await self.ws.send_text(json.dumps(err))


def _decode_frame(settings: ServeSettings, seq: int, data: bytes) -> dict[str, Any]:
    """{"image": (H, W, 3) RGB} for a usable frame, else the frame's error answer."""
    try:
        if len(data) > settings.max_bytes:
            raise ApiError(413, "body_too_large",
                           f"frame {seq}: {len(data):,} bytes, over the limit of {settings.max_bytes:,}")
        image = decode_image(data, f"frame {seq}", settings.max_pixels)
    except ApiError as e:
        return {"frame": seq, **e.body()}
    return {"image": image}


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


def websocket_library() -> str:
    """uvicorn's `ws` setting: "auto" when websockets or wsproto is installed, else "none" (no stream)."""
    found = any(importlib.util.find_spec(name) is not None for name in ("websockets", "wsproto"))
    return "auto" if found else "none"
