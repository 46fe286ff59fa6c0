"""Run a function over a stream on threads, when that pays, and hand the results back in the stream's order.

The shard stage decodes a user's images and encodes the images it writes with Pillow, whose decoders,
resamplers and encoders (libjpeg, zlib) run without holding Python's lock: on threads they run in parallel.
But part of every call is Python work that does hold it, and for a small image that part is most of the
call (a 32 px PNG encodes in ~0.2 ms): threads then only add hand-offs and contend for the lock, and the
stage got slower (the CPU profile's shapes: 6.0 s on one thread, 7.5-9.3 s on two; a folder of 48 px images
0.77x). So the first calls run on the caller's thread, timed, and the rest go to threads only if a call took
long enough for them to help.

Whatever runs where, the results come back in the order the items were put, so nothing downstream (which
duplicate is kept, which key an image gets, the bytes written) depends on the number of threads or on the
timing.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

#: Calls timed on the caller's thread before deciding.
PROBE = 16
#: A call must take at least this long (median of the probe) to go to threads: a hand-off and the lock's
#: contention cost a few hundred microseconds (measured here: 64 px PNG encodes, ~1 ms, ran 1.9x faster on two
#: threads; 32 px ones, ~0.2 ms, 0.85x).
MIN_SECONDS = 5e-4
#: Items per task on a thread: a task is one hand-off.
BATCH = 8


def usable_cores() -> int:
    """CPU cores this process may run on: a batch scheduler's allowance (the affinity mask), not the machine's
    count, which on a shared node can be many times more."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class OrderedPool:
    """``put`` items one by one and get back ``(item, fn(item))`` pairs, in the order put, as they are ready;
    ``drain`` returns the rest. ``close`` (also on an error) stops the threads, dropping what they have not
    started. An exception raised by `fn` reaches the caller when its task's turn comes, nothing after it is
    returned, and on threads it takes the place of its whole task (up to `BATCH` items before it, and what that
    ``put`` or ``drain`` had collected, are not returned either): an error is for ending the stream, not for
    skipping an item (the shard stage's preparation turns a bad file into a result, not an exception).

    With `workers` > 1, after `PROBE` calls on the caller's thread whose median took at least `MIN_SECONDS`,
    items go to `workers` threads, `BATCH` per task, at most ``workers + 1`` tasks ahead of the caller (one on each
    thread and one waiting: what is held, ``BATCH * (workers + 1)`` items, grows with the threads, and the shard
    stage has three pools; at ``2 * workers`` tasks the throughput on 2 cores was the same or lower). Only
    items `timed` accepts count in the probe (the shard stage's sources pass skipped files through the same
    stream: they cost nothing and say nothing about an image's cost).
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int, name: str,
                 timed: Callable[[Any], bool] = lambda item: True) -> None:
        if workers < 1:
            raise ValueError(f"workers: expected >= 1, got {workers}")
        self.fn, self.workers, self.name, self.timed = fn, workers, name, timed
        self.threaded = False
        self._timings: list[float] = []
        self._pool: ThreadPoolExecutor | None = None
        self._batch: list[Any] = []
        self._pending: deque[tuple[list[Any], Future]] = deque()

    def put(self, item: Any) -> list[tuple[Any, Any]]:
        if self._pool is None:
            if self.workers == 1 or len(self._timings) == PROBE or not self.timed(item):
                return [(item, self.fn(item))]  # decided (or not a call to time): here, on this thread
            start = time.perf_counter()
            result = self.fn(item)
            self._timings.append(time.perf_counter() - start)
            if len(self._timings) == PROBE and statistics.median(self._timings) >= MIN_SECONDS:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
                self.threaded = True
            return [(item, result)]
        self._batch.append(item)
        if len(self._batch) == BATCH:
            self._submit()
        done = []
        while len(self._pending) > self.workers + 1:
            done += self._collect()
        return done

    def drain(self) -> list[tuple[Any, Any]]:
        """Everything put and not yet returned, in order."""
        self._submit()
        done = []
        while self._pending:
            done += self._collect()
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._batch, self._pending = [], deque()

    def _submit(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._pending.append((batch, self._pool.submit(lambda items: [self.fn(i) for i in items], batch)))

    def _collect(self) -> list[tuple[Any, Any]]:
        batch, job = self._pending.popleft()
        return list(zip(batch, job.result()))
