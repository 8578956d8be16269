"""The HTTP image API: `POST /v1/segment` (one image) and `POST /v1/segment/batch` (several, one forward
pass), and how a request's images are read.

Requests are decoded in memory (`decode.decode_image`); nothing is written to disk. Multipart bodies are
parsed in memory too (python-multipart's streaming parser, not Starlette's spooled temporary files). The
body size is capped while it streams in (`max_bytes`). Each answer reports its time in the queue
(`timing_ms.queue`, `X-Queue-Ms`) and how many images shared its forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from resunetpp.serve.batching import Batched
from resunetpp.serve.decode import ApiError, decode_image
from resunetpp.serve.results import result_json, result_png
from resunetpp.serve.state import ERROR_DOC, ServeSettings, ServeState, check_token, state_of

router = APIRouter()

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


@dataclass
class Upload:
    """One image of a request, still encoded.

    Attributes:
        name: "body" for a raw body, else the file name or the form field.
        content_type: Its media type, lower case, without parameters ("" when not sent).
        data: The encoded bytes.
    """

    name: str
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
                       f"{limit:,} bytes (the server's max_bytes)")
    chunks, n = [], 0
    try:
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise ApiError(413, "body_too_large", f"request body is over the limit of {limit:,} bytes "
                               "(the server's max_bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client closed the connection before the body ended") from None
    return b"".join(chunks)


def parse_multipart(body: bytes, content_type: str) -> list[Upload]:
    """The file parts of a multipart/form-data body, parsed in memory (other form fields are left out).

    Args:
        body: The whole body.
        content_type: The request's Content-Type, with its boundary.

    Raises:
        ApiError: 400 `bad_multipart` for no boundary or a malformed body.
    """
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
    """The images of a request: the file parts of a multipart body, or the raw body (image/*).

    Args:
        request: The request; its body is read here, at most `settings.max_bytes`.
        settings: The server's limits.

    Returns:
        The uploads (none for a multipart body without a file part).

    Raises:
        ApiError: 413 for a body over the limit, 415 for a type that is not an image or multipart/form-data,
            400 for a bad multipart body or a client gone before the body ended.
    """
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


def decode_upload(upload: Upload, settings: ServeSettings) -> np.ndarray:
    """One upload as an image, within the server's limits.

    Args:
        upload: The encoded image.
        settings: The server's limits (`max_bytes`, `max_pixels`).

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        ApiError: 415 for a type that is not an image, 413 for too many bytes or pixels, 400 for bytes that
            are not a whole image.
    """
    what = "body" if upload.name == "body" else f"file {upload.name!r}"
    if upload.content_type and not _is_image_type(upload.content_type):
        raise ApiError(415, "unsupported_media_type", f"{what}: Content-Type {upload.content_type} is not an image")
    if len(upload.data) > settings.max_bytes:
        raise ApiError(413, "body_too_large", f"{what}: {len(upload.data):,} bytes, over the limit of "
                       f"{settings.max_bytes:,}")
    return decode_image(upload.data, what, settings.max_pixels)


# ----------------------------------------------------------------------------------------------
# The routes
# ----------------------------------------------------------------------------------------------

def _authorized(request: Request) -> ServeState:
    state = state_of(request)
    check_token(state.settings, request.headers.get("authorization"))
    state.stats.requests += 1
    return state


@router.post("/v1/segment", tags=["segment"], openapi_extra={"requestBody": IMAGE_BODY},
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
    polygon?}], mask_png (base64 PNG, 0/255, the image's size), prob_png?, batch_images (images in its
    forward pass), threads (that pass's CPU threads; null when the backend chooses) and timing_ms."""
    state = _authorized(request)
    t = time.perf_counter()
    with state.admitted():
        image, decode_ms = await _one_image(request, state)
        done = await state.batcher.submit([image])  # batched with the other requests' images
        (p,) = done.probs
        if format == "png":
            data, headers = await state.run(result_png, state.seg, image, p, threshold, output, opacity)
            headers.update({"X-Inference-Ms": f"{done.infer_ms:.1f}", "X-Queue-Ms": f"{done.queue_ms:.1f}",
                            "X-Batch-Images": str(done.batch_images), "X-Threads": str(done.threads or "")})
            return Response(data, media_type="image/png", headers=headers)
        out = await state.run(result_json, state.seg, image, p, threshold, polygons, prob, levels)
        out["batch_images"], out["threads"] = done.batch_images, done.threads
    out["timing_ms"] = {"decode": round(decode_ms, 1), "queue": round(done.queue_ms, 1),
                        "inference": round(done.infer_ms, 1), "total": round((time.perf_counter() - t) * 1000, 1)}
    return out


async def _one_image(request: Request, state: ServeState) -> tuple[np.ndarray, float]:
    """The request's one image, decoded, and the milliseconds its decoding took."""
    uploads = await read_uploads(request, state.settings)
    if not uploads:
        raise ApiError(400, "no_image", "the multipart body has no file part; send the image as 'file'")
    if len(uploads) > 1:
        raise ApiError(400, "too_many_images", f"{len(uploads)} files sent: /v1/segment takes one image, "
                       "/v1/segment/batch takes several")
    t = time.perf_counter()
    image = await state.run(decode_upload, uploads[0], state.settings)
    return image, (time.perf_counter() - t) * 1000


@router.post("/v1/segment/batch", tags=["segment"], openapi_extra={"requestBody": BATCH_BODY},
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
    state = _authorized(request)
    t = time.perf_counter()
    if not _media_type(request.headers.get("content-type")).startswith("multipart/"):
        raise ApiError(415, "unsupported_media_type", "/v1/segment/batch takes multipart/form-data with one "
                       "file part per image (for one raw image use /v1/segment)")
    with state.admitted():
        uploads = await _batch_uploads(request, state.settings)
        decoded = await _decode_each(uploads, state)
        good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        done = await state.batcher.submit([decoded[i] for i in good]) if good else Batched([], 0.0, 0.0, 0)
        results = await _batch_results(state, uploads, decoded, dict(zip(good, done.probs)),
                                       threshold, polygons, prob)
    return {"results": results, "images": len(results), "failed": len(results) - len(good),
            "batch_images": done.batch_images,
            "timing_ms": {"queue": round(done.queue_ms, 1), "inference": round(done.infer_ms, 1),
                          "total": round((time.perf_counter() - t) * 1000, 1)}}


async def _batch_uploads(request: Request, settings: ServeSettings) -> list[Upload]:
    uploads = await read_uploads(request, settings)
    if not uploads:
        raise ApiError(400, "no_image", "the multipart body has no file part")
    if len(uploads) > settings.max_batch:
        raise ApiError(413, "too_many_images", f"{len(uploads)} images, over the limit of "
                       f"{settings.max_batch} per batch (the server's max_batch)")
    return uploads


async def _decode_each(uploads: list[Upload], state: ServeState) -> list[np.ndarray | ApiError]:
    """Each upload decoded, or the error that refused it (the others still go on)."""
    decoded: list[np.ndarray | ApiError] = []
    for u in uploads:
        try:
            decoded.append(await state.run(decode_upload, u, state.settings))
        except ApiError as e:
            decoded.append(e)
    return decoded


async def _batch_results(state: ServeState, uploads: list[Upload], decoded: list[np.ndarray | ApiError],
                         probs: dict[int, np.ndarray], threshold: float | None, polygons: bool,
                         want_prob: bool) -> list[dict[str, Any]]:
    """One result per upload, in order: its analysis, or its error."""
    results: list[dict[str, Any]] = []
    for i, (u, d) in enumerate(zip(uploads, decoded)):
        if isinstance(d, ApiError):
            results.append({"name": u.name, **d.body()})
        else:
            r = await state.run(result_json, state.seg, d, probs[i], threshold, polygons, want_prob)
            results.append({"name": u.name, **r})
    return results
