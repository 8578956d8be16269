"""`resunetpp serve`: the HTTP API, the WebSocket stream and the command, with FastAPI's test client
on a tiny trained disc model (CPU, seconds). Every prediction is compared with `Segmenter` itself."""

from __future__ import annotations

import base64
import builtins
import importlib.util
import io
import struct
import tempfile
import threading
import time
import warnings
import zlib

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'resunetpp[serve]'")
pytest.importorskip("python_multipart", reason="the serve extra is not installed: pip install 'resunetpp[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's "use httpx2" notice
    from fastapi.testclient import TestClient

from helpers.inference import disc_image, save_disc_checkpoint  # noqa: E402
from resunetpp import Segmenter, hub  # noqa: E402
from resunetpp.cli import app as cli_app  # noqa: E402
from resunetpp.inference.overlay import draw_overlay  # noqa: E402
from resunetpp.serve import ServeSettings, create_app  # noqa: E402
from resunetpp.serve import page as serve_page  # noqa: E402
from resunetpp.serve import state as serve_state  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_disc_checkpoint(tmp_path_factory.mktemp("serve-ckpt"))


@pytest.fixture(scope="module")
def seg(ckpt):
    return Segmenter(ckpt)


@pytest.fixture(scope="module")
def client(seg):
    with TestClient(create_app(seg, ServeSettings(max_pixels=1_000_000, max_bytes=4_000_000))) as c:
        yield c


def _image(h=96, w=128, seed=0):
    return disc_image(np.random.default_rng(seed), h, w)[0]


def _encode(image, fmt="PNG", **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(image).save(b, fmt, **kw)
    return b.getvalue()


def _png_array(data: bytes | str) -> np.ndarray:
    if isinstance(data, str):
        data = base64.b64decode(data)
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with a few bytes of data: a decompression bomb's front."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------
# endpoints
# ---------------------------------------------------------------------------------------------

def test_health_model_and_page(client, seg):
    h = client.get("/v1/health").json()
    assert h["status"] == "ok" and h["auth_required"] is False
    assert h["queue"] == {"pending": 0, "capacity": ServeSettings().queue_size}
    m = client.get("/v1/model").json()
    assert m["model"] == "resunetpp" and m["input_size"] == list(seg.input_size) and m["threshold"] == seg.threshold
    assert m["min_area"] == seg.min_area == 0.001
    assert m["parameters"] == sum(p.numel() for p in seg._run.model.parameters())
    assert m["backend"] == "torch" and "not a medical device" in m["intended_use"].lower()
    assert m["limits"]["max_pixels"] == 1_000_000 and m["limits"]["token"] is None
    page = client.get("/")
    assert page.status_code == 200 and "not a medical device" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("index.html", "app.js", "app.css"):  # works offline: nothing is fetched from elsewhere
        text = (serve_page.STATIC_DIR / name).read_text()
        assert "http://" not in text and "https://" not in text and "cdn" not in text.lower(), name
        assert client.get(f"/static/{name}").status_code == 200
    assert "/v1/segment" in client.get("/openapi.json").json()["paths"]
    assert client.get("/nowhere").json()["error"] == "not_found"


def test_segment_json_matches_segmenter(client, seg):
    image = _image()
    r = client.post("/v1/segment?polygons=true&prob=true", files={"file": ("a.png", _encode(image), "image/png")})
    assert r.status_code == 200, r.text
    j = r.json()
    mask, prob = seg.segment(image)
    assert (j["width"], j["height"]) == (128, 96) and j["threshold"] == seg.threshold
    assert j["model"]["name"] == "resunetpp" and j["model"]["input_size"] == list(seg.input_size)
    assert (_png_array(j["mask_png"]) > 0).tolist() == mask.tolist()
    rgb = _png_array(j["prob_png"])[:, :, ::-1].astype(np.int64)  # BGR from OpenCV -> RGB
    np.testing.assert_allclose((rgb[..., 0] * 256 + rgb[..., 1]) / 65535, prob, atol=1 / 65535)
    assert j["polyp"] is True and j["area_fraction"] == pytest.approx(mask.mean(), abs=1e-6)
    assert j["confidence"] == pytest.approx(prob[mask].mean(), abs=1e-4)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    assert j["components_total"] == n - 1 == len(j["components"]) >= 1
    big = j["components"][0]
    i = int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) + 1
    x, y, w, h, area = stats[i]
    assert big["box"] == [x, y, x + w, y + h] and big["area"] == area
    assert big["confidence"] == pytest.approx(prob[labels == i].mean(), abs=1e-4)
    poly = np.array(big["polygon"])
    assert poly.shape[1] == 2 and (poly[:, 0] >= x).all() and (poly[:, 0] <= x + w).all()
    drawn = np.zeros_like(mask, np.uint8)
    cv2.fillPoly(drawn, [poly.astype(np.int32)], 1)
    assert (drawn.astype(bool) & (labels == i)).sum() / area > 0.85  # the outline encloses the component
    assert set(j["timing_ms"]) == {"decode", "queue", "inference", "total"}
    # a threshold per request: the mask is prob > threshold
    j2 = client.post("/v1/segment?threshold=0.9", content=_encode(image), headers={"content-type": "image/png"}).json()
    assert j2["threshold"] == 0.9 and (_png_array(j2["mask_png"]) > 0).tolist() == (prob > 0.9).tolist()
    assert "prob_png" not in j2 and "polygon" not in j2["components"][0]


def test_segment_png_outputs_and_raw_body(client, seg):
    image = _image(80, 60, seed=3)
    mask, prob = seg.segment(image)
    body = _encode(image)
    for ctype in ("image/png", "application/octet-stream", None):
        headers = {"content-type": ctype} if ctype else {}
        r = client.post("/v1/segment?format=png", content=body, headers=headers)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert (_png_array(r.content) == mask.astype(np.uint8) * 255).all()
        assert r.headers["x-polyp"] == "1"
        assert float(r.headers["x-area-fraction"]) == pytest.approx(mask.mean(), abs=1e-6)
    png = {"content-type": "image/png"}
    r = client.post("/v1/segment?format=png&output=overlay&opacity=0.5", content=body, headers=png)
    assert (_png_array(r.content)[:, :, ::-1] == draw_overlay(image, mask, alpha=0.5)).all()
    r = client.post("/v1/segment?format=png&output=prob", content=body, headers={"content-type": "image/png"})
    assert (_png_array(r.content) == np.round(prob * 255).astype(np.uint8)).all()


@pytest.mark.parametrize("kind", ["jpeg", "gray", "rgba", "png16", "palette", "tiff", "tiff-planar", "bmp", "webp"])
def test_formats_decode_like_read_image(client, seg, tmp_path, kind):
    from resunetpp.io import read_image

    image = _image(40, 56, seed=5)
    if kind == "jpeg":
        data = _encode(image, "JPEG", quality=95)
    elif kind == "gray":
        data = _encode(image[:, :, 0])
    elif kind == "rgba":
        data = _encode(np.dstack([image, np.full(image.shape[:2], 128, np.uint8)]))
    elif kind == "png16":
        ok, buf = cv2.imencode(".png", image[:, :, 0].astype(np.uint16) * 257)
        data = buf.tobytes()
    elif kind == "palette":
        b = io.BytesIO()
        Image.fromarray(image).convert("P").save(b, "PNG")
        data = b.getvalue()
    elif kind == "tiff":
        b = io.BytesIO()
        tifffile.imwrite(b, image)
        data = b.getvalue()
    elif kind == "tiff-planar":  # (3, H, W), as some CVC-ClinicDB files: Pillow cannot read it
        b = io.BytesIO()
        tifffile.imwrite(b, np.moveaxis(image, -1, 0), planarconfig="separate", photometric="rgb")
        data = b.getvalue()
    else:
        data = _encode(image, kind.upper())
    r = client.post("/v1/segment", files={"file": (f"x.{kind}", data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    ext = "tif" if "tiff" in kind else "png" if kind in ("gray", "rgba", "png16", "palette") else kind
    path = tmp_path / f"x.{ext}"
    path.write_bytes(data)
    mask, _ = seg.segment(read_image(path))  # the same pixels as `resunetpp predict` reads from the file
    assert (_png_array(r.json()["mask_png"]) > 0).tolist() == mask.tolist()


def test_batch_keeps_order_and_isolates_bad_images(client, seg):
    images = [_image(64, 64, seed=s) for s in (1, 2)] + [_image(50, 90, seed=4)]
    files = [("files", ("a.png", _encode(images[0]), "image/png")),
             ("files", ("broken.jpg", b"\xff\xd8\xff\xe0 not really", "image/jpeg")),
             ("files", ("b.jpg", _encode(images[1], "JPEG", quality=95), "image/jpeg")),
             ("files", ("notes.txt", b"hello", "text/plain")),
             ("files", ("c.png", _encode(images[2]), "image/png"))]
    r = client.post("/v1/segment/batch", files=files, data={"comment": "ignored form field"})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["images"] == 5 and j["failed"] == 2
    assert [x["name"] for x in j["results"]] == ["a.png", "broken.jpg", "b.jpg", "notes.txt", "c.png"]
    assert j["results"][1]["error"] in ("not_an_image", "truncated", "corrupt_image")
    assert j["results"][3]["error"] == "unsupported_media_type" and j["results"][3]["status"] == 415
    decoded = [images[0], np.asarray(Image.open(io.BytesIO(_encode(images[1], "JPEG", quality=95)))), images[2]]
    expected = seg.segment_batch(decoded)
    for res, (mask, _) in zip([j["results"][i] for i in (0, 2, 4)], expected):
        assert (_png_array(res["mask_png"]) > 0).tolist() == mask.tolist()


# ---------------------------------------------------------------------------------------------
# bad input: a clear 4xx naming the problem, never a 500 (the test client re-raises server errors)
# ---------------------------------------------------------------------------------------------

BOMB = _png_header(100_000, 100_000)  # 10 G pixels: Pillow's own guard
WIDE = _png_header(2_000, 1_000)  # 2 M pixels: over this server's 1 M limit, under Pillow's


def _bad_cases():
    good = _encode(_image())
    jpeg = _encode(_image(), "JPEG")
    return [
        ("empty raw body", dict(content=b"", headers={"content-type": "image/png"}), 400, "empty", "0 bytes"),
        ("empty file part", dict(files={"file": ("e.png", b"", "image/png")}), 400, "empty", "e.png"),
        ("not an image", dict(content=b"%PDF-1.4 definitely text", headers={"content-type": "image/png"}), 400,
         "not_an_image", "not an image"),
        ("truncated png", dict(content=good[: len(good) // 2], headers={"content-type": "image/png"}), 400,
         "truncated", "truncated"),
        ("truncated jpeg", dict(files={"file": ("t.jpg", jpeg[: len(jpeg) * 2 // 3], "image/jpeg")}), 400,
         "truncated", "t.jpg"),
        ("wrong content type", dict(content=good, headers={"content-type": "text/plain"}), 415,
         "unsupported_media_type", "text/plain"),
        ("json body", dict(json={"image": "x"}), 415, "unsupported_media_type", "application/json"),
        ("wrong part type", dict(files={"file": ("a.txt", good, "text/plain")}), 415, "unsupported_media_type",
         "a.txt"),
        ("decompression bomb", dict(content=BOMB, headers={"content-type": "image/png"}), 413, "too_many_pixels",
         "pixels"),
        ("over the pixel limit", dict(files={"file": ("w.png", WIDE, "image/png")}), 413, "too_many_pixels",
         "2,000,000"),
        ("over the size limit", dict(content=b"\x00" * 4_000_001, headers={"content-type": "image/png"}), 413,
         "body_too_large", "4,000,000"),
        ("no file part", dict(data={"name": "x"}, files={"other": (None, "y")}), 400, "no_image", "file"),
        ("two files", dict(files=[("file", ("a.png", good, "image/png")), ("file", ("b.png", good, "image/png"))]),
         400, "too_many_images", "batch"),
        ("bad multipart", dict(content=b"--xyz\r\nnonsense", headers={"content-type": "multipart/form-data"}), 400,
         "bad_multipart", "boundary"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_gets_a_clear_4xx(client, case):
    _, kwargs, status, code, words = case
    r = client.post("/v1/segment", **kwargs)
    assert r.status_code == status, r.text
    j = r.json()
    assert j["error"] == code and j["status"] == status and words in j["message"], j


def test_bad_parameters_and_batch_limits(client):
    good = _encode(_image())
    r = client.post("/v1/segment?threshold=1.5", content=good, headers={"content-type": "image/png"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_parameter" and "threshold" in r.json()["message"]
    r = client.post("/v1/segment?format=gif", content=good, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "format" in r.json()["message"]
    r = client.post("/v1/segment/batch", content=good, headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart" in r.json()["message"]
    r = client.post("/v1/segment/batch", files=[("files", (f"{i}.png", good, "image/png")) for i in range(17)])
    assert r.status_code == 413 and r.json()["error"] == "too_many_images" and "16" in r.json()["message"]
    assert client.get("/v1/segment").status_code == 405


def test_nothing_is_written_to_disk(client, seg, monkeypatch):
    """A 2.3 MB upload (over Starlette's 1 MB spooling threshold) is decoded without a file."""
    big = np.random.default_rng(0).integers(0, 256, (700, 1100, 3), dtype=np.uint8)
    data = _encode(big)
    assert len(data) > 2_000_000
    real_open = builtins.open

    def no_files(*a, **k):
        raise AssertionError(f"the server created a file: {a} {k}")

    def guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            raise AssertionError(f"the server opened {file!r} for writing")
        return real_open(file, mode, *a, **k)

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_files)
    monkeypatch.setattr(builtins, "open", guarded_open)
    r = client.post("/v1/segment", files={"file": ("big.png", data, "image/png")})
    assert r.status_code == 200, r.text
    r = client.post("/v1/segment/batch", files=[("files", ("big.png", data, "image/png")),
                                                 ("files", ("small.jpg", _encode(_image(), "JPEG"), "image/jpeg"))])
    assert r.status_code == 200 and r.json()["failed"] == 0


# ---------------------------------------------------------------------------------------------
# token
# ---------------------------------------------------------------------------------------------

def test_token_required_when_set(seg, monkeypatch):
    calls = []
    real = serve_state.hmac.compare_digest
    monkeypatch.setattr(serve_state.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    good = _encode(_image())
    with TestClient(create_app(seg, ServeSettings(token="s3cret-token"))) as c:
        assert c.get("/v1/health").json()["auth_required"] is True  # health stays open
        assert c.get("/").status_code == 200  # so does the page (it asks for the token)
        r = c.get("/v1/model")
        assert r.status_code == 401 and r.json()["error"] == "missing_token" and "Bearer" in r.json()["message"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/segment", content=good, headers={"content-type": "image/png",
                                                          "authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"] == "invalid_token"
        r = c.post("/v1/segment/batch", files={"files": ("a.png", good, "image/png")})
        assert r.status_code == 401
        auth = {"authorization": "Bearer s3cret-token"}
        assert c.get("/v1/model", headers=auth).status_code == 200
        r = c.post("/v1/segment", content=good, headers={"content-type": "image/png", **auth})
        assert r.status_code == 200 and r.json()["polyp"] is True
        assert c.post("/v1/segment", content=good, headers={"content-type": "image/png", "authorization":
                                                             "bearer s3cret-token"}).status_code == 200
        assert calls, "the token is compared with hmac.compare_digest"
        from starlette.websockets import WebSocketDisconnect

        with pytest.raises(WebSocketDisconnect) as e, c.websocket_connect("/v1/stream") as ws:
            ws.receive_json()
        assert e.value.code == 1008
        with c.websocket_connect("/v1/stream?token=s3cret-token") as ws:
            ws.send_bytes(good)
            assert ws.receive_json()["frame"] == 1
    with TestClient(create_app(seg)) as c:  # token off: no header needed
        assert c.get("/v1/model").status_code == 200


# ---------------------------------------------------------------------------------------------
# load: the bounded queue and the stream's stale frames
# ---------------------------------------------------------------------------------------------

class _Gated:
    """Wraps Segmenter.probabilities: each call waits until released (the first `free` calls run at once)."""

    def __init__(self, seg, free=0):
        self.real, self.free, self.calls = seg.probabilities, free, 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, images):
        self.calls += 1
        if self.calls > self.free:
            self.entered.set()
            assert self.release.wait(120), "test never released the model"
        return self.real(images)


def _wait_until(cond, timeout=120.0):  # a deadline for a hang, not a speed check
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_full_queue_answers_503_with_retry_after(ckpt):
    seg = Segmenter(ckpt)
    gated = _Gated(seg)
    seg.probabilities = gated
    app = create_app(seg, ServeSettings(queue_size=2))
    good = _encode(_image())
    results = []
    with TestClient(app) as c:
        def post():
            results.append(c.post("/v1/segment", content=good, headers={"content-type": "image/png"}))

        workers = [threading.Thread(target=post) for _ in range(2)]
        for w in workers:
            w.start()
        _wait_until(lambda: app.state.gate.pending == 2 and gated.entered.is_set())
        r = c.post("/v1/segment", content=good, headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["error"] == "busy" and "queue size 2" in r.json()["message"]
        assert int(r.headers["retry-after"]) >= 1
        r = c.post("/v1/segment/batch", files={"files": ("a.png", good, "image/png")})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert c.get("/v1/health").json()["queue"] == {"pending": 2, "capacity": 2}
        gated.release.set()
        for w in workers:
            w.join(120)
        assert [r.status_code for r in results] == [200, 200]  # admitted requests are all answered
        assert app.state.gate.pending == 0 and app.state.stats.busy_rejections == 2
        assert c.post("/v1/segment", content=good, headers={"content-type": "image/png"}).status_code == 200


def test_stream_drops_stale_frames_and_answers_the_newest(ckpt):
    seg = Segmenter(ckpt)
    gated = _Gated(seg)
    seg.probabilities = gated
    app = create_app(seg)
    frames = [_encode(_image(48, 64, seed=s), "JPEG", quality=90) for s in range(6)]
    with TestClient(app) as c, c.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(frames[0])
        _wait_until(gated.entered.is_set)  # frame 1 is in the model
        for f in frames[1:5]:  # frames 2..5 arrive while it runs: 2, 3, 4 go stale
            ws.send_bytes(f)
        _wait_until(lambda: app.state.stats.frames_received == 5)
        gated.release.set()
        a1, a5 = ws.receive_json(), ws.receive_json()
        assert a1["frame"] == 1 and a1["dropped"] == 3  # "dropped": stale frames skipped so far
        assert a5["frame"] == 5 and a5["dropped"] == 3  # the newest, never 2..4
        assert app.state.stats.frames_dropped == 3
        mask, _ = seg.segment(np.asarray(Image.open(io.BytesIO(frames[4])).convert("RGB")))
        assert (_png_array(a5["mask_png"]) > 0).tolist() == mask.tolist()
        assert a5["latency_ms"] >= a5["inference_ms"] >= 0
        assert a5["area_fraction"] == pytest.approx(mask.mean(), abs=5e-7)  # rounded to 6 decimals
        ws.send_bytes(b"not a jpeg")  # a bad frame gets an error answer; the stream goes on
        bad = ws.receive_json()
        assert bad["frame"] == 6 and bad["error"] == "not_an_image"
        ws.send_text('{"output": "overlay", "threshold": 0.8}')
        ws.send_bytes(frames[5])
        a7 = ws.receive_json()
        assert a7["frame"] == 7 and a7["threshold"] == 0.8 and "overlay_jpeg" in a7 and "mask_png" not in a7
        ws.send_text('{"threshold": 7}')
        assert ws.receive_json()["error"] == "invalid_parameter"
    _wait_until(lambda: app.state.stats.streams == 0)


def test_stream_limit(seg):
    app = create_app(seg, ServeSettings(max_streams=1))
    with TestClient(app) as c, c.websocket_connect("/v1/stream") as ws1:
        ws1.send_bytes(_encode(_image()))
        assert ws1.receive_json()["frame"] == 1
        with c.websocket_connect("/v1/stream") as ws2:
            msg = ws2.receive_json()
            assert msg["error"] == "busy" and "limit is 1" in msg["message"]


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_uvicorn(monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.delenv("RESUNETPP_TOKEN", raising=False)
    return calls


def test_cli_serves_on_loopback_by_default(ckpt, fake_uvicorn):
    r = runner.invoke(cli_app, ["serve", "--weights", str(ckpt), "--port", "8123", "--queue-size", "3"])
    assert r.exit_code == 0, r.output
    app, kw = fake_uvicorn[0]
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123 and "warning" not in r.output
    assert app.state.settings.queue_size == 3 and app.state.settings.token is None
    assert "not a medical device" in r.output


def test_cli_other_hosts_need_a_token(ckpt, fake_uvicorn, monkeypatch):
    r = runner.invoke(cli_app, ["serve", "--weights", str(ckpt), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "token is required" in r.output and "RESUNETPP_TOKEN" in r.output
    assert not fake_uvicorn
    r = runner.invoke(cli_app, ["serve", "--weights", str(ckpt), "--host", "0.0.0.0", "--token", "abc"])
    assert r.exit_code == 0 and "warning: binding to 0.0.0.0" in r.output
    assert fake_uvicorn[-1][1]["host"] == "0.0.0.0" and fake_uvicorn[-1][0].state.settings.token == "abc"
    monkeypatch.setenv("RESUNETPP_TOKEN", "from-env")
    r = runner.invoke(cli_app, ["serve", "--weights", str(ckpt), "--host", "10.1.2.3"])
    assert r.exit_code == 0 and fake_uvicorn[-1][0].state.settings.token == "from-env"


def test_cli_without_a_websocket_library_serves_with_the_stream_off(ckpt, fake_uvicorn, monkeypatch):
    assert fake_uvicorn == [] and runner.invoke(cli_app, ["serve", "--weights", str(ckpt)]).exit_code == 0
    assert fake_uvicorn[-1][1]["ws"] == "auto"  # the dev extra installs websockets
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("websockets", "wsproto") else real(name, *a))
    r = runner.invoke(cli_app, ["serve", "--weights", str(ckpt)])
    assert r.exit_code == 0 and "neither websockets nor wsproto is installed" in r.output
    assert fake_uvicorn[-1][1]["ws"] == "none"


def test_cli_without_weights_says_how_to_get_some(fake_uvicorn, monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "WEIGHTS_DIR", tmp_path / "none")
    try:
        hub.bundled_weights()
        pytest.fail("bundled weights resolve without WEIGHTS_DIR")
    except FileNotFoundError:
        pass
    r = runner.invoke(cli_app, ["serve"])  # docs/cli.md: no bundled weights, weights not found: exit 3
    assert r.exit_code == 3 and "resunetpp train" in r.output and not fake_uvicorn
    r = runner.invoke(cli_app, ["serve", "--weights", str(tmp_path / "missing")])
    assert r.exit_code == 3 and "error:" in r.output


def test_a_model_failure_is_a_json_500_and_the_server_goes_on(ckpt):
    seg = Segmenter(ckpt)
    real = seg.probabilities
    calls = []

    def flaky(images):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(images)

    seg.probabilities = flaky
    app = create_app(seg)
    good = _encode(_image())
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/segment", content=good, headers={"content-type": "image/png"})
        assert r.status_code == 500 and r.json()["error"] == "internal_error" and "simulated" in r.json()["message"]
        assert app.state.gate.pending == 0  # the slot was given back
        assert c.post("/v1/segment", content=good, headers={"content-type": "image/png"}).status_code == 200
