"""The native kernels' pooled worker threads (csrc/parallel.cpp): calls from several Python threads at once,
and from a forked child after the parent's pool has started, give what one call alone gives."""

from __future__ import annotations

import multiprocessing
import sys
import threading

import numpy as np
import pytest

from pybilayer import native, ops

pytestmark = pytest.mark.skipif(not native.capabilities().native, reason=str(native.capabilities().native_reason))


def heads_inputs(seed: int, low_size: int = 64, channels: int = 8):  # 128 px: two workers
    rng = np.random.default_rng(seed)
    phases = rng.standard_normal((1, 4 * channels, low_size + 1, low_size + 1)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    shift = rng.standard_normal(channels).astype(np.float32)
    slope = np.full(channels, 0.2, np.float32)
    weight = (rng.standard_normal((6, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    return phases, scale, shift, slope, weight, bias


def test_calls_from_many_threads_at_once_match_single_calls():
    """Each call's workers get threads of their own (a queue could leave a team's worker behind another
    call's), so concurrent calls neither deadlock nor mix their outputs."""
    inputs = [heads_inputs(seed) for seed in range(6)]
    alone = [ops.heads(*x, num_threads=2) for x in inputs]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = [ops.heads(*inputs[i], num_threads=2) for _ in range(5)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for i, runs in results.items():
        for outputs in runs:
            for got, expected in zip(outputs, alone[i]):
                np.testing.assert_array_equal(got, expected)  # same rows per worker: the same bits


def _child_heads(queue) -> None:
    queue.put(ops.heads(*heads_inputs(1), num_threads=2))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_starts_its_own_pool():
    """The parent's pooled threads do not exist in a forked child: the child must start its own."""
    expected = ops.heads(*heads_inputs(1), num_threads=2)  # the parent's pool now holds a parked thread
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_heads, args=(queue,))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("n,workers", [(1, 2), (7, 3), (64, 2), (1000, 4)])
def test_stealing_ranges_hand_out_every_item_once(n, workers):
    """The heads' bands (StealingRanges): every item exactly once, whichever worker takes it."""
    taken = native.load()._stealing_ranges_trace(n, workers)
    assert sorted(i for items in taken for i in items) == list(range(n))


def test_stealing_ranges_move_a_slow_workers_items_to_the_others():
    """A worker slowed by something else (here: a sleep per item) leaves most of its range to the others,
    which take it in a few long runs, not item by item."""
    taken = native.load()._stealing_ranges_trace(400, 2, slow_worker=0, delay_us=2000.0)
    assert sorted(i for items in taken for i in items) == list(range(400))
    assert len(taken[0]) < 100  # its own share is 200
    fast = taken[1]
    runs = 1 + sum(b != a + 1 for a, b in zip(fast, fast[1:]))
    assert runs <= 16  # about one per halving of what is left
