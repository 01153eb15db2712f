"""Scoring, feasibility and the search's report files, on made-up trial records (no Ray)."""

import csv
import json
from pathlib import Path

import pytest

from llmopt.config import load_config
from llmopt.tune import (
    SearchResult,
    SearchSettings,
    feasibility,
    pareto_front,
    score,
    trial_config,
    write_outputs,
)
from llmopt.tune._report import prediction_errors
from llmopt.tune._search import WORST_SCORE, concurrent_trials, error_summary, trial_placement

MIB = 2**20


def test_feasibility_and_score():
    assert feasibility(True, 500 * MIB, 1.0, 600 * MIB, 1.5) == (True, "")
    ok, why = feasibility(True, 700 * MIB, 1.0, 600 * MIB, None)
    assert not ok and why.startswith("memory: peak 700.0 MiB > budget 600.0 MiB")
    ok, why = feasibility(True, 500 * MIB, 2.0, None, 1.5)
    assert not ok and why.startswith("loss:")
    assert not feasibility(True, 1, None, None, 1.5)[0]  # no held-out loss cannot meet a ceiling
    # The ceiling's own run computed in another order: a few 1e-6 over it still meets it; 1e-3 does not.
    assert feasibility(True, 1, 2.255672, None, 2.255670)[0]
    assert not feasibility(True, 1, 2.2565, None, 2.2557)[0]
    assert not feasibility(False, 1, 1.0, None, None)[0]
    assert not feasibility(True, 1, 1.0, None, None, seconds=20, time_limit_s=10)[0]
    assert score("throughput", True, 1234.0, 3.0) == 1234.0
    assert score("loss", True, 1234.0, 3.0) == -3.0
    assert score("throughput", False, 1234.0, 3.0) == score("loss", False, 1.0, 1.0) == WORST_SCORE
    assert score("loss", True, 1.0, float("nan")) == WORST_SCORE


def test_settings_errors_name_the_field():
    with pytest.raises(Exception) as info:
        SearchSettings(objective="fast", num_samples=0, loss_ceiling="baseline", baseline=False).check()
    text = str(info.value)
    assert "objective" in text and "num_samples" in text and "loss_ceiling" in text


def test_trial_config_gives_every_strategy_the_same_tokens(repo):
    base = load_config(repo / "jobs/configs/tiny-llama-reverse.yaml", [])
    settings = SearchSettings(trial_tokens=64 * 16 * 8, eval_samples=16)
    small = trial_config(base, settings, Path("/tmp/t/run"), "t")
    big = trial_config(
        base.model_copy(update={"training": base.training.model_copy(update={"micro_batch_size": 32})}),
        settings,
        Path("/tmp/t/run"),
        "t",
    )
    assert small.training.max_steps == 8 and big.training.max_steps == 4
    assert small.parallelism.num_workers == 1 and small.resources.cpus_per_worker == 0.99
    assert small.data.max_eval_samples == 16 and small.training.eval_every_steps is None


def test_pareto_front():
    points = [(100, 10), (200, 30), (150, 5), (300, 25), (120, 20)]
    assert pareto_front(points) == [(100, 10), (120, 20), (200, 30)]


def _row(i, tps, peak, loss, status="ok", feasible=True):
    return {
        "trial_id": f"t{i}",
        "strategy": f"s{i}",
        "status": status,
        "feasible": feasible,
        "reason": "" if feasible else "memory: over",
        "score": tps if feasible else WORST_SCORE,
        "tokens_per_s": tps,
        "peak_memory_bytes": peak,
        "eval_loss": loss,
        "param/training.micro_batch_size": 8 * (i + 1),
    }


def test_write_outputs(tmp_path, repo):
    rows = [
        _row(0, 2000.0, 700 * MIB, 3.1),
        _row(1, 3000.0, 760 * MIB, 3.0),
        _row(2, 3500.0, 900 * MIB, 3.2, status="infeasible", feasible=False),
        {"trial_id": "t3", "status": "pruned", "feasible": False, "score": WORST_SCORE, "tokens_per_s": None},
    ]
    baseline = {**_row(9, 1500.0, 650 * MIB, 3.05), "trial_id": "baseline"}
    best_config = load_config(repo / "jobs/configs/tiny-llama-reverse.yaml", [])
    result = SearchResult(
        rows=rows,
        best=rows[1],
        best_config=best_config,
        baseline=baseline,
        counts={"sampled": 4, "ok": 2, "pruned": 1, "infeasible": 1},
        out_dir=tmp_path,
        experiment_path=tmp_path / "tune" / "x",
        settings={"memory_budget_bytes": 800 * MIB, "name": "unit"},
    )
    paths = write_outputs(result)
    assert set(paths) == {"trials.csv", "trials.json", "pareto.png", "summary.json", "best.yaml"}
    with (tmp_path / "trials.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["trial_id"] for r in table] == ["t0", "t1", "t2", "t3", "baseline"]
    assert "param/training.micro_batch_size" in table[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["cost_model"]["trial_errors"]) == {"tokens_per_s", "peak_memory"}
    assert summary["comparison"]["speedup_tokens_per_s"] == pytest.approx(2.0)
    assert summary["comparison"]["eval_loss_best_le_baseline"] is True
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert load_config(tmp_path / "best.yaml", []).name == best_config.name


def test_prediction_errors_over_the_trials_that_ran():
    rows = [
        {
            **_row(0, 2000.0, 800 * MIB, 3.0),
            "predicted_tokens_per_s": 1500.0,
            "predicted_peak_bytes": 880 * MIB,
        },
        {
            **_row(1, 4000.0, 500 * MIB, 3.0),
            "predicted_tokens_per_s": 5000.0,
            "predicted_peak_bytes": 500 * MIB,
        },
        # Pruned: predicted, never measured; it counts in neither error.
        {"trial_id": "t2", "status": "pruned", "predicted_tokens_per_s": 9.0, "predicted_peak_bytes": 1},
    ]
    errors = prediction_errors(rows)
    assert errors["tokens_per_s"] == {
        "mean_abs_error": pytest.approx(0.25),
        "max_abs_error": 0.25,
        "trials": 2,
    }
    assert errors["peak_memory"]["mean_abs_error"] == pytest.approx(0.05)
    assert errors["peak_memory"]["max_abs_error"] == pytest.approx(0.1)
    assert prediction_errors([])["tokens_per_s"]["trials"] == 0


def test_error_summary_keeps_the_exception_a_worker_ended_with():
    ray_error = (
        "WorkerGroupError: Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"
        'Traceback (most recent call last):\n  File "/x/_loop.py", line 245, in loop\n'
        "    engine = deepspeed.initialize(\n... (Output truncated) ...\n"
        "RuntimeError: shape '[256, 128]' is invalid for input of size 16384\n"
    )
    assert error_summary(ray_error) == (
        "WorkerGroupError: Training failed due to worker errors: ... "
        "RuntimeError: shape '[256, 128]' is invalid for input of size 16384"
    )
    assert error_summary("ValueError: bad") == "ValueError: bad"
    assert len(error_summary("x" * 2000)) == 500


def test_concurrent_trials_from_the_cluster():
    eight_gpus = {"CPU": 96.0, "GPU": 8.0, "memory": 1e12}
    # GPU trials: whole trials out of the nodes' (GPU, CPU) worker slots.
    count, why = concurrent_trials([eight_gpus, eight_gpus], workers=2, cpus_per_worker=4, gpus_per_worker=1)
    assert count == 8 and "16 worker slot(s)" in why
    assert (
        concurrent_trials([eight_gpus], workers=4, cpus_per_worker=30, gpus_per_worker=1)[0] == 1
    )  # CPUs bound
    assert concurrent_trials([eight_gpus], workers=3, cpus_per_worker=1, gpus_per_worker=1)[0] == 2
    # CPU trials: one per node that holds one, however many cores it has.
    count, why = concurrent_trials([{"CPU": 2.0}, {"CPU": 64.0}, {"CPU": 0.5}], 1, 0.99, 0.0)
    assert count == 2 and "measure each other" in why
    assert concurrent_trials([{"CPU": 2.0}], 4, 0.99, 0.0)[0] == 1  # never under one
    with pytest.raises(Exception, match="max_concurrent_trials"):
        SearchSettings(max_concurrent_trials=0).check()
    SearchSettings(max_concurrent_trials=None).check()  # auto


def test_a_trial_stays_on_one_node_when_one_holds_it():
    eight_gpus = {"CPU": 96.0, "GPU": 8.0}
    assert trial_placement([eight_gpus, eight_gpus], 8, 4, 1) == "STRICT_PACK"
    assert trial_placement([eight_gpus, eight_gpus], 16, 4, 1) == "PACK"  # no node holds 16 GPUs
    assert trial_placement([{"CPU": 2.0}], 2, 0.99, 0) == "STRICT_PACK"
    assert trial_placement([{"CPU": 2.0}, {"CPU": 2.0}], 3, 0.99, 0) == "PACK"
    assert load_config(
        None, ["parallelism.placement_strategy=STRICT_PACK"]
    ).parallelism.placement_strategy == ("STRICT_PACK")
