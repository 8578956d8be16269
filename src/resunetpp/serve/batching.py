"""Admission and dynamic batching: `Gate` decides whether a request may wait for the model, `Batcher`
gathers the images of concurrent requests (and stream frames) into one forward pass.

Images of concurrent requests go through the model together: up to `infer_batch` images, waiting at most
`batch_wait_ms` for more once the model is free. The model runs on its own worker thread(s); each answer
reports its time in the queue and how many images shared its forward pass. A request is refused (503 with
`Retry-After`) when the images already waiting, at the recent model time per image, would keep it queued
longer than `max_queue_s`.

With the torch backend on a CPU the workers share the cores by the load: a request alone gets every core for
its forward pass (the lowest latency), concurrent requests run side by side with a share each (on two cores,
two one-thread passes make more images per second than one two-thread pass), and no forward pass starts while
the cores are all taken.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from resunetpp.serve.decode import ApiError


class Gate:
    """Admission: a counter of requests in the server and the expected wait for the model.

    The expected wait (`expected_wait_s`) is the images waiting times the recent model seconds per image.
    `slot()` raises a 503 (with Retry-After) when either bound is exceeded.

    Args:
        capacity: Requests inside the server at once (`queue_size`).
        max_wait_s: The longest expected wait for the model a new request may have.

    Raises:
        ValueError: `capacity` is below 1.
    """

    def __init__(self, capacity: int, max_wait_s: float = math.inf):
        if capacity < 1:
            raise ValueError(f"queue_size must be >= 1, got {capacity}")
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self.pending = 0
        self.images_waiting = 0  # submitted to the model, not yet answered (the Batcher counts them)
        # running mean of the machine's seconds per image (a pass's time x its share of the machine)
        self.s_per_image: float | None = None
        self.mean_s = 0.25  # running mean seconds per request, for Retry-After
        self._lock = threading.Lock()
        self.refusal = ""

    def expected_wait_s(self, extra: int = 1) -> float:
        """Seconds a new request of `extra` images would wait for the model, from the recent batches."""
        if self.s_per_image is None:
            return 0.0
        return (max(self.images_waiting, self.pending) + extra) * self.s_per_image

    def observe_batch(self, images: int, seconds: float, share: float = 1.0) -> None:
        """Update the running time per image with a forward pass of `images` that took `seconds` on `share`
        of the machine (passes running side by side drain the queue that much faster)."""
        per = seconds * share / max(1, images)
        with self._lock:
            self.s_per_image = per if self.s_per_image is None else 0.7 * self.s_per_image + 0.3 * per

    def try_enter(self, force: bool = False) -> bool:
        """Count one more request in, unless the queue is full or the wait too long (`force`: always)."""
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
        """Count a request out, after `seconds` inside."""
        with self._lock:
            self.pending -= 1
            self.mean_s = 0.8 * self.mean_s + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds a refused client should wait before trying again."""
        if self.refusal == "wait":
            return max(1, math.ceil(self.expected_wait_s() - self.max_wait_s))
        return max(1, int(np.ceil(self.mean_s * max(1, self.pending))))

    @contextlib.contextmanager
    def slot(self, force: bool = False) -> Iterator[None]:
        """Hold a place in the server for the `with` block.

        Args:
            force: Enter even when full (stream frames: streams are bounded by `max_streams` instead).

        Raises:
            ApiError: 503 `busy`, with a Retry-After header, when the request is refused.
        """
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
    """What the model gave one submission: its probabilities, and how it was run.

    Attributes:
        probs: One probability map per submitted image.
        queue_ms: From submission to the start of its forward pass.
        infer_ms: The forward pass (shared with the others of its batch).
        batch_images: Images in that forward pass.
        threads: CPU threads of that forward pass (None: the backend chose).
    """

    probs: list[np.ndarray]
    queue_ms: float
    infer_ms: float
    batch_images: int
    threads: int | None = None


class Batcher:
    """Dynamic batching: the images of concurrent submissions go through the model together.

    When the model frees up, whatever is waiting is taken at once; if that is fewer than `max_images`, it
    waits at most `max_wait_s` for more. A submission is never split (a /v1/segment/batch request larger
    than `max_images` runs alone).

    With `set_threads`, the workers share `cores` by the load: a forward pass gets `cores` divided by the
    passes that can run now (this one, those running, those waiting, at most `workers`), and waits while
    every core is taken. So a lone request runs on all cores, and a queue runs `workers` passes side by side.

    Args:
        run_model: A list of images -> a list of probability maps.
        pool: Where the model runs; it needs `workers` threads.
        gate: Told the images waiting and the model time per image.
        max_images: Images per forward pass.
        max_wait_s: How long a free model waits for more images.
        clock: Seconds, for the queue times (tests inject one).
        workers: Forward passes at once.
        set_threads: Called on the worker thread before each pass with its thread count
            (`torch.set_num_threads`, which holds per thread); None: the backend keeps its own.
        cores: The threads to share out with `set_threads`.
    """

    def __init__(self, run_model: Callable[[list[np.ndarray]], list[np.ndarray]], pool: ThreadPoolExecutor,
                 gate: Gate, max_images: int = 8, max_wait_s: float = 0.005,
                 clock: Callable[[], float] = time.perf_counter, workers: int = 1,
                 set_threads: Callable[[int], None] | None = None, cores: int = 1):
        self.run_model, self.pool, self.gate = run_model, pool, gate
        self.max_images, self.max_wait_s, self.clock = max_images, max_wait_s, clock
        self.workers, self.set_threads, self.cores = workers, set_threads, max(1, cores)
        self.batches = 0
        self.running = 0  # forward passes under way
        self.threads_used = 0  # their threads (with set_threads)
        self._loop: asyncio.AbstractEventLoop | None = None

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and not any(w.done() for w in self._tasks):
            return
        self._loop = loop  # a new event loop (a test client without lifespan): start afresh on it
        self._items: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._freed = asyncio.Event()  # set when a forward pass ends
        self._tasks = [loop.create_task(self._work()) for _ in range(self.workers)]

    async def submit(self, images: list[np.ndarray]) -> Batched:
        """The probabilities of `images`, computed in a forward pass shared with other submissions."""
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

    def _threads(self) -> int | None:
        """Threads for the next forward pass: its share of the cores (None without `set_threads`)."""
        if self.set_threads is None:
            return None
        side_by_side = min(self.workers, self.running + 1 + len(self._items))
        return max(1, min(self.cores // side_by_side, self.cores - self.threads_used))

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._items:
                if self.set_threads is not None and self.threads_used >= self.cores:
                    self._freed.clear()  # every core is taken: wait for a pass to end
                    await self._freed.wait()
                    continue
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
                threads = self._threads()
                if self._items:  # more is waiting: an idle worker takes it while this batch runs
                    self._wake.set()
                await self._run(batch, n, threads)

    async def _run(self, batch: list, n: int, threads: int | None) -> None:
        images = [im for item in batch for im in item[0]]
        started = self.clock()
        self.running += 1
        self.threads_used += threads or 0

        def job():
            if threads is not None:
                self.set_threads(threads)
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
            self.running -= 1
            self.threads_used -= threads or 0
            self._freed.set()
        self.batches += 1
        self.gate.observe_batch(n, seconds, threads / self.cores if threads else 1 / self.workers)
        i = 0
        for item_images, future, submitted in batch:
            k = len(item_images)
            if not future.done():  # a client gone meanwhile cancelled its future
                future.set_result(Batched(probs[i:i + k], (started - submitted) * 1000, seconds * 1000, n, threads))
            i += k

    def close(self) -> None:
        """Cancel the workers (at the server's shutdown)."""
        for worker in getattr(self, "_tasks", ()):
            if not worker.done():
                with contextlib.suppress(RuntimeError):  # its loop already closed
                    worker.get_loop().call_soon_threadsafe(worker.cancel)
