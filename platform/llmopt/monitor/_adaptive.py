"""Adaptive batching: the largest ``max_batch_size`` whose measured time per output token meets the SLO.

One controller runs in every model replica (``serve_apps/_server.py``) and moves that replica's batch size
through the same path as a ``user_config`` change (``reconfigure``). It lives in the replica rather than in
a deployment of its own because the quantity it controls is per replica (replicas on different nodes or
GPUs differ, and each sees its own load) and Serve's handles cannot address one chosen replica; a
``user_config`` redeploy would set every replica to the same value.

Time per output token (TPOT) grows with the batch about as ``a + b * batch``: a decode step reads the
weights once (``a``, large on a memory-bound model) and does each row's work (``b``). Every judgment of a
size (its TPOT at the SLO percentile) is kept for ``retry_after_s``; with two sizes or more among them the
controller fits ``a`` and ``b`` by least squares and aims at the largest size predicted to hold TPOT at
``(1 - hysteresis / 2) * slo``, otherwise it scales the size by ``goal / tpot`` (a line through the origin:
right for a row-bound model, a first move for a weight-bound one, where it shrinks too little). A TPOT
within ``hysteresis / 2`` of the SLO moves by the proportional aim only (a small miss is as likely noise).

* over the SLO: move down to the aim (at least one less, at most half); the size is not tried again for
  ``retry_after_s`` (load changes), so the controller does not oscillate around it;
* under ``(1 - hysteresis) * slo`` while requests wait for a slot: move up to the aim (at least one more,
  at most double, never onto a size that broke the SLO within ``retry_after_s``);
* otherwise (in the band, or nothing waiting, where a larger batch would change nothing) keep the size and
  go on measuring it.

A size is judged on requests that produced their first token once the running batch was within it (after
a decrease, the requests already running finish at the old size first), once ``min_requests`` of them
finished and twice the longest of their decodes has passed since then (the first to finish are the fastest).

A percentile read off a few dozen requests is noisy (on one CPU core a size's p99 moves by +-10% between
5-s windows). The replica also reports each engine step's duration and rows: a request's TPOT is
the mean of the steps it took part in, so the row-weighted mean step time of a size is its mean TPOT,
measured on every step (hundreds per judgment) rather than on every finished request. Each judgment
records the ratio of the requests' TPOT at the percentile to that mean, and judges the size at the
median ratio of the recent judgments times its mean step time: the tail's shape is pooled over
judgments, the level measured on many steps.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmopt.config import AdaptiveBatchingConfig


def percentile(values: list[float], q: float) -> float:
    """The ``q`` (0-1) quantile of ``values`` by linear interpolation (numpy's default method)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class BatchSizeChange:
    """One decision: from, to, why, and the measurement it was made on."""

    at: float  # unix time
    old: int
    new: int
    direction: str  # "up" or "down"
    tpot_s: float  # the measured TPOT at the SLO percentile
    slo_s: float
    requests: int  # finished requests it was measured on

    def message(self, percentile_name: str) -> str:
        relation = "over" if self.direction == "down" else "under"
        return (
            f"adaptive batching: max_batch_size {self.old} -> {self.new} ({percentile_name} TPOT "
            f"{self.tpot_s * 1e3:.1f} ms {relation} the SLO of {self.slo_s * 1e3:.1f} ms, "
            f"{self.requests} requests)"
        )


@dataclass
class BatchSizeController:
    """Decides a replica's ``max_batch_size`` from the TPOT of its finished requests.

    Args:
        config: ``monitor.adaptive_batching``.
        slo_s: ``monitor.tpot_slo_s``.
        quantile: ``monitor.slo_percentile``.
        size: The size now (the start: the upper bound).
        upper: The largest size to set.
        clock: Seconds, monotonic (tests pass their own).
    """

    config: AdaptiveBatchingConfig
    slo_s: float
    quantile: float
    size: int
    upper: int
    clock: Callable[[], float] = time.monotonic
    changes: list[BatchSizeChange] = field(default_factory=list)
    last_tpot_s: float | None = None

    def __post_init__(self) -> None:
        self.lower = min(self.config.min_batch_size, self.upper)
        self.size = max(self.lower, min(self.size, self.upper))
        self._since: float | None = None  # since when the running batch is within the current size
        self._decided = self.clock()
        self._samples: list[float] = []
        self._longest = 0.0  # the longest decode (first token to end) among the samples, seconds
        self._waited = False
        self._broken: dict[int, float] = {}  # size -> when it broke the SLO
        self._judged: list[tuple[float, int, float]] = []  # (when, size, TPOT at the quantile)
        self._steps: list[tuple[int, float]] = []  # (rows, seconds) of the steps within the current size
        self._ratios: list[tuple[float, float]] = []  # (when, request TPOT at the quantile / mean step time)

    def reset(self, size: int, upper: int) -> None:
        """Start again from ``size`` with a new upper bound (an operator's ``user_config``)."""
        self.upper = upper
        self.lower = min(self.config.min_batch_size, upper)
        self.size = max(self.lower, min(size, upper))
        self._since, self._decided = None, self.clock()
        self._samples.clear()
        self._longest = 0.0
        self._waited = False
        self._broken.clear()
        self._judged.clear()
        self._steps.clear()
        self._ratios.clear()

    def observe(self, tpot_s: float, first_token_at: float) -> None:
        """A finished request's mean seconds per token after its first (``first_token_at`` on ``clock``)."""
        if self._since is not None and first_token_at >= self._since:
            self._samples.append(tpot_s)
            self._longest = max(self._longest, self.clock() - first_token_at)

    def saw_step(
        self, waiting: int, running: int, step_s: float | None = None, rows: int | None = None
    ) -> None:
        """An engine step with ``waiting`` requests queued for a slot (only then can a larger batch help)
        and ``running`` in the batch; when the replica measures it, the step took ``step_s`` seconds and
        gave ``rows`` requests a token (default ``running``)."""
        if waiting > 0:
            self._waited = True
        if self._since is None and running <= self.size:
            self._since = self.clock()
        rows = running if rows is None else rows
        if step_s is not None and self._since is not None and rows > 0:
            self._steps.append((rows, step_s))

    def _mean_step_s(self) -> float | None:
        """The row-weighted mean step time within the current size (None: under ``min_requests`` steps)."""
        if len(self._steps) < self.config.min_requests:
            return None
        return sum(rows * seconds for rows, seconds in self._steps) / sum(rows for rows, _ in self._steps)

    def _measure(self, now: float) -> float | None:
        """The current size's TPOT at the quantile, or None while it cannot be judged yet."""
        # The first requests to finish under a new size are its fastest: wait until the slow ones, which
        # began as early, could have finished too (twice the longest decode seen), or the TPOT reads low.
        if (
            self._since is None
            or len(self._samples) < self.config.min_requests
            or now - self._since < 2 * self._longest
        ):
            return None
        tpot = percentile(self._samples, self.quantile)
        step_mean = self._mean_step_s()
        if step_mean is None:
            return tpot
        self._ratios = [(at, r) for at, r in self._ratios if now - at < self.config.retry_after_s]
        self._ratios.append((now, tpot / step_mean))
        return step_mean * statistics.median(r for _, r in self._ratios)

    def _ceiling(self, now: float) -> int:
        """One under the smallest size that broke the SLO within ``retry_after_s``, else the upper bound."""
        recent = [s for s, at in self._broken.items() if now - at < self.config.retry_after_s]
        return min([self.upper, *(s - 1 for s in recent)])

    def _fit(self, now: float) -> tuple[float, float] | None:
        """``(a, b)`` of ``tpot = a + b * size`` over the recent judgments (None: one size, or no slope)."""
        points = [(size, tpot) for at, size, tpot in self._judged if now - at < self.config.retry_after_s]
        if len({size for size, _ in points}) < 2:
            return None
        mean_s = sum(size for size, _ in points) / len(points)
        mean_t = sum(tpot for _, tpot in points) / len(points)
        var = sum((size - mean_s) ** 2 for size, _ in points)
        b = sum((size - mean_s) * (tpot - mean_t) for size, tpot in points) / var
        return (mean_t - b * mean_s, b) if b > 0 else None

    def _aim(self, now: float, tpot: float) -> int:
        """The largest size predicted to hold TPOT at ``(1 - hysteresis / 2) * slo``.

        A TPOT within ``hysteresis / 2`` of the SLO (either side) gets the proportional aim alone: a small
        miss is as likely noise as load, and a fit over noisy judgments can call for a large move on it.
        """
        goal = (1 - self.config.hysteresis / 2) * self.slo_s
        proportional = math.floor(self.size * goal / tpot)
        fit = self._fit(now)
        if fit is None or abs(tpot - self.slo_s) <= self.config.hysteresis / 2 * self.slo_s:
            return proportional
        a, b = fit
        fitted = math.floor((goal - a) / b) if goal > a else self.lower
        # Over the SLO the farther move of the two, under it the nearer: both err towards meeting it.
        return min(fitted, proportional) if tpot > self.slo_s else min(fitted, max(proportional, self.size))

    def decide(self) -> BatchSizeChange | None:
        """Look at the measurements if ``interval_s`` passed; the change to make, if any."""
        now = self.clock()
        if now - self._decided < self.config.interval_s:
            return None
        tpot = self._measure(now)
        if tpot is None:
            return None
        self._decided = now
        self.last_tpot_s = tpot
        keep = self.config.retry_after_s
        self._judged = [j for j in self._judged if now - j[0] < keep] + [(now, self.size, tpot)]
        old, new = self.size, self.size
        if tpot > self.slo_s:
            self._broken[old] = now
            # At most halve: a fit over noisy judgments can extrapolate far below the sizes it saw.
            new = max(self.lower, (old + 1) // 2, min(old - 1, self._aim(now, tpot)))
        elif tpot < (1 - self.config.hysteresis) * self.slo_s and self._waited:
            new = max(old, min(self._ceiling(now), 2 * old, max(old + 1, self._aim(now, tpot))))
        if new == old:
            # Go on measuring this size on its latest requests (load moves; old samples would outvote it).
            del self._samples[: -4 * self.config.min_requests]
            del self._steps[: -8 * self.config.min_requests]
            self._waited = False
            return None
        change = BatchSizeChange(
            at=time.time(),
            old=old,
            new=new,
            direction="up" if new > old else "down",
            tpot_s=tpot,
            slo_s=self.slo_s,
            requests=len(self._samples),
        )
        self.size, self._since = new, None
        self._samples.clear()
        self._steps.clear()
        self._longest = 0.0
        self._waited = False
        self.changes.append(change)
        return change

    def state(self) -> dict[str, Any]:
        """For ``/api/v1/stats``: bounds, the size, the last measurement and the changes so far."""
        return {
            "max_batch_size": self.size,
            "bounds": [self.lower, self.upper],
            "slo_s": self.slo_s,
            "quantile": self.quantile,
            "last_tpot_s": self.last_tpot_s,
            "pending_requests": len(self._samples),
            "changes": [vars(c) for c in self.changes[-100:]],
            "change_count": len(self.changes),
        }
