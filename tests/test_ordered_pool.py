"""`data.ordered_pool.OrderedPool`: results in the order put, threads only when a call is worth a hand-off."""

import threading
import time

import pytest

from diffusion.data import ordered_pool
from diffusion.data.ordered_pool import PROBE, OrderedPool


def run(pool: OrderedPool, items) -> list:
    out = []
    try:
        for item in items:
            out += pool.put(item)
        out += pool.drain()
    finally:
        pool.close()
    return out


def test_cheap_calls_stay_on_the_callers_thread_costly_ones_go_to_threads():
    where: list[str] = []

    def square(x):
        where.append(threading.current_thread().name)
        return x * x

    cheap = OrderedPool(square, 4, "pool-test")
    assert run(cheap, range(100)) == [(x, x * x) for x in range(100)]
    assert not cheap.threaded and set(where) == {threading.current_thread().name}

    where.clear()

    def slow_square(x):
        time.sleep(2 * ordered_pool.MIN_SECONDS)  # sleeping releases the GIL, as Pillow's codecs do
        return square(x)

    costly = OrderedPool(slow_square, 4, "pool-test")
    assert run(costly, range(100)) == [(x, x * x) for x in range(100)]  # the same results, in order
    assert costly.threaded and where[:PROBE] == [threading.current_thread().name] * PROBE
    assert len({w for w in where[PROBE:] if w.startswith("pool-test")}) > 1
    assert not [t for t in threading.enumerate() if t.name.startswith("pool-test")]  # closed

    one = OrderedPool(slow_square, 1, "pool-test")  # one worker: never threads
    assert run(one, range(20)) == [(x, x * x) for x in range(20)] and not one.threaded


def test_only_timed_items_decide_and_errors_arrive_at_their_turn():
    def work(x):
        if x == "boom":
            raise RuntimeError("bad item")
        if isinstance(x, int):
            time.sleep(2 * ordered_pool.MIN_SECONDS)
        return x

    # Untimed, free items in between (skipped files, in the shard stage) do not pull the median down.
    pool = OrderedPool(work, 3, "pool-test", timed=lambda x: isinstance(x, int))
    items = [v for i in range(40) for v in (i, "skip")]
    assert run(pool, items) == [(v, v) for v in items] and pool.threaded

    pool = OrderedPool(work, 3, "pool-test")
    done = []
    with pytest.raises(RuntimeError, match="bad item"):
        for item in [*range(40), "boom", *range(40, 80)]:
            done += pool.put(item)
        done += pool.drain()
    pool.close()
    assert [x for x, _ in done] == list(range(len(done))) and len(done) <= 40  # nothing after the error
    assert not [t for t in threading.enumerate() if t.name.startswith("pool-test")]
