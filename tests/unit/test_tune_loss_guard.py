"""The strategy search's guard against trials that will miss the loss ceiling: a prior from the baseline's
steps x learning rate, then a line through the finished trials of the same method family."""

import json
import math

from llmopt.config import load_config
from llmopt.tune._loss_guard import LossGuard, Observation, family, progress
from llmopt.tune._search import _observations

BASE = Observation("lora", progress(32, 1e-3), 2.25)


def test_progress_and_family():
    assert progress(32, 1e-3) == math.log(0.032)
    assert family(load_config(None, ["lora.enabled=false"])) == "full"
    assert family(load_config(None, ["quantization.mode=nf4"])) == "qlora"
    assert family(load_config(None, ["quantization.mode=none"])) == "lora"


def test_the_prior_prunes_far_less_progress_than_the_baseline_of_its_family():
    guard = LossGuard(2.25, BASE)
    assert "under 0.5 of the baseline" in guard.judge("lora", progress(8, 1e-3))  # a quarter of the steps
    assert guard.judge("lora", progress(16, 1.5e-3)) is None  # 0.75 of it
    assert guard.judge("lora", progress(4, 1e-2)) is None  # fewer steps, a higher rate: more progress
    # Another family must move at least as far as the baseline did before its own runs say otherwise.
    assert "under the baseline's" in guard.judge("full", progress(32, 5e-4))
    assert "(qlora)" in guard.judge("qlora", progress(16, 1.5e-3))
    assert guard.judge("qlora", progress(32, 1.5e-3)) is None
    assert LossGuard(2.25, None).judge("lora", progress(1, 1e-5)) is None  # no baseline, no data: no guess


def test_finished_trials_replace_the_prior_with_a_line():
    # Loss falls by 0.1 per unit of log(steps x lr) around the baseline, with a little noise.
    runs = [
        Observation("lora", BASE.progress + d, 2.25 - 0.1 * d + e)
        for d, e in ((-2, 0.01), (1, -0.01), (2, 0))
    ]
    guard = LossGuard(2.25, BASE, runs)
    _, b, spread = guard.fit("lora")
    assert b < 0 and spread < 0.02
    why = guard.judge("lora", BASE.progress - 1.0)  # predicted 2.35: over the ceiling by more than the spread
    assert why and "from 4 finished runs" in why
    assert guard.judge("lora", BASE.progress - 0.05) is None  # within the spread of the ceiling
    # Beyond every observation the line says nothing (a high rate may diverge): never pruned there.
    assert guard.judge("lora", BASE.progress + 5) is None
    # The prior would have pruned a run at 0.4x the baseline's progress; the line, which has seen such a run
    # land under the ceiling, does not.
    lucky = [*runs, Observation("lora", BASE.progress + math.log(0.4), 2.2)]
    assert LossGuard(2.25, BASE, lucky).judge("lora", BASE.progress + math.log(0.45)) is None


def test_no_learning_signal_no_line():
    flat = [Observation("lora", BASE.progress + d, 2.25) for d in (-1, 0.5, 1)]
    guard = LossGuard(2.25, BASE, flat)
    assert guard.fit("lora") is None  # falls back to the prior
    assert guard.judge("lora", BASE.progress - 0.3) is None


def test_observations_come_from_the_trials_outcome_files(tmp_path):
    def write(name, **record):
        (tmp_path / name).mkdir()
        (tmp_path / name / "outcome.json").write_text(json.dumps(record))

    write("t1", status="ok", family="lora", loss_progress=-3.0, eval_loss=2.3)
    write("t2", status="infeasible", family="full", loss_progress=-4.0, eval_loss=2.6)
    write("t3", status="pruned", family="lora", loss_progress=-5.0, eval_loss=None)  # never ran
    write("t4", status="infeasible", reason="memory", eval_loss=None)  # stopped before its evaluation
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "outcome.json").write_text("{not json")  # being written
    assert _observations(tmp_path) == [Observation("lora", -3.0, 2.3), Observation("full", -4.0, 2.6)]
