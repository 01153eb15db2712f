"""The strategy search on the session's local cluster: a few real trials, pruning, an over-budget trial.

Each trial is a nested Ray Train run (~20 s of start-up on 2 cores), so one small search serves several
assertions; the trials train on 2048 tokens and evaluate 8 held-out rows.
"""

import json

import pytest

from llmopt.config import load_config
from llmopt.tune import SearchSettings, load_space, run_search

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = "jobs/configs/tiny-llama-reverse.yaml"
# Predicted ~880 MiB per worker (a full fine-tune of micro-batch 32 without checkpointing): above the
# budget below, so the cost model returns it at once, without training.
TOO_BIG = {
    "parallelism.zero_stage": 0,
    "lora.enabled": False,
    "checkpointing.policy": "none",
    "precision": "fp32",
    "training.micro_batch_size": 32,
    "training.gradient_accumulation_steps": 1,
    "training.lr": 1e-3,
}
MIB = 2**20


def _settings(**kw):
    base = {
        "trial_tokens": 2048,
        "eval_samples": 8,
        "seeds": 1,
        "max_concurrent_trials": 1,
        "trial_time_s": 240,
        "calibrate": "never",  # no probes here: calibrating is tested on its own
        "name": "search",
    }
    return SearchSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def search(ray_cluster, repo, tmp_path_factory):
    base = load_config(repo / CONFIG, [])
    space = load_space(repo / "tune_spaces/strategy.yaml")
    out = tmp_path_factory.mktemp("search")
    settings = _settings(num_samples=3, memory_budget_bytes=850 * MIB, points=[TOO_BIG])
    # The cost model's uncalibrated defaults, as on a fresh machine: a calibration cached by an earlier run
    # here (jobs.tune, llmopt recommend --calibrate) may predict TOO_BIG under the budget.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("llmopt.tune._calibrate.load_calibration", lambda *args, **kwargs: None)
        return run_search(base, space, settings, out, log=print)


def test_search_completes_and_writes_outputs(search):
    c = search.counts
    assert c["sampled"] == 3
    assert c["ok"] >= 1 and search.best is not None and search.best["feasible"]
    for name in ("best.yaml", "trials.csv", "trials.json", "pareto.png", "summary.json"):
        assert (search.out_dir / name).is_file(), name
    summary = json.loads((search.out_dir / "summary.json").read_text())
    assert summary["counts"] == c
    assert summary["cost_model"]["calibrated"] is False  # the defaults this module asks for
    # Uncalibrated, the cost model's memory error is unknown: no margin under the budget.
    assert summary["cost_model"]["memory_margin"] == 0.0 and c["pruned_margin"] == 0
    assert summary["cost_model"]["trial_errors"]["peak_memory"]["trials"] >= 1
    assert summary["baseline"]["trial_id"] == "baseline"
    # The baseline ran through the same trial code, on the same token budget, as every trial.
    assert search.baseline["status"] == "ok" and search.baseline["tokens_per_s"] > 0
    assert search.baseline["steps"] == search.baseline["steps_planned"]
    assert summary["comparison"]["speedup_tokens_per_s"] == pytest.approx(search.speedup)
    rows = json.loads((search.out_dir / "trials.json").read_text())
    assert len(rows) == 4  # three trials and the baseline
    assert any(search.experiment_path.glob("experiment_state-*.json"))  # restorable (--resume)


def test_pruned_by_cost_model_without_running(search):
    pruned = [r for r in search.rows if r["status"] == "pruned"]
    assert search.counts["pruned"] == len(pruned) >= 1
    first = pruned[0]
    assert first["reason"].startswith("pruned by cost model: memory:")
    assert first["predicted_peak_bytes"] > 850 * MIB
    assert first["steps"] == 0 and first["tokens_per_s"] is None
    # Never trained: no fine-tune run directory under the trial.
    trial_dir = next(p for p in search.experiment_path.iterdir() if p.name.startswith(first["trial_id"]))
    assert not (trial_dir / "run" / "metrics.jsonl").exists()


def test_best_config_runs_with_finetune_job(search, tmp_path):
    from jobs.finetune import main

    result = main(
        [
            "--config",
            str(search.out_dir / "best.yaml"),
            "training.max_steps=2",
            "training.warmup_steps=0",
            "training.eval_every_steps=null",
            "training.checkpoint_every_steps=null",
            "data.max_eval_samples=8",
            f"output_dir={tmp_path}",
        ]
    )
    assert result.ok and result.metrics["step"] == 2


def test_over_budget_trial_is_recorded_not_fatal(ray_cluster, repo, tmp_path):
    """A budget far below any real run, with pruning off: the trial runs, passes the budget at its first
    step, is stopped and recorded as infeasible; the search still returns its outputs. Its concurrency is
    `auto`: read from the running cluster (one node, CPU trials: one at a time)."""
    base = load_config(repo / CONFIG, [])
    space = load_space(repo / "tune_spaces/strategy.yaml")
    settings = _settings(
        num_samples=1, memory_budget_bytes=64 * MIB, prune=False, baseline=False, max_concurrent_trials=None
    )
    lines: list[str] = []
    result = run_search(base, space, settings, tmp_path, log=lambda line: (print(line), lines.append(line)))
    assert any(line.startswith("concurrent trials: 1 (one CPU trial per node") for line in lines), lines
    assert result.counts["sampled"] == 1 and result.counts["infeasible"] == 1
    (row,) = result.rows
    assert row["status"] == "infeasible" and not row["feasible"]
    assert row["reason"].startswith("memory: peak")
    assert row["peak_memory_bytes"] > 64 * MIB
    assert result.best is None and not (tmp_path / "best.yaml").exists()
    assert (tmp_path / "trials.csv").is_file() and (tmp_path / "summary.json").is_file()


def test_resume_restores_the_experiment(search, repo, tmp_path):
    """`--resume`: Tuner.restore of the search's experiment; its trials come back, none runs again."""
    base = load_config(repo / CONFIG, [])
    space = load_space(repo / "tune_spaces/strategy.yaml")
    settings = _settings(num_samples=3, memory_budget_bytes=850 * MIB, baseline=False)
    again = run_search(base, space, settings, tmp_path, resume=search.experiment_path, log=print)
    assert again.experiment_path == search.experiment_path
    assert sorted(r["trial_id"] for r in again.rows) == sorted(r["trial_id"] for r in search.rows)
    by_id = {r["trial_id"]: r for r in search.rows}
    for row in again.rows:
        assert row["status"] == by_id[row["trial_id"]]["status"]
        assert row.get("tokens_per_s") == by_id[row["trial_id"]].get("tokens_per_s")
    assert (tmp_path / "trials.csv").is_file() and (tmp_path / "summary.json").is_file()
