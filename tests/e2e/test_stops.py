"""Every way a command is stopped ends it cleanly: the exit status says how, no process of its session is
left running, every port it listened on is free again, and its named listeners were on loopback.

The cases and the harness are the `stops` benchmark's (benchmarks/stops.py), which also reports the seconds
from the stop to the exit; the test asserts everything but those seconds (its hang guard is 90 s).
"""

from __future__ import annotations

import pytest

from benchmarks.stops import CASES, make_case, problems, run_case

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("name", list(CASES))
def test_a_stop_leaves_nothing_behind(name, tmp_path):
    result = run_case(make_case(name), tmp_path)
    assert not problems(result), f"{problems(result)}\n{result.get('log_tail', '')}"
