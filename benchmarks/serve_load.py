"""Load test of `resunetpp serve`: N concurrent clients against 127.0.0.1 for a bounded time and count.

    python benchmarks/serve_load.py --clients 8 --duration 30                  # starts its own server
    python benchmarks/serve_load.py --weights runs/kvasir --clients 16 --duration 60 --bad-fraction 0.1
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 4    # a server already running
    python benchmarks/serve_load.py --clients 20 --images 200 --baseline      # issue 25's goal (see below)

With --images N each phase sends exactly N requests (no time limit); --baseline first sends the same N
images from one client, one by one, to the same server, so the table compares concurrent throughput
with sequential throughput measured in the same run (the goal: >= 1.5x with 0 errors and 0 refusals).
The server runs with its default settings unless --queue-size is given.

Without --url it starts `resunetpp serve` in a subprocess on a free port with --weights, or with a
randomly initialised checkpoint (--model default: the full 4.06 M-parameter ResUNet++ at 256x256, the
real compute cost; tiny: a narrow one, to load the HTTP layer). Each client posts a synthetic JPEG
(--image-size) to /v1/segment in a loop and checks every answer (status, JSON fields, the mask's size).
With --bad-fraction some requests carry broken bodies (truncated, not an image, 0 bytes), which
must get a 4xx. A 503 is counted apart and the client waits for its Retry-After (at most 1 s).

Reports requests/s (answered 200s per second), p50/p90/p99 latency of the 200s, errors (unexpected
status, invalid body, connection error or timeout: "lost"), 503s, and the server's resident memory
(VmRSS from /proc) after warm-up, at the end and its peak during the run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from latency import cpu_flags, cpu_model


@dataclass
class Tally:
    ok_latencies: list[float] = field(default_factory=list)
    busy: int = 0
    expected_4xx: int = 0
    errors: list[str] = field(default_factory=list)
    sent: int = 0
    answered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def synthetic_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    r = 0.2 * min(width, height)
    disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 <= r * r
    img = rng.normal(70, 12, (height, width, 3))
    img[disc] = rng.normal((200, 110, 90), 12, (int(disc.sum()), 3))
    b = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(b, "JPEG", quality=90)
    return b.getvalue()


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return out


def make_checkpoint(kind: str, folder: Path) -> Path:
    import resunetpp

    if kind == "tiny":
        model = resunetpp.create_model("resunetpp", filters=(8, 16, 32, 64, 128))
        size = [128, 128]
    else:
        model = resunetpp.create_model("resunetpp")
        size = [256, 256]
    kwargs = {"filters": [8, 16, 32, 64, 128]} if kind == "tiny" else {}
    return resunetpp.save_pretrained(model, folder, {"model": "resunetpp", "model_kwargs": kwargs, "input_size": size})


def model_ceiling(weights: Path, jpeg: bytes) -> dict:
    """`model_alone` in a fresh process (this one's client threads and memory would skew it)."""
    with tempfile.TemporaryDirectory(prefix="serve-load-ceiling-") as tmp:
        image = Path(tmp) / "image.jpg"
        image.write_bytes(jpeg)
        out = subprocess.run([sys.executable, __file__, "--model-alone", str(weights), str(image)],
                             capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def model_alone(weights: Path, jpeg: Path, seconds: float = 8.0) -> dict:
    """The server's model alone on this CPU, without HTTP, JSON or decoding: images per second of
    `Segmenter.probabilities` on every core at batch 1, 2 and 4, and with one one-thread pass per core side
    by side. No schedule can serve more requests per second than the best of these."""
    import torch

    from resunetpp import Segmenter
    from resunetpp.io import read_image

    image = read_image(jpeg)
    seg = Segmenter(weights, device="cpu")
    cores = torch.get_num_threads()

    def rate(passes: int, threads: int, batch: int) -> float:
        counts, start = [0] * passes, threading.Barrier(passes + 1)

        def loop(i: int) -> None:
            torch.set_num_threads(threads)  # this thread's own count
            seg.probabilities([image] * batch)  # warm-up
            start.wait()
            while time.perf_counter() < stop[0]:
                seg.probabilities([image] * batch)
                counts[i] += batch

        stop = [float("inf")]
        workers = [threading.Thread(target=loop, args=(i,)) for i in range(passes)]
        for t in workers:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        stop[0] = t0 + seconds
        for t in workers:
            t.join()
        return sum(counts) / (time.perf_counter() - t0)

    # the best of two rounds each: one round's figure can dip while the stopped server's memory is freed
    out = {f"all {cores} cores, batch {b}": round(max(rate(1, cores, b) for _ in range(2)), 2) for b in (1, 2, 4)}
    out[f"{cores} one-thread passes side by side"] = round(max(rate(cores, 1, 1) for _ in range(2)), 2)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, weights: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from resunetpp.cli import app; app()", "serve", "--weights", str(weights),
           "--port", str(port), "--log-level", "warning", "--precision", args.precision]
    if args.queue_size is not None:
        cmd += ["--queue-size", str(args.queue_size)]
    cmd += args.serve_args.split()
    if args.device:
        cmd += ["--device", args.device]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 120) -> dict:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            return httpx.get(url + "/v1/health", timeout=2).json()
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"no answer from {url}/v1/health within {timeout} s")


def bad_body(good: bytes, rng: random.Random) -> bytes:
    return rng.choice([good[: len(good) // 2], b"this is not an image", b"", good[:50]])


def client_loop(url: str, good: bytes, size: tuple[int, int], args, tally: Tally, stop_at: float, budget: list[int],
                seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    headers = {"content-type": "image/jpeg"}
    if args.token:
        headers["authorization"] = f"Bearer {args.token}"
    with httpx.Client(timeout=args.timeout) as http:
        while time.monotonic() < stop_at:
            with tally.lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
                tally.sent += 1
            bad = rng.random() < args.bad_fraction
            body = bad_body(good, rng) if bad else good
            t = time.perf_counter()
            try:
                r = http.post(url + "/v1/segment", content=body, headers=headers)
            except Exception as e:
                with tally.lock:
                    tally.errors.append(f"lost: {type(e).__name__}: {e}")
                continue
            dt = time.perf_counter() - t
            with tally.lock:
                tally.answered += 1
            problem = check(r, bad, size)
            with tally.lock:
                if problem:
                    tally.errors.append(problem)
                elif r.status_code == 503:
                    tally.busy += 1
                elif bad:
                    tally.expected_4xx += 1
                else:
                    tally.ok_latencies.append(dt)
            if r.status_code == 503:
                time.sleep(min(1.0, float(r.headers.get("retry-after", 1))))


def check(r, bad: bool, size: tuple[int, int]) -> str | None:
    if r.status_code == 503:
        return None if "retry-after" in r.headers else "503 without Retry-After"
    try:
        j = r.json()
    except Exception:
        return f"{r.status_code}: body is not JSON"
    if bad:
        ok = 400 <= r.status_code < 500 and "error" in j and "message" in j
        return None if ok else f"broken body got {r.status_code} {j}"
    if r.status_code != 200:
        return f"{r.status_code} {j}"
    if (j.get("width"), j.get("height")) != size:
        return f"wrong size {j.get('width')}x{j.get('height')}"
    import cv2

    mask = cv2.imdecode(np.frombuffer(base64.b64decode(j["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.shape != (size[1], size[0]):
        return "mask_png missing or of the wrong size"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--weights", help="checkpoint for the server it starts (default: random init, --model)")
    p.add_argument("--model", choices=("default", "tiny"), default="default")
    p.add_argument("--device", default=None, help="server's torch device (cpu, cuda)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (after warm-up)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    p.add_argument("--image-size", default="384x288", help="WxH of the synthetic JPEG")
    p.add_argument("--queue-size", type=int, default=None, help="--queue-size of the server it starts (default: "
                   "the server's)")
    p.add_argument("--serve-args", default="", help="more options of the server it starts, e.g. '--infer-workers 2'")
    p.add_argument("--images", type=int, default=None, help="send exactly this many requests per phase (no time "
                   "limit)")
    p.add_argument("--baseline", action="store_true", help="first send the same images from one client, one by one")
    p.add_argument("--bad-fraction", type=float, default=0.0, help="share of requests with broken bodies")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request (s)")
    p.add_argument("--token", default=os.environ.get("RESUNETPP_TOKEN"))
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--ceiling", action="store_true", help="after the load, with the server stopped, time its model "
                   "alone on this CPU (no HTTP): the most requests/s any schedule could reach")
    p.add_argument("--model-alone", nargs=2, metavar=("WEIGHTS", "JPEG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model_alone:  # --ceiling's own process
        print(json.dumps(model_alone(*map(Path, args.model_alone))))
        return

    import httpx

    w, h = (int(v) for v in args.image_size.lower().split("x"))
    good = synthetic_jpeg(w, h)
    proc, tmp = None, None
    if args.url:
        url = args.url.rstrip("/")
    else:
        tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
        weights = Path(args.weights) if args.weights else make_checkpoint(args.model, Path(tmp.name) / "ckpt")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(args, weights, port)
    try:
        wait_healthy(url, proc)
        headers = {"content-type": "image/jpeg", **({"authorization": f"Bearer {args.token}"} if args.token else {})}
        for _ in range(3):  # warm-up
            r = httpx.post(url + "/v1/segment", content=good, headers=headers, timeout=args.timeout)
            r.raise_for_status()
        model = httpx.get(url + "/v1/model", headers=headers, timeout=10).json()
        if args.images:
            args.max_requests, args.duration = args.images, 1e9
        base = None
        if args.baseline:  # one client, the same images one by one, same server, same run
            one = Tally()
            t0 = time.monotonic()
            client_loop(url, good, (w, h), args, one, t0 + args.duration, [args.max_requests], 10_000)
            wall1 = time.monotonic() - t0
            lat1 = np.array(one.ok_latencies) * 1000
            base = {"sent": one.sent, "ok": len(lat1), "wall_s": round(wall1, 1),
                    "requests_per_s": round(len(lat1) / wall1, 3),
                    "p50_ms": round(float(np.percentile(lat1, 50)), 1) if len(lat1) else None,
                    "p99_ms": round(float(np.percentile(lat1, 99)), 1) if len(lat1) else None,
                    "busy_503": one.busy, "errors": len(one.errors)}
            print("sequential:", json.dumps(base), flush=True)
        mem_before = rss_kib(proc.pid) if proc else {}
        peak = [mem_before.get("VmRSS", 0)]
        done = threading.Event()

        def sample():
            while not done.wait(0.25):
                if proc:
                    peak[0] = max(peak[0], rss_kib(proc.pid).get("VmRSS", 0))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tally = Tally()
        budget = [args.max_requests]
        t0 = time.monotonic()
        stop_at = t0 + args.duration
        threads = [threading.Thread(target=client_loop, args=(url, good, (w, h), args, tally, stop_at, budget, i))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        done.set()
        mem_after = rss_kib(proc.pid) if proc else {}
        health = httpx.get(url + "/v1/health", timeout=10).json()
    finally:
        if proc:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        ceiling = model_ceiling(weights, good) if args.ceiling and proc and args.device in (None, "cpu") else None
        if tmp:
            tmp.cleanup()

    lat = np.array(tally.ok_latencies) * 1000
    pct = {q: round(float(np.percentile(lat, q)), 1) if len(lat) else None for q in (50, 90, 99)}
    lost = tally.sent - tally.answered
    res = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "url": url, "model": model.get("model"),
        "model_kwargs": model.get("model_kwargs"), "input_size": model.get("input_size"),
        "parameters": model.get("parameters"), "backend": model.get("backend"), "precision": model.get("precision"),
        "clients": args.clients, "image": f"{w}x{h} JPEG ({len(good):,} bytes)",
        "queue_size": args.queue_size or "server default",
        "bad_fraction": args.bad_fraction, "wall_s": round(wall, 1), "sent": tally.sent, "ok": len(lat),
        "requests_per_s": round(len(lat) / wall, 2), "p50_ms": pct[50], "p90_ms": pct[90], "p99_ms": pct[99],
        "busy_503": tally.busy, "expected_4xx": tally.expected_4xx, "errors": len(tally.errors), "lost": lost,
        "rss_mib_after_warmup": round(mem_before.get("VmRSS", 0) / 1024, 1) if mem_before else None,
        "rss_mib_end": round(mem_after.get("VmRSS", 0) / 1024, 1) if mem_after else None,
        "rss_mib_peak": round(peak[0] / 1024, 1) if proc else None,
        "server_pending_after": health["queue"]["pending"], "cpu_count": os.cpu_count(),
        "server_batching": health.get("batching"), "sequential": base,
        "speedup_vs_sequential": round(len(lat) / wall / base["requests_per_s"], 2) if base and base["ok"] else None,
        "model_alone_images_per_s": ceiling, "cpu_flags": cpu_flags(),
    }
    print(json.dumps(res, indent=2))
    for e in tally.errors[:10]:
        print("error:", e, file=sys.stderr)
    print(f"\n{res['clients']} clients, {res['wall_s']} s: {res['requests_per_s']} req/s, p50 {res['p50_ms']} ms, "
          f"p99 {res['p99_ms']} ms, {res['errors']} errors ({lost} lost), {res['busy_503']} x 503, "
          f"{res['expected_4xx']} expected 4xx; RSS {res['rss_mib_after_warmup']} -> {res['rss_mib_end']} MiB "
          f"(peak {res['rss_mib_peak']})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    if base:
        print(f"sequential (1 client, same images): {base['requests_per_s']} req/s, p50 {base['p50_ms']} ms, "
              f"p99 {base['p99_ms']} ms; concurrent / sequential = {res['speedup_vs_sequential']}x")
    if ceiling:
        best = max(ceiling.values())
        print(f"the model alone (no HTTP): {ceiling}; so at most {best} req/s"
              + (f", {best / base['requests_per_s']:.2f}x one client" if base and base["ok"] else ""))
    if tally.errors or lost:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
