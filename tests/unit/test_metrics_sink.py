"""The training metrics sink, called directly (the class `ray.remote` wraps in training): metrics.jsonl, the
Prometheus gauges it sets through `ray.util.metrics`, and the worker-group restarts it infers."""

import json
from typing import ClassVar

import pytest

from llmopt.train._metrics import TRAIN_GAUGES, MetricsSink


class _FakeGauge:
    """Stands in for `ray.util.metrics.Gauge`: every instance and every `set` recorded."""

    made: ClassVar[list["_FakeGauge"]] = []

    def __init__(self, name, description="", tag_keys=None):
        self.name, self.tag_keys, self.sets = name, tag_keys, []
        _FakeGauge.made.append(self)

    def set(self, value, tags=None):
        self.sets.append((value, tags))


@pytest.fixture
def gauges(monkeypatch):
    import ray.util.metrics

    _FakeGauge.made = []
    monkeypatch.setattr(ray.util.metrics, "Gauge", _FakeGauge)
    return _FakeGauge.made


def _step(step, resumed=0, **extra):
    return {"step": step, "loss": 5.0 - step / 10, "tokens_per_s": 100.0 * step, "resumed_from_step": resumed,
            "peak_memory_bytes": 7_000, "window_peak_memory_bytes": 6_000 + step,
            "memory_ceiling_bytes": 9_000, **extra}  # fmt: skip


def test_sink_exports_the_latest_record_as_gauges_tagged_with_the_run(tmp_path, gauges, monkeypatch):
    sink = MetricsSink(str(tmp_path / "run-a" / "metrics.jsonl"))
    assert sink.run == "run-a" and gauges == []  # nothing is created before the first record
    monkeypatch.setattr("llmopt.train._metrics.time.time", lambda: 1234.5)
    sink.log(_step(1))
    sink.log(_step(2))
    assert {g.name for g in gauges} == set(TRAIN_GAUGES) and len(gauges) == len(TRAIN_GAUGES)
    assert all(g.tag_keys == ("run",) for g in gauges)
    assert sink.exported == {
        "llmopt_train_step": 2.0,
        "llmopt_train_loss": 4.8,
        "llmopt_train_tokens_per_second": 200.0,
        "llmopt_train_peak_memory_bytes": 6_002.0,  # the window's peak over the process's
        "llmopt_train_memory_ceiling_bytes": 9_000.0,
        "llmopt_train_last_step_timestamp_seconds": 1234.5,
        "llmopt_train_restarts": 0.0,
        "llmopt_train_finished": 0.0,
    }
    by_name = {g.name: g for g in gauges}
    assert by_name["llmopt_train_step"].sets == [(1.0, {"run": "run-a"}), (2.0, {"run": "run-a"})]
    # Without a window peak, the process's peak; a record without a figure keeps the last one.
    sink.log({"step": 3, "peak_memory_bytes": 7_000})
    assert sink.exported["llmopt_train_peak_memory_bytes"] == 7_000.0
    assert sink.exported["llmopt_train_loss"] == 4.8
    assert [json.loads(line)["step"] for line in sink.path.read_text().splitlines()] == [1, 2, 3]
    assert MetricsSink(str(tmp_path / "x" / "metrics.jsonl"), run="named").run == "named"


def test_sink_counts_worker_group_restarts(tmp_path, gauges):
    sink = MetricsSink(str(tmp_path / "run" / "metrics.jsonl"))
    for step in (1, 2, 3, 4, 5, 6):
        sink.log(_step(step))
    assert sink.restarts == 0
    sink.log(_step(5, resumed=4))  # restored the step-4 checkpoint: the steps go back
    assert sink.restarts == 1
    sink.log(_step(6, resumed=4))
    sink.log(_step(7, resumed=4))
    assert sink.restarts == 1
    sink.log(
        _step(7, resumed=4)
    )  # the same step again: restarted from the same checkpoint, no record between
    assert sink.restarts == 2
    sink.log(_step(9, resumed=8))  # a restart right after a logged checkpoint: only the resume point says so
    assert sink.restarts == 3
    sink.log(_step(10, resumed=8))
    sink.log(_step(10, resumed=8, final=True))  # the final record repeats the last step: no restart
    assert sink.restarts == 3
    assert sink.exported["llmopt_train_restarts"] == 3.0
    assert sink.exported["llmopt_train_finished"] == 1.0
    restarts = next(g for g in gauges if g.name == "llmopt_train_restarts")
    assert [value for value, _ in restarts.sets] == [0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 3]


def test_sink_writes_metrics_jsonl_when_gauges_are_unusable(tmp_path, monkeypatch):
    import ray.util.metrics

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("no metrics here")

    monkeypatch.setattr(ray.util.metrics, "Gauge", Broken)
    sink = MetricsSink(str(tmp_path / "run" / "metrics.jsonl"))
    sink.log(_step(1))
    sink.log(_step(2))
    assert len(sink.path.read_text().splitlines()) == 2
    assert sink.exported["llmopt_train_step"] == 2.0  # still what would have been exported

    class FailsOnSet(_FakeGauge):
        def set(self, value, tags=None):
            raise ValueError("bad value")

    monkeypatch.setattr(ray.util.metrics, "Gauge", FailsOnSet)
    sink = MetricsSink(str(tmp_path / "other" / "metrics.jsonl"))
    sink.log(_step(1))
    sink.log(_step(2))
    assert len(sink.path.read_text().splitlines()) == 2 and sink.latest()["step"] == 2
