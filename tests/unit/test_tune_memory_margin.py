"""The search's memory margin: a strategy predicted within the cost model's measured memory error of the
budget is pruned before it trains (`SearchSettings.memory_margin`)."""

from __future__ import annotations

import math

import pytest

from llmopt.config import ConfigError, load_config
from llmopt.tune import CostModel, Hardware, load_space, model_shape
from llmopt.tune._loss_guard import Observation, progress
from llmopt.tune._search import MARGIN_REASON, SearchSettings, TrialContext, memory_margin, run_trial
from llmopt.tune._workload import workload_for

CONFIG = "jobs/configs/tiny-llama-reverse.yaml"


@pytest.mark.parametrize(
    ("setting", "errors", "want"),
    [
        (None, {"loo_memory_error": 0.045, "loo_step_time_error": 0.09}, 0.045),  # the measured error
        (0.0, {"loo_memory_error": 0.045}, 0.0),  # the setting wins, 0 included
        (0.1, None, 0.1),
        (None, None, 0.0),  # uncalibrated: its error is unknown, nothing pruned for it
        (None, {"loo_memory_error": math.nan}, 0.0),  # too few probes for a leave-one-out error
        (None, {"loo_memory_error": 0.6}, 0.25),  # a calibration that bad does not prune half the space
    ],
)
def test_the_margin_is_the_measured_memory_error_unless_set(setting, errors, want):
    assert memory_margin(setting, errors) == want


@pytest.mark.parametrize("margin", [-0.1, 0.5, 2.0])
def test_a_margin_outside_its_range_names_the_setting(margin):
    with pytest.raises(ConfigError, match="memory_margin"):
        SearchSettings(memory_margin=margin).check()


def test_a_strategy_predicted_within_the_margin_of_the_budget_is_pruned_before_it_trains(repo, tmp_path):
    space = load_space(repo / "tune_spaces/strategy.yaml")
    base = load_config(repo / CONFIG, ["parallelism.num_workers=1"])
    cost = CostModel(model_shape("tiny-llama"), Hardware(accelerator="cpu", cpus=2, memory_bytes=24 * 2**30))
    predicted = cost.predict(base, workload_for(base)).peak_bytes
    budget = int(predicted / 0.97)  # the prediction is 3% under the budget
    settings = SearchSettings(memory_budget_bytes=budget, loss_ceiling=2.25, trial_tokens=32 * 16 * 64)
    (tmp_path / "exp").mkdir()

    def trial(name: str, margin: float) -> dict:
        ctx = TrialContext(base, space, {}, cost, workload_for(base), settings, loss_ceiling=2.25)
        ctx.memory_margin = margin
        # A reference far ahead of this strategy's progress, so the loss guard prunes what the margin lets
        # through, and nothing trains in this test.
        ctx.loss_reference = Observation("lora", progress(32, 3e-3, 2.0) + 5.0, 2.25, steps=32)
        return run_trial(ctx, base, tmp_path / "exp" / name / "run", outcome_dir=tmp_path / "exp" / name)

    near = trial("five-percent", 0.05)
    assert near["status"] == "pruned" and near["predicted_peak_bytes"] == predicted
    assert "within 5.0% of the budget" in near["reason"] and "--memory-margin 0" in near["reason"]
    assert near["reason"].endswith(MARGIN_REASON)  # how the search's counts find it (`pruned_margin`)
    assert not (tmp_path / "exp" / "five-percent" / "run").exists()  # nothing trained
    # A margin under the 3% the prediction leaves passes it on to the next check (the loss guard here).
    passed = trial("two-percent", 0.02)
    assert passed["status"] == "pruned" and passed["reason"].startswith("projected to miss the loss ceiling")
    assert trial("none", 0.0)["reason"].startswith("projected to miss the loss ceiling")


def test_the_cli_passes_the_margin_and_refuses_one_out_of_range(repo, monkeypatch):
    import contextlib

    from typer.testing import CliRunner

    import llmopt.processes
    import llmopt.tune
    from llmopt.cli import app
    from llmopt.models import ModelLoadError

    seen = []

    def search(config, space, settings, out, resume=None):
        seen.append(settings.memory_margin)
        raise ModelLoadError("stopped here: the test checks the settings only")

    monkeypatch.setattr(llmopt.tune, "run_search", search)
    monkeypatch.setattr(llmopt.processes, "ray_session", lambda name: contextlib.nullcontext())
    runner = CliRunner()
    args = ["tune", "--config", str(repo / CONFIG), "--memory-budget", "800MiB"]
    stopped = runner.invoke(app, [*args, "--memory-margin", "0.03"])
    assert stopped.exit_code == 2 and "stopped here" in stopped.output and seen == [0.03]
    runner.invoke(app, args)
    assert seen == [0.03, None]  # unset: the search resolves it from the calibration
    refused = runner.invoke(app, [*args, "--memory-margin", "0.7"])
    assert refused.exit_code == 2 and "--memory-margin" in refused.output and len(seen) == 2
