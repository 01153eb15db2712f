"""The replica's StepClock: a step's wall time split into time on a CPU, waiting for one, and blocked."""

from __future__ import annotations

import os
import threading
import time

import pytest

from serve_apps._server import StepClock

linux = pytest.mark.skipif(not os.path.exists(StepClock.PATH), reason="no per-thread schedstat here")


@linux
def test_a_busy_step_is_on_a_cpu_and_a_sleeping_one_is_blocked():
    clock = StepClock()
    before, start = clock.read(), time.perf_counter()
    end = start + 0.2
    while time.perf_counter() < end:  # compute: on a CPU (or waiting for one, on a busy machine)
        pass
    clock.add(time.perf_counter() - start, before)
    busy = clock.stats()
    assert busy["on_cpu_s"] + busy["waiting_for_cpu_s"] == pytest.approx(busy["steps_s"], abs=0.05)

    before, start = clock.read(), time.perf_counter()
    threading.Event().wait(0.2)  # blocked, as on the GIL or a lock
    clock.add(time.perf_counter() - start, before)
    both = clock.stats()
    assert both["blocked_s"] >= 0.15
    assert both["on_cpu_s"] - busy["on_cpu_s"] < 0.05


def test_counters_are_this_threads_own():
    clock = StepClock()
    if not clock.available:
        pytest.skip("no per-thread schedstat here")
    mine = clock.read()
    done = threading.Event()

    def spin():
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end:
            pass
        done.set()

    threading.Thread(target=spin).start()
    done.wait(5)
    assert (clock.read()[0] - mine[0]) / 1e9 < 0.1  # the other thread's 0.2 s of computing is not counted


def test_without_counters_only_the_wall_time_is_kept():
    clock = StepClock()
    clock.available = False
    clock.add(0.5, clock.read())
    assert clock.stats() == {"steps_s": 0.5}
