"""`llmopt monitor top`: a terminal view of serving and training read straight from Ray's metrics endpoints
and a run directory, for when no Prometheus is running (a laptop, a fresh cluster, a debugging session).

Without Prometheus there is no `rate()` or `histogram_quantile()`, so this module does their arithmetic on
scrapes it keeps itself: a counter's rate is its increase between two scrapes over the seconds between them,
a latency percentile is interpolated within the buckets of what a histogram gained between them, as
Prometheus's `histogram_quantile` does. Ray's metrics agent updates the values it exposes every few seconds
(10 s by default), not on every request, so rates are taken over a window of kept scrapes longer than that
(`window_s`) rather than between two consecutive ones, which would read 0 and then a spike.

Series are summed per replica (application, deployment, replica): routes, status codes and the labels Ray
adds (worker id, node, session) are summed away. The ingress deployment records requests, errors, tokens
and latencies; the model replicas record batch sizes, queues and their KV caches (with `serving.layout:
single` one replica records both); each row shows what its replica records and "-" for the rest.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.monitor._rules import METRICS

Replica = tuple[str, str, str]  # (application, deployment, replica)

DASH = "-"

_SERVING = (
    "requests",
    "errors",
    "ttft",
    "tpot",
    "output_tokens",
    "batch_size",
    "queue",
    "running",
    "kv_bytes",
    "kv_hit_rate",
    "max_batch_size",
)
# Training gauges per run (the run's metrics sink sets them); optional: absent keys are skipped.
_TRAINING = (
    "train_step",
    "train_loss",
    "train_tokens_per_s",
    "train_peak_memory",
    "train_memory_ceiling",
    "train_last_step",
    "train_restarts",
    "train_finished",
)


class TopError(Exception):
    """A condition the command reports in one line (no endpoint to read, no run directory)."""


@dataclass
class Scrape:
    """llmopt's series on one or more metrics endpoints at one moment.

    `values` holds counters and gauges by `METRICS` key; `buckets` holds each histogram's cumulative bucket
    counts by upper bound (``le``, ``math.inf`` for ``+Inf``). A histogram's `_sum` is left out: Ray exposes
    it estimated from the buckets (see `integer_histogram_mean`). `runs` holds the training gauges of each
    run (`run` label).
    """

    at: float = 0.0
    values: dict[str, dict[Replica, float]] = field(default_factory=dict)
    buckets: dict[str, dict[Replica, dict[float, float]]] = field(default_factory=dict)
    runs: dict[str, dict[str, float]] = field(default_factory=dict)
    endpoints: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # endpoint -> why it could not be read

    def replicas(self) -> list[Replica]:
        found = {r for series in self.values.values() for r in series}
        found |= {r for series in self.buckets.values() for r in series}
        return sorted(found)


def _sample_names() -> dict[str, tuple[str, str]]:
    """Exposed sample name -> (METRICS key, part): part is "" for a counter or gauge, else bucket, sum or
    count. A counter may be exposed with or without a `_total` suffix (the exposition format adds one)."""
    names: dict[str, tuple[str, str]] = {}
    for key in (*_SERVING, *_TRAINING):
        name = METRICS.get(key)
        if name is None:
            continue
        names[name] = (key, "")
        if not name.endswith("_total"):
            names[f"{name}_total"] = (key, "")
        for part in ("bucket", "sum", "count"):
            names.setdefault(f"{name}_{part}", (key, part))
    return names


def parse_exposition(text: str, into: Scrape | None = None) -> Scrape:
    """llmopt's series in Prometheus text exposition `text`, added to `into` (a new Scrape by default).

    Counters and histograms of one replica are summed over their other labels; a gauge keeps its last
    series. Training gauges are kept per run, from the series that logged the latest step where a run has
    several (the sink moved to another process and its old series lingers).

    Raises:
        ValueError: `text` is not in the exposition format.
    """
    from prometheus_client.parser import text_string_to_metric_families

    scrape = into if into is not None else Scrape()
    names = _sample_names()
    training: dict[str, dict[tuple, dict[str, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            hit = names.get(sample.name)
            if hit is None:
                continue
            key, part = hit
            labels = sample.labels
            if key in _TRAINING:
                others = tuple(sorted((k, v) for k, v in labels.items() if k != "run"))
                training.setdefault(labels.get("run", ""), {}).setdefault(others, {})[key] = sample.value
                continue
            replica = (labels.get("application", ""), labels.get("deployment", ""), labels.get("replica", ""))
            if part == "bucket":
                series = scrape.buckets.setdefault(key, {}).setdefault(replica, {})
                le = float(labels["le"])
                series[le] = series.get(le, 0.0) + sample.value
                continue
            if part:  # _sum and _count: the buckets say as much, _sum less accurately
                continue
            series = scrape.values.setdefault(key, {})
            if family.type == "gauge":
                series[replica] = sample.value
            else:
                series[replica] = series.get(replica, 0.0) + sample.value
    for run, groups in training.items():
        scrape.runs[run] = max(groups.values(), key=lambda g: g.get("train_last_step", -math.inf))
    return scrape


def fetch(url: str, timeout: float = 5.0) -> str:
    """The body of `url` (a metrics endpoint)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode("utf-8", errors="replace")


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def scrape(urls: Sequence[str], timeout: float = 5.0) -> Scrape:
    """Read every endpoint of `urls` at once; one that cannot be read is named in `errors`, not raised."""
    from concurrent.futures import ThreadPoolExecutor

    def get(url: str) -> tuple[str, str | None, str | None]:
        try:
            return url, fetch(url, timeout), None
        except (OSError, ValueError) as exc:  # URLError, timeouts and refusals are OSErrors
            return url, None, _why(exc)

    result = Scrape(at=time.monotonic(), endpoints=list(urls))
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(urls)))) as pool:
        for url, text, error in pool.map(get, urls):
            if error is not None:
                result.errors[url] = error
                continue
            try:
                parse_exposition(text or "", into=result)
            except ValueError as exc:
                result.errors[url] = f"not Prometheus text: {exc}"
    return result


def discover_endpoints() -> list[str]:
    """The metrics endpoint of every alive node of the Ray cluster running here (or at RAY_ADDRESS).

    Raises:
        TopError: No cluster is running, or its nodes export no metrics.
    """
    import logging

    import ray

    try:
        ray.init(address="auto", logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)
    except ConnectionError:
        raise TopError(
            "no Ray cluster is running here to find metrics endpoints on: start one, or pass "
            "--metrics-url http://HOST:PORT/metrics (a node's metrics export port)"
        ) from None
    try:
        nodes = ray.nodes()
    finally:
        ray.shutdown()
    urls = [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in nodes
        if n.get("Alive") and n.get("MetricsExportPort")
    ]
    if not urls:
        raise TopError("the Ray cluster's nodes export no metrics (no MetricsExportPort); pass --metrics-url")
    return urls


# --- the arithmetic Prometheus would do ---------------------------------------------------------------


def counter_rate(current: float | None, previous: float | None, seconds: float) -> float | None:
    """Per-second increase of a counter between two scrapes `seconds` apart; None without both values.

    A counter lower than before was reset (its process restarted) and has counted from 0 since.
    """
    if current is None or previous is None or seconds <= 0:
        return None
    delta = current - previous
    return (current if delta < 0 else delta) / seconds


def bucket_delta(
    current: Mapping[float, float], previous: Mapping[float, float] | None
) -> dict[float, float]:
    """What a histogram's cumulative buckets gained since `previous`; the buckets themselves where there is
    no previous scrape or the histogram was reset (a bucket went down)."""
    if not previous:
        return dict(current)
    delta = {le: count - previous.get(le, 0.0) for le, count in current.items()}
    if any(v < 0 for v in delta.values()):
        return dict(current)
    return delta


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The `q` quantile of cumulative `buckets` (upper bound -> count), as Prometheus's histogram_quantile
    computes it: linear within the bucket holding the rank, the first bucket starting at 0, and the largest
    finite bound where the rank falls in ``+Inf``. None without observations or without a ``+Inf`` bucket.
    """
    if not buckets or math.inf not in buckets:
        return None
    bounds = sorted(buckets)
    counts, running = [], 0.0
    for le in bounds:  # a scrape mid-update can be non-monotonic; Prometheus evens that out the same way
        running = max(running, buckets[le])
        counts.append(running)
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    for i, (le, count) in enumerate(zip(bounds, counts, strict=True)):
        if count < rank:
            continue
        if le == math.inf:
            return bounds[-2] if len(bounds) > 1 else None
        if i == 0 and le <= 0:
            return le
        lower, below = (bounds[i - 1], counts[i - 1]) if i else (0.0, 0.0)
        if count == below:
            return le
        return lower + (le - lower) * (rank - below) / (count - below)
    return None


def integer_histogram_mean(buckets: Mapping[float, float]) -> float | None:
    """The mean of a histogram of whole numbers (batch sizes) from its cumulative `buckets`.

    Ray's exporter does not keep a histogram's observed sum: it exposes `_sum` as count x bucket midpoint,
    which puts a batch of 1 in bucket (0, 1] at 0.5. Knowing the values are whole numbers does better: a
    bucket (lo, hi] holds floor(lo)+1 .. floor(hi), taken here at their middle; `+Inf` at the largest
    finite bound + 1 (the least it can hold). None without observations.
    """
    if not buckets:
        return None
    total = weighted = below = 0.0
    lower = 0.0
    for le in sorted(buckets):
        count = max(0.0, buckets[le] - below)
        below = max(below, buckets[le])
        if le == math.inf:
            value = math.floor(lower) + 1
        else:
            first, last = math.floor(lower) + 1, math.floor(le)
            value = (first + last) / 2 if last >= first else (lower + le) / 2
        total += count
        weighted += count * value
        lower = le
    return weighted / total if total > 0 else None


# --- serving ------------------------------------------------------------------------------------------


@dataclass
class ReplicaRow:
    """One replica's figures over the window (None: the replica does not record it)."""

    application: str
    deployment: str
    replica: str
    requests_per_s: float | None = None
    errors_per_s: float | None = None
    tokens_per_s: float | None = None
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    tpot_p50: float | None = None
    tpot_p99: float | None = None
    batch_mean: float | None = None
    max_batch_size: float | None = None
    queue: float | None = None
    running: float | None = None
    kv_bytes: float | None = None
    kv_hit_rate: float | None = None
    # The percentiles and mean batch size are over the replica's life: nothing new within the window.
    since_start: bool = False


def _window_histogram(
    key: str, replica: Replica, current: Scrape, baseline: Scrape | None
) -> tuple[dict[float, float], bool]:
    """`key`'s buckets gained within the window, or the cumulative ones (True) on a first scrape or when
    nothing was observed within it: an idle replica still shows the latency it served with."""
    now = current.buckets.get(key, {}).get(replica)
    if not now:
        return {}, False
    before = baseline.buckets.get(key, {}).get(replica) if baseline is not None else None
    delta = bucket_delta(now, before)
    if before is None or delta.get(math.inf, 0.0) <= 0:
        return dict(now), True
    return delta, False


def serving_rows(current: Scrape, baseline: Scrape | None) -> list[ReplicaRow]:
    """One row per replica of `current`, rates and percentiles over the window since `baseline` (None:
    the first scrape, which has no rates and only cumulative percentiles)."""
    seconds = current.at - baseline.at if baseline is not None else 0.0

    def value(scrape: Scrape | None, key: str, replica: Replica) -> float | None:
        return scrape.values.get(key, {}).get(replica) if scrape is not None else None

    def rate(key: str, replica: Replica) -> float | None:
        return counter_rate(value(current, key, replica), value(baseline, key, replica), seconds)

    rows = []
    for replica in current.replicas():
        row = ReplicaRow(*replica)
        row.requests_per_s = rate("requests", replica)
        if value(current, "requests", replica) is not None and row.requests_per_s is not None:
            # The error counter appears with the first error: until then a replica that counts requests has 0.
            before = value(baseline, "errors", replica)
            row.errors_per_s = counter_rate(
                value(current, "errors", replica) or 0.0, before if before is not None else 0.0, seconds
            )
        row.tokens_per_s = rate("output_tokens", replica)
        cumulative = False
        for key, low, high in (("ttft", "ttft_p50", "ttft_p99"), ("tpot", "tpot_p50", "tpot_p99")):
            buckets, since_start = _window_histogram(key, replica, current, baseline)
            if buckets:
                setattr(row, low, histogram_quantile(0.5, buckets))
                setattr(row, high, histogram_quantile(0.99, buckets))
                cumulative |= since_start
        buckets, since_start = _window_histogram("batch_size", replica, current, baseline)
        if buckets:
            row.batch_mean = integer_histogram_mean(buckets)
            cumulative |= since_start
        row.since_start = cumulative
        row.max_batch_size = value(current, "max_batch_size", replica)
        row.queue = value(current, "queue", replica)
        row.running = value(current, "running", replica)
        row.kv_bytes = value(current, "kv_bytes", replica)
        row.kv_hit_rate = value(current, "kv_hit_rate", replica)
        rows.append(row)
    return rows


# --- training -----------------------------------------------------------------------------------------


@dataclass
class TrainingView:
    """A run directory's progress as its metrics.jsonl and config.yaml tell it."""

    run: str
    path: str
    status: str
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    peak_memory_bytes: float | None = None
    window_peak_memory_bytes: float | None = None
    memory_ceiling_bytes: float | None = None
    eta_s: float | None = None
    since_last_record_s: float | None = None
    records: int = 0


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, one per step (the later record of a step wins, as after a restart).

    The file grows while it is read: a last line cut short is skipped, to be read complete next time.
    """
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and _number(record.get("step")) is not None:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _planned_steps(run_dir: Path, last: dict[str, Any]) -> int | None:
    """The run's optimizer steps: a record's `total_steps`, else config.yaml's `training.max_steps` (a run
    that trains for epochs instead has no count until its records carry one)."""
    if _number(last.get("total_steps")) is not None:
        return int(last["total_steps"])
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    try:
        steps = (yaml.safe_load(config.read_text()) or {}).get("training", {}).get("max_steps")
    except (yaml.YAMLError, AttributeError):
        return None
    return int(steps) if _number(steps) is not None else None


def read_training(run_dir: str | Path, now: float | None = None, recent: int = 5) -> TrainingView:
    """The progress of the run in `run_dir`; the ETA is the steps left times the mean step time of the last
    `recent` records (recent steps, not the run's start, which includes compiling and warm-up).

    Raises:
        TopError: `run_dir` is not a run directory (neither metrics.jsonl nor config.yaml in it).
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir() or not (metrics.is_file() or (run_dir / "config.yaml").is_file()):
        raise TopError(f"{run_dir} is not a run directory (no metrics.jsonl or config.yaml in it)")
    records = read_records(metrics)
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            summary = {}
    view = TrainingView(run=run_dir.name, path=str(run_dir), status="no records yet", records=len(records))
    if not records:
        if summary.get("status"):
            view.status = str(summary["status"])
        return view
    last = records[-1]
    finished = bool(last.get("final"))
    view.status = str(summary.get("status") or ("finishing" if finished else "running"))
    view.step = int(last["step"])
    view.total_steps = _planned_steps(run_dir, last)
    view.loss = _number(last.get("loss"))
    view.eval_loss = _number(last.get("eval_loss"))
    view.tokens_per_s = _number(last.get("tokens_per_s"))
    view.peak_memory_bytes = _number(last.get("peak_memory_bytes"))
    view.window_peak_memory_bytes = _number(last.get("window_peak_memory_bytes"))
    view.memory_ceiling_bytes = _number(last.get("memory_ceiling_bytes"))
    times = [t for r in records[-recent:] if (t := _number(r.get("step_time_s"))) is not None]
    view.step_time_s = sum(times) / len(times) if times else None
    if summary.get("status") or finished:
        view.eta_s = 0.0
    elif view.total_steps is not None and view.step_time_s is not None:
        view.eta_s = max(0, view.total_steps - view.step) * view.step_time_s
    now = time.time() if now is None else now
    view.since_last_record_s = max(0.0, now - metrics.stat().st_mtime)
    return view


# --- the view -----------------------------------------------------------------------------------------


@dataclass
class View:
    """What one refresh shows: the serving rows, the runs on the endpoints, and the run directory."""

    rows: list[ReplicaRow] = field(default_factory=list)
    runs: dict[str, dict[str, float]] = field(default_factory=dict)
    training: TrainingView | None = None
    endpoints: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    window_s: float | None = None  # seconds the rates are over; None on a first scrape
    now: float = 0.0  # wall-clock time of the scrape (the training gauges' timestamps are wall-clock)


def fmt_rate(x: float | None) -> str:
    """`0`, `0.50`, `12.5`, `1,234`: what a rate needs of precision at its size."""
    if x is None or not math.isfinite(x):
        return DASH
    if x == 0:
        return "0"
    if x < 10:
        return f"{x:.2f}"
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def fmt_seconds(s: float | None) -> str:
    """Latencies in ms under a second (`0.42 ms`, `12.3 ms`, `250 ms`), seconds above."""
    if s is None or not math.isfinite(s):
        return DASH
    if s < 1:
        ms = s * 1000
        return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"
    return f"{s:.2f} s" if s < 60 else fmt_duration(s)


def fmt_duration(s: float | None) -> str:
    """`42 s`, `3 min 05 s`, `2 h 07 min`."""
    if s is None or not math.isfinite(s):
        return DASH
    s = max(0, round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def fmt_bytes(n: float | None) -> str:
    from llmopt.config import format_bytes

    return DASH if n is None or not math.isfinite(n) else format_bytes(n)


def _count(x: float | None) -> str:
    return DASH if x is None else f"{x:g}"


def _percent(x: float | None) -> str:
    return DASH if x is None or not math.isfinite(x) else f"{x:.1%}"


def _batch(row: ReplicaRow) -> str:
    if row.batch_mean is None and row.max_batch_size is None:
        return DASH
    mean = DASH if row.batch_mean is None else _since(row, f"{row.batch_mean:.1f}")
    return f"{mean} / {_count(row.max_batch_size)}"


def _since(row: ReplicaRow, text: str) -> str:
    return f"{text}*" if row.since_start and text != DASH else text


def serving_table(rows: Sequence[ReplicaRow], window_s: float | None):
    """The serving table: one row per replica."""
    from rich.table import Table

    over = f"over the last {fmt_duration(window_s)}" if window_s else "cumulative (first scrape)"
    table = Table(title=f"serving: {len(rows)} replica(s), rates {over}", title_justify="left")
    for name in ("app", "deployment", "replica"):
        table.add_column(name, no_wrap=True)
    for name in (
        "req/s", "err/s", "tokens/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "batch mean/max",
        "queue", "running", "KV cache", "KV hit rate",
    ):  # fmt: skip
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r.application or DASH,
            r.deployment or DASH,
            r.replica or DASH,
            fmt_rate(r.requests_per_s),
            fmt_rate(r.errors_per_s),
            fmt_rate(r.tokens_per_s),
            _since(r, fmt_seconds(r.ttft_p50)),
            _since(r, fmt_seconds(r.ttft_p99)),
            _since(r, fmt_seconds(r.tpot_p50)),
            _since(r, fmt_seconds(r.tpot_p99)),
            _batch(r),
            _count(r.queue),
            _count(r.running),
            fmt_bytes(r.kv_bytes),
            _percent(r.kv_hit_rate),
        )
    if any(r.since_start for r in rows):
        table.caption = "* over the replica's life: nothing new was recorded within the window"
        table.caption_justify = "left"
    return table


def runs_table(runs: Mapping[str, Mapping[str, float]], now: float):
    """The training runs whose metrics sinks export gauges to the endpoints."""
    from rich.table import Table

    table = Table(title="training runs on the metrics endpoints", title_justify="left")
    table.add_column("run", no_wrap=True)
    for name in ("step", "loss", "tokens/s", "peak memory", "ceiling", "last step", "restarts", "state"):
        table.add_column(name, justify="right", no_wrap=True)
    for run in sorted(runs):
        g = runs[run]
        loss = g.get("train_loss")
        last = g.get("train_last_step")
        table.add_row(
            run or DASH,
            _count(g.get("train_step")),
            DASH if loss is None else f"{loss:.4f}",
            fmt_rate(g.get("train_tokens_per_s")),
            fmt_bytes(g.get("train_peak_memory")),
            fmt_bytes(g.get("train_memory_ceiling")),
            DASH if last is None else f"{fmt_duration(now - last)} ago",
            _count(g.get("train_restarts")),
            "finished" if g.get("train_finished") else "running",
        )
    return table


def training_panel(view: TrainingView):
    """The run directory's panel: progress, loss, throughput, memory and ETA."""
    from rich.panel import Panel
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(no_wrap=True)
    if view.step is None:
        step = DASH
    elif view.total_steps:
        step = f"{view.step} / {view.total_steps} ({view.step / view.total_steps:.0%})"
    else:
        step = f"{view.step} / {DASH}"
    loss = DASH if view.loss is None else f"{view.loss:.4f}"
    if view.eval_loss is not None:
        loss += f" (held-out {view.eval_loss:.4f})"
    memory = fmt_bytes(view.peak_memory_bytes)
    if view.window_peak_memory_bytes is not None:
        window = fmt_bytes(view.window_peak_memory_bytes)
        memory += f" rank 0; {window} all workers since the last checkpointing decision"
    if view.memory_ceiling_bytes is not None:
        memory += f"; ceiling {fmt_bytes(view.memory_ceiling_bytes)}"
    last = DASH if view.since_last_record_s is None else f"{fmt_duration(view.since_last_record_s)} ago"
    for name, text in (
        ("status", view.status),
        ("step", step),
        ("loss", loss),
        ("tokens/s", fmt_rate(view.tokens_per_s)),
        ("step time", fmt_seconds(view.step_time_s)),
        ("peak memory", memory),
        ("ETA", fmt_duration(view.eta_s)),
        ("last record", last),
    ):
        grid.add_row(name, text)
    return Panel(grid, title=f"training: {view.run}", subtitle=view.path, title_align="left", expand=False)


def render(view: View):
    """The whole screen for `view`: serving table, runs on the endpoints, run-directory panel, notes."""
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = []
    if view.rows:
        parts.append(serving_table(view.rows, view.window_s))
    if view.runs:
        parts.append(runs_table(view.runs, view.now))
    read = [e for e in view.endpoints if e not in view.errors]
    if read and not view.rows and not view.runs:
        parts.append(Text(f"no llmopt series on {', '.join(read)}", style="yellow"))
    for url, why in view.errors.items():
        parts.append(Text(f"cannot read {url}: {why}", style="red"))
    if view.training is not None:
        parts.append(training_panel(view.training))
    return Group(*parts)


class Top:
    """The state between refreshes: the scrapes within the window, and where to read.

    Args:
        urls: Metrics endpoints (none: no serving view).
        run_dir: A run directory to follow (None: no training panel).
        window_s: Rates and percentiles are over the oldest kept scrape at most this old.
    """

    def __init__(self, urls: Sequence[str], run_dir: str | Path | None = None, window_s: float = 30.0):
        self.urls = list(urls)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.window_s = window_s
        self.history: deque[Scrape] = deque()

    def refresh(self) -> View:
        view = View(now=time.time())
        if self.urls:
            current = scrape(self.urls)
            # Keep the scrapes within the window and the latest before it, so a baseline always exists.
            while len(self.history) > 1 and current.at - self.history[1].at >= self.window_s:
                self.history.popleft()
            baseline = self.history[0] if self.history else None
            self.history.append(current)
            view.rows = serving_rows(current, baseline)
            view.runs = current.runs
            view.endpoints, view.errors = current.endpoints, current.errors
            view.window_s = current.at - baseline.at if baseline is not None else None
        if self.run_dir is not None:
            view.training = read_training(self.run_dir, now=view.now)
        return view
