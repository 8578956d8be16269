"""`serve`: the live stream's per-stream threshold really decides its masks, and the upload limit counts the
whole body as it streams in (chunked, no Content-Length), not each chunk.

Expected masks are computed here from the model's probabilities with numpy and OpenCV: threshold, then the
8-connected components smaller than min_area x the image dropped (the documented post-processing)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'resunetpp[serve]'")
pytest.importorskip("python_multipart", reason="the serve extra is not installed: pip install 'resunetpp[serve]'")
httpx = pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's "use httpx2" notice
    from fastapi.testclient import TestClient

from helpers.inference import disc_image, save_disc_checkpoint  # noqa: E402
from resunetpp import Segmenter  # noqa: E402
from resunetpp.serve import ServeSettings, create_app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    return Segmenter(save_disc_checkpoint(tmp_path_factory.mktemp("stream-ckpt")))


def _png(image: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(image).save(b, "PNG")
    return b.getvalue()


def _mask(data: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_UNCHANGED) > 0


def _expected(prob: np.ndarray, threshold: float, min_area: float) -> np.ndarray:
    mask = (prob > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    out = np.zeros(mask.shape, bool)
    for i in range(1, n):
        if stats[i, cv2.CC_STAT_AREA] >= min_area * mask.size:
            out |= labels == i
    return out


# ------------------------------------------------------------------------------ the stream's threshold

def test_stream_masks_follow_the_threshold_of_the_stream(seg):
    image = disc_image(np.random.default_rng(11), 64, 80)[0]
    (prob,) = seg.probabilities([image])
    # thresholds whose masks differ from the model's own (0.5) and from each other on this image
    low, high = 0.02, 0.98
    masks = {t: _expected(prob, t, seg.min_area) for t in (0.0, low, seg.threshold, high)}
    assert masks[low].sum() > masks[seg.threshold].sum() > masks[high].sum() > 0
    app = create_app(seg)
    with TestClient(app) as c:
        with c.websocket_connect(f"/v1/stream?threshold={high}") as ws:  # set when connecting
            ws.send_bytes(_png(image))
            a = ws.receive_json()
            assert a["threshold"] == high and (a["width"], a["height"]) == (80, 64)
            assert _mask(a["mask_png"]).tolist() == masks[high].tolist()
            assert a["area_fraction"] == pytest.approx(masks[high].mean(), abs=5e-7)
            ws.send_text(f'{{"threshold": {low}}}')  # changed mid-stream
            ws.send_bytes(_png(image))
            b = ws.receive_json()
            assert b["threshold"] == low
            assert _mask(b["mask_png"]).tolist() == masks[low].tolist()
            assert b["area_fraction"] == pytest.approx(masks[low].mean(), abs=5e-7)
            ws.send_text('{"threshold": 1.0}')  # nothing can be above 1: no polyp
            ws.send_bytes(_png(image))
            none = ws.receive_json()
            assert none["polyp"] is False and not _mask(none["mask_png"]).any() and none["area_fraction"] == 0
            ws.send_text('{"threshold": 0}')  # the stream takes [0, 1]: at 0 every pixel with p > 0 is polyp
            ws.send_bytes(_png(image))
            zero = ws.receive_json()
            assert zero["threshold"] == 0.0 and _mask(zero["mask_png"]).tolist() == masks[0.0].tolist()
        with c.websocket_connect("/v1/stream") as ws:  # another stream: the model's threshold, not the last one's
            ws.send_bytes(_png(image))
            d = ws.receive_json()
            assert d["threshold"] == seg.threshold
            assert _mask(d["mask_png"]).tolist() == masks[seg.threshold].tolist()


@pytest.mark.parametrize("query, message", [
    ("output=gif", "output must be mask, overlay or none, got 'gif'"),
    ("threshold=abc", "threshold must be a number, got 'abc'"),
    ("threshold=1.5", "threshold must lie in [0, 1], got 1.5"),
    ("threshold=-0.1", "threshold must lie in [0, 1], got -0.1"),
])
def test_stream_refuses_bad_options_when_connecting_with_one_clear_error(seg, query, message):
    from starlette.websockets import WebSocketDisconnect

    with TestClient(create_app(seg)) as c, c.websocket_connect(f"/v1/stream?{query}") as ws:
        assert ws.receive_json() == {"error": "invalid_parameter", "message": message, "status": 400}
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1008


def test_stream_options_mid_stream_outputs_and_the_empty_threshold(seg):
    image = disc_image(np.random.default_rng(12), 48, 64)[0]
    (prob,) = seg.probabilities([image])
    with TestClient(create_app(seg)) as c, c.websocket_connect("/v1/stream?output=none&threshold=") as ws:
        ws.send_bytes(_png(image))
        a = ws.receive_json()  # output none: the figures only; an empty threshold is the model's
        assert "mask_png" not in a and "overlay_jpeg" not in a and a["threshold"] == seg.threshold
        assert a["area_fraction"] == pytest.approx(_expected(prob, seg.threshold, seg.min_area).mean(), abs=5e-7)
        ws.send_text('{"output": "gif"}')  # refused mid-stream: one error, the stream goes on as it was
        assert ws.receive_json() == {"error": "invalid_parameter", "status": 400,
                                     "message": "output must be mask, overlay or none, got 'gif'"}
        ws.send_text('{"threshold": "abc"}')
        assert ws.receive_json() == {"error": "invalid_parameter", "status": 400,
                                     "message": "threshold must be a number, got 'abc'"}
        ws.send_text('{"threshold": [1]}')
        assert ws.receive_json() == {"error": "invalid_parameter", "status": 400,
                                     "message": "threshold must be a number, got [1]"}
        ws.send_bytes(_png(image))
        b = ws.receive_json()
        assert "mask_png" not in b and "overlay_jpeg" not in b and b["threshold"] == seg.threshold
        ws.send_text('{"output": "mask", "threshold": ""}')
        ws.send_bytes(_png(image))
        m = ws.receive_json()
        assert m["threshold"] == seg.threshold
        assert _mask(m["mask_png"]).tolist() == _expected(prob, seg.threshold, seg.min_area).tolist()
        ws.send_text('{"output": "overlay", "threshold": 0.3}')
        ws.send_bytes(_png(image))
        o = ws.receive_json()
        assert o["threshold"] == 0.3 and "mask_png" not in o
        overlay = cv2.imdecode(np.frombuffer(base64.b64decode(o["overlay_jpeg"]), np.uint8), cv2.IMREAD_COLOR)
        assert overlay.shape == image.shape  # the frame's own size, JPEG
        # the tint is green and only on the mask: inside, green rises over the image's; outside it stays (JPEG noise)
        inside = _expected(prob, 0.3, seg.min_area)
        green_gain = overlay[:, :, 1].astype(int) - image[:, :, 1].astype(int)  # BGR and RGB share index 1
        assert green_gain[inside].mean() > 20 and abs(green_gain[~inside].mean()) < 8
        # and it is the library's overlay of that mask, in the JPEG's BGR order (red and blue not swapped)
        from resunetpp.inference.overlay import draw_overlay

        reference = draw_overlay(image, inside)[:, :, ::-1].astype(float)
        for region in (inside, ~inside):  # mean colour per region: JPEG noise averages out, a swap would not
            got, want = overlay[region].mean(0), reference[region].mean(0)
            assert np.abs(got - want).max() < 12, (got, want)  # measured 9 inside (the outline, JPEG ringing)
        assert np.abs(overlay[inside].mean(0) - reference[inside].mean(0)[::-1]).max() > 30


def test_stream_with_a_crf_refines_each_frame_with_its_own_image(tmp_path_factory):
    """With a CRF the mask depends on the frame's pixels, not only on the probabilities: the stream's mask is the
    library's post-processing of that frame (the CRF's own labelling is tested in test_infer)."""
    from resunetpp.inference.crf import crf_available

    if not crf_available():
        pytest.skip("the crf extra is not installed")
    seg = Segmenter(save_disc_checkpoint(tmp_path_factory.mktemp("crf-ckpt")), crf="bilateral")
    image = disc_image(np.random.default_rng(13), 48, 64)[0]
    (prob,) = seg.probabilities([image])
    want = seg.postprocess(image, prob)
    assert want.tolist() != seg.postprocess(np.zeros_like(image), prob).tolist()  # the image matters here
    with TestClient(create_app(seg)) as c:
        with c.websocket_connect("/v1/stream") as ws:
            ws.send_bytes(_png(image))
            assert _mask(ws.receive_json()["mask_png"]).tolist() == want.tolist()
        # the HTTP API too (decoded images are read-only arrays: the CRF once failed on every one of them)
        r = c.post("/v1/segment", content=_png(image), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert _mask(r.json()["mask_png"]).tolist() == want.tolist()


def test_stream_options_defaults():
    """The options' defaults (as a client that sends only some of them gets): mask output, the model's threshold."""
    from resunetpp.serve.stream import _stream_options

    assert _stream_options({}) == {"output": "mask", "threshold": None}
    assert _stream_options({"threshold": "0.25"}) == {"output": "mask", "threshold": 0.25}
    assert _stream_options({"output": "none", "threshold": ""}) == {"output": "none", "threshold": None}


# ------------------------------------------------------------------------------ the upload limit

def _multipart(parts: list[bytes], boundary: str = "resunetpp-test-boundary") -> tuple[bytes, str]:
    body = b""
    for i, data in enumerate(parts):
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.png\"\r\n"
                 "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post_chunked(c: TestClient, app, path: str, body: bytes, content_type: str, chunk: int) -> httpx.Response:
    """POST `body` in `chunk`-byte pieces with Transfer-Encoding: chunked (no Content-Length), as a client
    streaming a file does; the app runs as TestClient started it (its lifespan), on TestClient's loop."""
    async def pieces():
        for i in range(0, len(body), chunk):
            yield body[i:i + chunk]
            await asyncio.sleep(0)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as ac:
            r = await ac.post(path, content=pieces(), headers={"content-type": content_type})
            await r.aread()
            return r

    return c.portal.call(go)


def test_upload_limit_counts_the_whole_streamed_body(seg):
    rng = np.random.default_rng(0)
    parts = [_png(rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)) for _ in range(3)]  # noise: ~43 KB each
    body, ctype = _multipart(parts)
    limit = 100_000
    assert all(len(p) < limit for p in parts) and len(body) > limit  # each part fits; the body does not
    app = create_app(seg, ServeSettings(max_bytes=limit))
    with TestClient(app) as c:
        r = _post_chunked(c, app, "/v1/segment/batch", body, ctype, chunk=8192)
        assert "content-length" not in r.request.headers  # the limit is checked while streaming
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "body_too_large" and "100,000" in r.json()["message"]
        # the same body under a limit it fits: accepted, all three images segmented
        roomy = create_app(seg, ServeSettings(max_bytes=len(body)))
        with TestClient(roomy) as c2:
            ok = _post_chunked(c2, roomy, "/v1/segment/batch", body, ctype, chunk=8192)
            assert ok.status_code == 200, ok.text
            assert ok.json()["images"] == 3 and ok.json()["failed"] == 0
        # one byte over: refused
        tight = create_app(seg, ServeSettings(max_bytes=len(body) - 1))
        with TestClient(tight) as c3:
            r = _post_chunked(c3, tight, "/v1/segment/batch", body, ctype, chunk=8192)
            assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def _part(headers: list[bytes], data: bytes) -> bytes:
    return b"\r\n".join(headers) + b"\r\n\r\n" + data


def test_multipart_parts_are_taken_by_filename_field_name_or_image_type(seg):
    """Which parts of a multipart body are images, and the name each answer carries: the file name; else the
    field name (file, files, image, images, or any name with an image/ type; undecodable bytes replaced); else
    "file". Ordinary form fields are skipped."""
    png = _png(disc_image(np.random.default_rng(14), 40, 40)[0])
    boundary = b"b0undary"
    parts = [
        _part([b'Content-Disposition: form-data; name="files"; filename="a.png"', b"Content-Type: image/png"], png),
        _part([b'Content-Disposition: form-data; name="note"', b"Content-Type: text/plain"], b"not an image"),
        _part([b'Content-Disposition: form-data; name="image"', b"Content-Type: application/octet-stream"], png),
        _part([b'Content-Disposition: form-data; name="shot\xff"', b"Content-Type: image/png"], png),
        _part([b"Content-Type: image/png"], png),  # no Content-Disposition at all
        _part([b'Content-Disposition: form-data; name="comment"'], b"plain text field"),
        _part([b'Content-Disposition: form-data; name="upload"; filename="b\xff.png"',
               b"Content-Type: application/octet-stream"], png),  # any field with a file name
        _part([b'Content-Disposition: form-data; name="x"; filename="c.png"'], png),  # no Content-Type: raw bytes
        *(_part([b'Content-Disposition: form-data; name="%s"' % name, b"Content-Type: application/octet-stream"], png)
          for name in (b"file", b"files", b"images")),
    ]
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"
    with TestClient(create_app(seg)) as c:
        r = c.post("/v1/segment/batch", content=body,
                   headers={"content-type": "multipart/form-data; boundary=" + boundary.decode()})
        assert r.status_code == 200, r.text
        j = r.json()
        assert [x["name"] for x in j["results"]] == ["a.png", "image", "shot\ufffd", "file", "b\ufffd.png", "c.png",
                                                     "file", "files", "images"]
        assert j["failed"] == 0 and all(x["width"] == 40 for x in j["results"])
        r = c.post("/v1/segment", content=body, headers={"content-type": "multipart/form-data"})
        assert r.status_code == 400 and r.json() == {
            "error": "bad_multipart", "message": "multipart/form-data without a boundary parameter", "status": 400}


def test_multipart_body_refusals_and_a_part_split_by_a_boundary_lookalike(seg):
    from PIL.PngImagePlugin import PngInfo

    with TestClient(create_app(seg, ServeSettings(max_bytes=1000))) as c:
        # a declared length over the limit is refused before reading, saying how large the body is
        r = c.post("/v1/segment", content=b"\0" * 1001, headers={"content-type": "image/png"})
        assert r.status_code == 413 and r.json()["message"] == (
            "request body of 1,001 bytes is over the limit of 1,000 bytes (the server's max_bytes)")
    with TestClient(create_app(seg)) as c:
        r = c.post("/v1/segment/batch", content=b"garbage without boundary",
                   headers={"content-type": "multipart/form-data; boundary=xyz"})
        assert r.status_code == 400 and r.json()["error"] == "bad_multipart" and r.json()["status"] == 400
        assert r.json()["message"].startswith("malformed multipart/form-data body (MultipartParseError: ")
        # an image whose bytes hold the start of the boundary (in a PNG text chunk) comes through whole
        info = PngInfo()
        info.add_text("note", "\r\n--b0und")
        b = io.BytesIO()
        image = disc_image(np.random.default_rng(15), 40, 40)[0]
        Image.fromarray(image).save(b, "PNG", pnginfo=info)
        body = (b'--b0undary\r\nContent-Disposition: form-data; name="files"; filename="t.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + b.getvalue() + b"\r\n--b0undary--\r\n")
        r = c.post("/v1/segment/batch", content=body,
                   headers={"content-type": "multipart/form-data; boundary=b0undary"})
        assert r.status_code == 200 and r.json()["failed"] == 0, r.text
        assert _mask(r.json()["results"][0]["mask_png"]).tolist() == seg.segment(image)[0].tolist()


def _raw_post(c: TestClient, app, path: str, headers: list[tuple[bytes, bytes]], messages: list[dict]) -> tuple:
    """One HTTP request straight through the ASGI app, its body as the given receive messages (so a client
    that disconnects half-way can be played); returns (status, JSON body)."""
    async def go():
        sent, queue = [], list(messages)

        async def receive():
            return queue.pop(0) if queue else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 1),
                 "server": ("testserver", 80)}
        await app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, json.loads(body)

    return c.portal.call(go)


def test_upload_limit_edges_a_disconnect_and_other_multipart_kinds(seg):
    app = create_app(seg, ServeSettings(max_bytes=1000))
    with TestClient(app) as c:
        # a declared length exactly at the limit is read (and then found not to be an image)
        r = c.post("/v1/segment", content=b"\0" * 1000, headers={"content-type": "image/png"})
        assert r.status_code == 400 and r.json()["error"] == "not_an_image"
        # streamed over the limit without a declared length: the streaming message, in full
        status, body = _raw_post(c, app, "/v1/segment", [(b"content-type", b"image/png")],
                                 [{"type": "http.request", "body": b"\0" * 600, "more_body": True},
                                  {"type": "http.request", "body": b"\0" * 600, "more_body": False}])
        assert (status, body) == (413, {"error": "body_too_large", "status": 413, "message":
                                        "request body is over the limit of 1,000 bytes (the server's max_bytes)"})
        # the client goes away half-way through its body
        status, body = _raw_post(c, app, "/v1/segment", [(b"content-type", b"image/png")],
                                 [{"type": "http.request", "body": b"\0" * 100, "more_body": True},
                                  {"type": "http.disconnect"}])
        assert (status, body) == (400, {"error": "client_disconnected", "status": 400, "message":
                                        "the client closed the connection before the body ended"})
        r = c.post("/v1/segment", content=b"--x\r\n", headers={"content-type": "multipart/mixed; boundary=x"})
        assert r.status_code == 415 and r.json() == {"error": "unsupported_media_type", "status": 415,
                                                     "message": "Content-Type multipart/mixed: use multipart/form-data"}


def test_raw_body_errors_name_the_body_and_say_what_to_send(seg):
    with TestClient(create_app(seg)) as c:
        r = c.post("/v1/segment", content=b"%PDF-1.4 text", headers={"content-type": "image/png"})
        assert r.status_code == 400 and r.json()["message"].startswith("body: ")  # the raw body, by that name
        r = c.post("/v1/segment", content=b"x", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["message"] == (
            "Content-Type text/plain is not an image: send the file as the body with Content-Type image/jpeg, "
            "image/png, ... (or application/octet-stream), or as multipart/form-data")
