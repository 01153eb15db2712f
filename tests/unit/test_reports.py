"""PNG reports: a run's report.png (`llmopt runs show`) and the serve benchmark's timeline.

Records follow what a fine-tuning run writes to metrics.jsonl (copied from a real run's file, including the
`checkpointing_switch` records of a run whose peak went over its memory ceiling); older runs' records lack
the memory-ceiling fields, and the report must still draw. Only the PNG's validity and size are checked
here: whether a person can read it was checked by looking at it.
"""

import json
import struct

import pytest
from typer.testing import CliRunner

from benchmarks._load import timeline, timeline_window_s
from benchmarks.serve import plot_serve_timeline
from llmopt.cli import app
from llmopt.config import dump_config, validate_config
from llmopt.train import plot_report, read_metrics
from llmopt.train._runs import _switches

MIB = 2**20
CEILING = 644245094  # 0.8 of a 768 MiB budget


def _switch(from_layers, to_layers, peak):
    return {
        "from_layers": from_layers,
        "to_layers": to_layers,
        "peak_memory_bytes": peak,
        "ceiling_bytes": CEILING,
        "reason": f"peak memory {peak / MIB:.1f} MiB is over the ceiling 614.4 MiB "
        f"(monitor.memory_ceiling=0.8 of a 768.0 MiB budget); checkpointing layers {list(range(to_layers))} "
        "of 4",
    }


def _record(step, layers, **extra):
    """One metrics.jsonl record as the training loop writes it (tiny-llama, LoRA, one CPU worker)."""
    return {
        "step": step,
        "epoch": 0,
        "loss": 7.0 - 0.03 * step,
        "step_loss": 7.0 - 0.03 * step,
        "lr": 2e-4 * (1 - step / 16),
        "tokens_per_s": 3000.0 + 50 * (step % 3),
        "step_time_s": 0.065,
        "peak_memory_bytes": 650 * MIB + step * MIB,
        "peak_memory_over_setup_bytes": 70 * MIB,
        "window_peak_memory_bytes": 660 * MIB + (step % 4) * MIB,
        "checkpointed_layers": layers,
        "resumed_from_step": 0,
        "device": "cpu",
        "trainable_parameters": 57344,
        "total_parameters": 3483904,
        "world_size": 1,
        "torch_threads": 1,
        "precision": "fp32",
        "memory_ceiling_bytes": CEILING,
        **extra,
    }


def _history():
    """16 steps, evaluations at 8 and 16, checkpointing switches at steps 4 (0 -> 2 layers) and 8 (2 -> 4)."""
    rows = []
    for step in range(1, 17):
        layers = 0 if step <= 4 else 2 if step <= 8 else 4
        extra = {}
        if step >= 8:  # evaluations are carried forward to the following records
            extra.update(
                eval_loss=6.6 if step < 16 else 6.5, eval_exact_match=0.25, eval_step=8 if step < 16 else 16
            )
        if step == 4:
            extra["checkpointing_switch"] = _switch(0, 2, 699441152)
        if step == 8:
            extra["checkpointing_switch"] = _switch(2, 4, 697548800)
        if step == 16:
            extra.update(throughput_tokens_per_s=2234.0, final=True)
        rows.append(_record(step, layers, **extra))
    return rows


def _png_size(path):
    """Width and height from a PNG's header, after checking its signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _write_run(run, rows, summary=True):
    """A run directory as `llmopt finetune` leaves it: config.yaml, metrics.jsonl, summary.json."""
    run.mkdir()
    dump_config(validate_config({"name": "demo"}), run / "config.yaml")
    if rows is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        metrics = rows[-1] if rows else {}
        (run / "summary.json").write_text(
            json.dumps({"status": "finished", "seconds": 45.0, "metrics": metrics})
        )


# ---------------------------------------------------------------------------------------------- report.png


def test_report_png_with_checkpointing_switches(tmp_path):
    path = plot_report(_history(), tmp_path / "report.png", title="demo: tiny-llama, lora")
    assert path == tmp_path / "report.png"
    assert _png_size(path) == (1300, 850)  # 13 x 8.5 inches at 100 dpi: four panels
    assert 40_000 < path.stat().st_size < 1_000_000


def test_report_draws_records_without_the_optional_fields(tmp_path):
    """Runs from before the memory ceiling, without evaluations or learning rate, or of a single record."""
    bare = [
        {"step": s, "loss": 3.0 / s, "tokens_per_s": 100.0, "peak_memory_bytes": 2**30} for s in (1, 2, 3)
    ]
    assert _png_size(plot_report(bare, tmp_path / "bare.png")) == (1300, 850)
    # A ceiling far above the peaks (the default budget is the machine's memory) and no peaks at all.
    odd = [{"step": 1, "loss": None, "memory_ceiling_bytes": 20 * 2**30, "peak_memory_bytes": 600 * MIB}]
    assert _png_size(plot_report(odd, tmp_path / "odd.png")) == (1300, 850)
    assert _png_size(plot_report([{"step": 5}], tmp_path / "empty.png")) == (1300, 850)


def test_switches_are_counted_once_at_their_step():
    rows = _history()
    rows[4]["checkpointing_switch"] = rows[3]["checkpointing_switch"]  # a record repeating the last switch
    assert [(step, s["to_layers"]) for step, s in _switches(rows)] == [(4, 2), (8, 4)]


# ---------------------------------------------------------------------------------------------- runs show

runner = CliRunner()


def test_runs_show_writes_report_png(tmp_path):
    run = tmp_path / "demo-20260101-000000"
    _write_run(run, _history())
    result = runner.invoke(app, ["runs", "show", run.name, "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = run / "report.png"
    assert _png_size(report) == (1300, 850)
    assert "report.png" in result.output  # among the artifacts, and the path printed last
    assert result.output.replace("\n", "").endswith(f"report: {report}")
    assert len(read_metrics(run)) == 16


def test_runs_show_no_plot_and_a_run_without_metrics(tmp_path):
    run = tmp_path / "demo-1"
    _write_run(run, _history())
    result = runner.invoke(app, ["runs", "show", str(run), "--no-plot"])
    assert result.exit_code == 0 and not (run / "report.png").exists()
    # Killed before its first step: no metrics.jsonl, no summary. Said so, not failed.
    early = tmp_path / "demo-2"
    _write_run(early, None, summary=False)
    result = runner.invoke(app, ["runs", "show", str(early)])
    assert result.exit_code == 0, result.output
    assert "no metrics recorded" in result.output and not (early / "report.png").exists()


# ---------------------------------------------------------------------------------------- serve timeline


def _records():
    """Five requests of a 5 s load point: first token and end of each, one failed (see the test)."""
    return [
        {"start_s": 0.0, "ttft_s": 0.5, "latency_s": 1.0, "completion_tokens": 3, "events": 2},
        {"start_s": 0.5, "ttft_s": 1.0, "latency_s": 3.5, "completion_tokens": 6, "events": 3},
        {"start_s": 2.2, "ttft_s": 0.3, "latency_s": 0.8, "completion_tokens": 1, "events": 1},
        {"start_s": 4.5, "error": "HTTP 500: boom"},
        {"start_s": 3.0, "ttft_s": 1.2, "latency_s": 2.6, "completion_tokens": 2, "events": 2},
    ]


def test_timeline_windows_on_known_requests():
    """Windows [0, 2), [2, 4), [4, 5]. TTFTs count where the first token came (0.5, 1.5 | 2.5 | 4.2),
    latencies where the request ended (1.0 | 3.0 | 4.0, 5.6), failures where they were sent (4.5). The
    second request's 5 tokens after its first stream from 1.5 to 4.0 s: 1 in window 0, 4 in window 1."""
    result = timeline(_records(), wall_s=5.0, window_s=2.0)
    assert result["window_s"] == 2.0
    w0, w1, w2 = result["windows"]
    assert [(w["start_s"], w["end_s"]) for w in (w0, w1, w2)] == [(0.0, 2.0), (2.0, 4.0), (4.0, 5.0)]
    assert [(w["first_tokens"], w["completed"], w["errors"]) for w in (w0, w1, w2)] == [
        (2, 1, 0),
        (1, 1, 0),
        (1, 2, 1),
    ]
    assert w0["ttft_p50_s"] == pytest.approx(0.75) and w0["ttft_p99_s"] == pytest.approx(0.995)
    assert w0["latency_p50_s"] == w0["latency_p99_s"] == pytest.approx(1.0)
    assert w1["ttft_p50_s"] == pytest.approx(0.3) and w1["latency_p50_s"] == pytest.approx(0.8)
    assert w2["ttft_p50_s"] == pytest.approx(1.2)
    assert w2["latency_p50_s"] == pytest.approx(3.05) and w2["latency_p99_s"] == pytest.approx(3.491)
    # Tokens: 3 + (1 + 1) in window 0, 4 + 1 in window 1, 2 in the last (1 s long) window.
    rates = [w["output_tokens_per_s"] for w in (w0, w1, w2)]
    assert rates == pytest.approx([2.5, 2.5, 2.0])
    seconds = [w["end_s"] - w["start_s"] for w in (w0, w1, w2)]
    assert sum(r * s for r, s in zip(rates, seconds, strict=True)) == pytest.approx(12)  # every token, once


def test_timeline_empty_windows_and_window_choice():
    result = timeline([{"start_s": 0.1, "ttft_s": 0.2, "latency_s": 0.4, "completion_tokens": 4}], 6.5, 2.0)
    assert len(result["windows"]) == 4 and result["windows"][-1]["end_s"] == 6.5
    quiet = result["windows"][1]
    assert (
        quiet["ttft_p50_s"] is None and quiet["latency_p99_s"] is None and quiet["output_tokens_per_s"] == 0
    )
    assert timeline([], 0.0)["windows"][0]["completed"] == 0  # a point that sent nothing still has a window
    # The shortest of 2, 5, 10, 20, 30, 60 s with at most 30 windows.
    assert [timeline_window_s(s) for s in (1.0, 60.0, 100.0, 500.0, 5000.0)] == [2.0, 2.0, 5.0, 20.0, 60.0]
    assert timeline([], 100.0)["window_s"] == 5.0


def test_serve_timeline_png(tmp_path):
    """One row per load case with timelines; a failed case and a session case are left out."""
    records = _records()
    point = {"concurrency": 1, "timeline": timeline(records, 5.0)}
    later = {
        "concurrency": 4,
        "timeline": timeline([{**r, "start_s": r["start_s"] / 2} for r in records], 3.0),
    }
    report = {
        "settings": {"prompt_tokens": 64, "output_tokens": 64},
        "cases": [
            {"kind": "load", "preset": "tiny-llama", "label": "none", "points": [point]},
            {"kind": "load", "preset": "tiny-llama", "label": "continuous", "points": [point, later]},
            {"kind": "load", "preset": "tiny-llama", "label": "static", "points": [], "error": "boom"},
            {"kind": "session", "preset": "tiny-llama", "label": "session reuse", "points": []},
        ],
    }
    plot_serve_timeline(report, tmp_path / "serve_timeline.png")
    assert _png_size(tmp_path / "serve_timeline.png") == (1600, 740)  # 16 x (1.2 + 2 x 3.1) inches
    plot_serve_timeline({**report, "cases": report["cases"][2:]}, tmp_path / "none.png")
    assert _png_size(tmp_path / "none.png")[0] == 1600
