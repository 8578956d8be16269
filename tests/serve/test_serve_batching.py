"""serve under load: dynamic batching into one forward pass, admission by expected wait, queue time per
request, idle WebSocket streams closed (an injected clock: no sleep races a clock), and one image decoder
for the CLI and the server (a multi-page TIFF is refused by both)."""

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from resunetpp import create_model, save_pretrained  # noqa: E402
from resunetpp.cli import app as cli_app  # noqa: E402
from resunetpp.inference.segmenter import Segmenter  # noqa: E402
from resunetpp.io import ImageReadError, read_image  # noqa: E402
from resunetpp.serve import ServeSettings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return save_pretrained(create_model("resunetpp", filters=(4, 4, 4, 4, 4)), folder,
                           {"model": "resunetpp", "model_kwargs": {"filters": [4, 4, 4, 4, 4]}, "input_size": [32, 32]})


def _png(seed=0, h=40, w=48) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(b, "PNG")
    return b.getvalue()


def _wait_until(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


class _Held:
    """Wraps Segmenter.probabilities: the first call blocks until released; every call's batch size is kept."""

    def __init__(self, seg):
        self.real, self.sizes = seg.probabilities, []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, images):
        self.sizes.append(len(images))
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.release.wait(20), "test never released the model"
        return self.real(images)


def test_concurrent_requests_share_one_forward_pass(ckpt):
    seg = Segmenter(ckpt, device="cpu")
    held = _Held(seg)
    seg.probabilities = held
    app = create_app(seg, ServeSettings(infer_batch=8, batch_wait_ms=0))
    bodies = [_png(s) for s in range(6)]
    results = {}
    with TestClient(app) as c:
        def post(i):
            results[i] = c.post("/v1/segment", content=bodies[i], headers={"content-type": "image/png"})

        first = threading.Thread(target=post, args=(0,))
        first.start()
        _wait_until(held.entered.is_set)  # request 0 is in the model; 1..5 queue behind it
        rest = [threading.Thread(target=post, args=(i,)) for i in range(1, 6)]
        for t in rest:
            t.start()
        _wait_until(lambda: app.state.gate.images_waiting == 6)
        held.release.set()
        for t in [first, *rest]:
            t.join(20)
    assert held.sizes == [1, 5]  # the five waiting images went through the model together
    assert all(r.status_code == 200 for r in results.values())
    for i in range(1, 6):  # each answer is its own image's, and says it was batched and how long it queued
        j = results[i].json()
        mask, _ = Segmenter(ckpt, device="cpu").segment(read_image_bytes(bodies[i]))
        assert j["batch_images"] == 5 and j["timing_ms"]["queue"] > 0
        assert (j["width"], j["height"]) == (48, 40) and j["area_fraction"] == pytest.approx(mask.mean(), abs=1e-6)
    assert results[0].json()["batch_images"] == 1
    assert app.state.gate.images_waiting == 0 and app.state.gate.pending == 0


def read_image_bytes(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_batch_never_exceeds_infer_batch(ckpt):
    seg = Segmenter(ckpt, device="cpu")
    held = _Held(seg)
    seg.probabilities = held
    app = create_app(seg, ServeSettings(infer_batch=3, batch_wait_ms=0))
    with TestClient(app) as c:
        threads = [threading.Thread(target=c.post, args=("/v1/segment",),
                                    kwargs={"content": _png(i), "headers": {"content-type": "image/png"}})
                   for i in range(8)]
        threads[0].start()
        _wait_until(held.entered.is_set)
        for t in threads[1:]:
            t.start()
        _wait_until(lambda: app.state.gate.images_waiting == 8)
        held.release.set()
        for t in threads:
            t.join(20)
    assert held.sizes[0] == 1 and max(held.sizes) <= 3 and sum(held.sizes) == 8


def test_admission_by_expected_wait_not_by_count(ckpt):
    seg = Segmenter(ckpt, device="cpu")
    app = create_app(seg, ServeSettings(max_queue_s=2.0))
    gate = app.state.gate
    with TestClient(app) as c:
        ok = c.post("/v1/segment", content=_png(), headers={"content-type": "image/png"})
        assert ok.status_code == 200
        gate.s_per_image = 0.5  # the model's recent time per image, as measured
        gate.images_waiting = 2  # (2 + 1) x 0.5 s = 1.5 s <= 2 s: admitted, though 8 were the old fixed limit
        assert gate.expected_wait_s() == pytest.approx(1.5)
        assert gate.try_enter() and gate.pending == 1
        gate.leave(0.1)
        gate.images_waiting = 5  # (5 + 1) x 0.5 = 3 s > 2 s: refused, with the time to wait
        r = c.post("/v1/segment", content=_png(), headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["error"] == "busy"
        assert "wait about 3.0 s" in r.json()["message"] and r.headers["retry-after"] == "1"
        h = c.get("/v1/health").json()["batching"]
        assert h["expected_wait_s"] == 3.0 and h["max_queue_s"] == 2.0 and h["infer_batch"] == 1  # CPU default
        gate.images_waiting = 0


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_idle_stream_is_closed_after_the_timeout(ckpt):
    clock = _Clock()
    seg = Segmenter(ckpt, device="cpu")
    app = create_app(seg, ServeSettings(max_streams=1, stream_idle_s=30), clock=clock, idle_poll_s=0.01)
    with TestClient(app) as c, c.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(_png())
        answer = ws.receive_json()
        assert answer["frame"] == 1 and answer["queue_ms"] >= 0
        clock.now += 29  # not idle long enough: the stream stays (however much real time passes)
        ws.send_bytes(_png(1))
        assert ws.receive_json()["frame"] == 2
        clock.now += 31  # silent past the timeout
        msg = ws.receive_json()
        assert msg["error"] == "idle_timeout" and "30 s" in msg["message"]
        _wait_until(lambda: app.state.stats.streams == 0)
        assert app.state.stats.streams_idle_closed == 1
        with c.websocket_connect("/v1/stream") as ws2:  # the slot is free again
            ws2.send_bytes(_png(2))
            assert ws2.receive_json()["frame"] == 1


def _multipage_tiff(path=None) -> bytes:
    import tifffile

    b = io.BytesIO()
    with tifffile.TiffWriter(b) as tif:
        for s in range(3):
            tif.write(np.full((16, 16, 3), 40 * s, np.uint8), photometric="rgb")
    if path is not None:
        path.write_bytes(b.getvalue())
    return b.getvalue()


def test_multi_page_tiff_is_treated_alike_by_cli_and_server(ckpt, tmp_path):
    data = _multipage_tiff(tmp_path / "stack.tif")
    with pytest.raises(ImageReadError, match="a TIFF of 3 pages") as info:
        read_image(tmp_path / "stack.tif")
    assert info.value.code == "multi_page"
    r = CliRunner().invoke(cli_app, ["predict", str(tmp_path / "stack.tif"), "--out", str(tmp_path / "out"),
                                     "--weights", str(ckpt), "--device", "cpu"])
    assert r.exit_code == 1 and "a TIFF of 3 pages" in r.output
    with TestClient(create_app(Segmenter(ckpt, device="cpu"))) as c:
        r = c.post("/v1/segment", content=data, headers={"content-type": "image/tiff"})
    assert r.status_code == 400 and r.json()["error"] == "not_an_image" and "a TIFF of 3 pages" in r.json()["message"]


def test_one_page_tiff_reads_the_same_in_cli_and_server(ckpt, tmp_path):
    import tifffile

    image = np.random.default_rng(3).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "one.tif", image, photometric="rgb")
    assert (read_image(tmp_path / "one.tif") == image).all()
    from resunetpp.serve.decode import decode_image

    assert (decode_image((tmp_path / "one.tif").read_bytes()) == image).all()


def test_serve_settings_are_checked():
    for bad in (dict(infer_batch=0), dict(max_queue_s=0), dict(max_queue_s=float("nan")), dict(stream_idle_s=-1),
                dict(batch_wait_ms=-1), dict(queue_size=True)):
        with pytest.raises(ValueError):
            ServeSettings(**bad)


def test_cpu_workers_default_to_the_cores_and_a_lone_request_gets_them_all(ckpt):
    """On a CPU with torch the server runs up to 4 forward passes at once, sharing the cores by the load; a
    request alone is run on every core (its answer says how many threads it had)."""
    import torch

    app = create_app(Segmenter(ckpt, device="cpu"), ServeSettings())
    cores = torch.get_num_threads()
    with TestClient(app) as c:
        r = c.post("/v1/segment", content=_png(), headers={"content-type": "image/png"})
        h = c.get("/v1/health").json()["batching"]
    assert r.status_code == 200 and r.json()["threads"] == cores
    assert h["infer_workers"] == min(cores, 4) and h["running"] == 0
    assert app.state.batcher.set_threads is torch.set_num_threads and app.state.batcher.cores == cores
    assert torch.get_num_threads() == cores  # the server's thread counts stay on its own threads


def _scenario(run_model, body, workers=2, cores=2):
    """Run `body(batcher)` on a fresh event loop with a Batcher that records each pass's thread count."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from resunetpp.serve.batching import Batcher, Gate

    async def main():
        with ThreadPoolExecutor(workers) as pool:
            batcher = Batcher(run_model, pool, Gate(64), max_images=1, max_wait_s=0, workers=workers,
                              set_threads=lambda n: None, cores=cores)
            try:
                return await body(batcher)
            finally:
                batcher.close()

    return asyncio.run(main())


def _zeros(images):
    return [np.zeros(im.shape[:2], np.float32) for im in images]


IMAGE = np.zeros((4, 4, 3), np.uint8)


def test_queued_requests_run_side_by_side_each_on_its_share_of_the_cores():
    """Two requests queued at once run at the same time (each waits at a barrier only both together pass),
    one thread each on two cores; four queued on four cores with two workers: two threads each."""
    import asyncio

    barrier = threading.Barrier(2, timeout=20)

    def both(images):
        barrier.wait()
        return _zeros(images)

    async def two(batcher):
        return await asyncio.gather(*(batcher.submit([IMAGE]) for _ in range(2)))

    assert [a.threads for a in _scenario(both, two)] == [1, 1] and not barrier.broken

    async def four(batcher):
        return await asyncio.gather(*(batcher.submit([IMAGE]) for _ in range(4)))

    assert [a.threads for a in _scenario(_zeros, four, workers=2, cores=4)] == [2, 2, 2, 2]


def test_a_request_waits_while_a_pass_holds_every_core():
    """A lone request runs on all cores; one arriving meanwhile does not start beside it (that would put
    three threads on two cores) but waits, then, alone again, gets all the cores too."""
    import asyncio

    entered, release = threading.Event(), threading.Event()
    calls = []

    def held_first(images):
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            assert release.wait(20), "never released"
        return _zeros(images)

    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit([IMAGE]))
        while not entered.is_set():
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(batcher.submit([IMAGE]))
        for _ in range(50):  # every worker gets its turns on the loop
            await asyncio.sleep(0)
        assert batcher.running == 1 and batcher.threads_used == 2 and len(calls) == 1
        release.set()
        return await first, await second

    first, second = _scenario(held_first, body)
    assert (first.threads, second.threads) == (2, 2) and len(calls) == 2


def test_expected_wait_counts_passes_side_by_side():
    """A pass of 0.4 s on half the machine drains the queue at 0.2 s per image."""
    from resunetpp.serve.batching import Gate

    gate = Gate(8)
    gate.observe_batch(1, 0.4, share=0.5)
    gate.images_waiting = 3
    assert gate.s_per_image == pytest.approx(0.2) and gate.expected_wait_s() == pytest.approx((3 + 1) * 0.2)


def test_a_second_worker_takes_what_is_queued_while_the_first_runs():
    """Two submissions queued before any worker ran: the worker that takes the first must leave the second to
    the idle one (it once cleared the wake-up and left it queued behind its own forward pass: with a forward
    pass that waits for a second one, as here, the first never returned)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from resunetpp.serve.batching import Batcher, Gate

    barrier, threads = threading.Barrier(2, timeout=20), set()

    def run_model(images):
        threads.add(threading.get_ident())
        barrier.wait()  # passes only with both forward passes under way at once
        return [np.zeros(im.shape[:2], np.float32) for im in images]

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            batcher = Batcher(run_model, pool, Gate(8), max_images=1, max_wait_s=0, workers=2)
            image = np.zeros((4, 4, 3), np.uint8)
            answers = await asyncio.gather(batcher.submit([image]), batcher.submit([image]))
            batcher.close()
            return answers

    answers = asyncio.run(scenario())
    assert [a.batch_images for a in answers] == [1, 1] and len(threads) == 2 and not barrier.broken
