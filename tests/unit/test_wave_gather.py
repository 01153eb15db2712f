"""serving.batching.wave_gap_s: an idle engine gathers a wave of arrivals before its first step."""

from __future__ import annotations

import threading
import time
from queue import SimpleQueue

from serve_apps._server import gather_wave


def _feed(inbox: SimpleQueue, items: list[tuple[float, tuple]]) -> threading.Thread:
    """Put each command into the inbox after its delay (seconds from the start), on another thread."""

    def run():
        start = time.monotonic()
        for delay, command in items:
            time.sleep(max(0.0, start + delay - time.monotonic()))
            inbox.put(command)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_arrivals_closer_than_the_gap_are_gathered_up_to_the_expected_count():
    inbox: SimpleQueue = SimpleQueue()
    commands = [("add", ["a"])]
    feeder = _feed(inbox, [(0.01, ("add", ["b", "b/1"])), (0.02, ("cancel", "x")), (0.03, ("add", ["c"]))])
    gather_wave(inbox, commands, expected=4, gap_s=0.5)
    feeder.join()
    # A command that is no arrival (a cancellation) is kept and waited past; two choices count as two.
    assert commands == [("add", ["a"]), ("add", ["b", "b/1"]), ("cancel", "x"), ("add", ["c"])]
    assert inbox.empty()


def test_a_pause_longer_than_the_gap_ends_the_wave_and_leaves_the_rest_queued():
    inbox: SimpleQueue = SimpleQueue()
    commands = [("add", ["a"])]
    feeder = _feed(inbox, [(0.005, ("add", ["b"])), (1.0, ("add", ["late"]))])
    gather_wave(inbox, commands, expected=3, gap_s=0.2)
    feeder.join()
    assert commands == [("add", ["a"]), ("add", ["b"])]
    assert inbox.get_nowait() == ("add", ["late"])


def test_nothing_is_awaited_with_a_gap_of_zero_or_once_the_wave_is_complete():
    inbox: SimpleQueue = SimpleQueue()
    inbox.put(("add", ["b"]))
    commands = [("add", ["a"])]
    gather_wave(inbox, commands, expected=4, gap_s=0.0)
    assert commands == [("add", ["a"])] and not inbox.empty()
    commands = [("add", ["a", "a/1"])]
    gather_wave(inbox, commands, expected=2, gap_s=10.0)
    assert commands == [("add", ["a", "a/1"])] and not inbox.empty()
