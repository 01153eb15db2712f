"""The strategy search's guard against trials that will miss the loss ceiling: a prior from the baseline's
steps x learning rate, then a line through the finished trials of the same method family."""

import json
import math

from llmopt.config import load_config
from llmopt.tune import CostModel, Hardware, load_space, model_shape, recommend
from llmopt.tune._loss_guard import LossGuard, Observation, family, progress, update_scale
from llmopt.tune._rank import baseline_config
from llmopt.tune._search import SearchSettings, TrialContext, _get, _observations, _seed_points, run_trial
from llmopt.tune._workload import workload_for

BASE = Observation("lora", progress(32, 1e-3), 2.25)


def test_progress_and_family():
    assert progress(32, 1e-3) == math.log(0.032)
    # peft multiplies a LoRA product by alpha / r: r8 at alpha 8 moves half as far a step as at alpha 16.
    assert update_scale(load_config(None, ["lora.r=8", "lora.alpha=16"])) == 2.0
    assert update_scale(load_config(None, ["lora.r=4", "lora.alpha=8", "lora.method=dora"])) == 2.0
    assert update_scale(load_config(None, ["lora.method=ia3"])) == 1.0  # IA3 has no alpha
    assert update_scale(load_config(None, ["lora.enabled=false"])) == 1.0
    assert progress(32, 1e-3, 2.0) == math.log(0.064)
    assert family(load_config(None, ["lora.enabled=false"])) == "full"
    assert family(load_config(None, ["quantization.mode=nf4"])) == "qlora"
    assert family(load_config(None, ["quantization.mode=none"])) == "lora"


def test_under_the_baseline_ceiling_less_progress_than_the_baseline_misses():
    guard = LossGuard(2.25, BASE)  # the ceiling is the baseline's own loss
    assert guard.judge("lora", BASE.progress) is None  # the same training, other numerics: may meet it
    assert guard.judge("lora", progress(32, 1e-3 * (1 + 1e-12))) is None
    # The shipped search's miss: r8 at alpha 8 beside the baseline's r8 at alpha 16, same steps and rate.
    assert "under the baseline's" in guard.judge("lora", progress(32, 1e-3, 0.5))
    assert "under the baseline's" in guard.judge("lora", progress(16, 1.5e-3))  # 0.75 of it
    assert guard.judge("lora", progress(4, 1e-2)) is None  # fewer steps, a higher rate: more progress
    assert LossGuard(2.25 * (1 + 5e-5), BASE).judge("lora", progress(16, 1.5e-3))  # within the tolerance


def test_fewer_steps_than_the_baseline_miss_its_ceiling_until_a_run_with_as_few_met_it():
    base = Observation("lora", progress(32, 1e-3), 2.25, steps=32)
    guard = LossGuard(2.25, base)
    # Half the steps at three times the rate: more steps x lr than the baseline, still projected to miss.
    why = guard.judge("lora", progress(16, 3e-3), 16)
    assert why and "16 optimizer steps" in why and "baseline's 32" in why
    assert guard.judge("lora", progress(32, 1e-3), 32) is None
    assert guard.judge("lora", progress(16, 3e-3)) is None  # steps unknown: the prior on progress only
    assert LossGuard(2.4, base).judge("lora", progress(16, 3e-3), 16) is None  # a looser ceiling
    # A finished run of the family with as few steps that met the ceiling lifts the prior for that family.
    met = LossGuard(2.25, base, [Observation("lora", progress(16, 4e-3), 2.24, steps=16)])
    assert met.judge("lora", progress(16, 3e-3), 16) is None
    assert "no finished qlora run" in met.judge("qlora", progress(16, 3e-3), 16)


def test_a_finished_miss_with_more_progress_and_steps_dominates():
    base = Observation("lora", progress(32, 1e-3), 2.25, steps=32)
    missed = Observation("qlora", progress(32, 4e-3), 2.37, steps=32)  # more progress than the baseline
    guard = LossGuard(2.25, base, [missed])
    why = guard.judge("qlora", progress(32, 3e-3), 32)
    assert why and "a finished qlora run" in why and "2.3700" in why
    assert guard.judge("qlora", progress(32, 5e-3), 32) is None  # further than the miss went: may meet it
    assert guard.judge("lora", progress(32, 1e-3), 32) is None  # another family
    # Within run-to-run noise of the ceiling a miss decides nothing.
    near = LossGuard(2.25, base, [Observation("lora", progress(32, 2e-3), 2.2540, steps=32)])
    assert near.judge("lora", progress(32, 1.5e-3), 32) is None


def test_a_looser_ceiling_prunes_only_far_less_progress_than_the_baseline_of_its_family():
    guard = LossGuard(2.4, BASE)
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
    assert "under the baseline's" in guard.judge("lora", BASE.progress - 0.3)
    assert LossGuard(2.4, BASE, flat).judge("lora", BASE.progress - 0.3) is None


def test_observations_come_from_the_trials_outcome_files(tmp_path):
    def write(name, **record):
        (tmp_path / name).mkdir()
        (tmp_path / name / "outcome.json").write_text(json.dumps(record))

    write("t1", status="ok", family="lora", loss_progress=-3.0, eval_loss=2.3, steps_planned=32)
    write("t2", status="infeasible", family="full", loss_progress=-4.0, eval_loss=2.6)
    write("t3", status="pruned", family="lora", loss_progress=-5.0, eval_loss=None)  # never ran
    write("t4", status="infeasible", reason="memory", eval_loss=None)  # stopped before its evaluation
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "outcome.json").write_text("{not json")  # being written
    assert _observations(tmp_path) == [Observation("lora", -3.0, 2.3, 32), Observation("full", -4.0, 2.6)]


def test_seeds_move_further_than_the_baseline_at_its_steps_and_rate(repo):
    space = load_space(repo / "tune_spaces/strategy.yaml")
    base = load_config(None, ["model.name_or_path=tiny-llama", "lora.alpha=16"])
    cost = CostModel(model_shape("tiny-llama"), Hardware(accelerator="cpu", cpus=2, memory_bytes=24 * 2**30))
    ranking = recommend(base, space, cost, 800 * 2**20)
    reference = baseline_config(base, cost.shape.params)
    assert update_scale(reference) == 1.0  # the small_model template: r8, alpha 8
    paths = {p.path: _get(base, p.path) for p in space.parameters}
    key = {p.path: p.key for p in space.parameters}

    def adapters(points):
        return {
            (int(point[key["lora.r"]]), float(point[key["lora.alpha"]]))
            for point in points
            if str(point.get(key["lora.enabled"])).lower() == "true"
        }

    scaled = adapters(_seed_points(space, ranking, 8, 16, paths, update_scale(reference)))
    ranks = {r for r, _ in scaled}
    assert {4, 8} <= ranks
    # Twice the baseline's scale where alpha's choices (8, 16, 32) reach it, never under the baseline's.
    assert all(alpha / r == 2.0 for r, alpha in scaled if r <= 16)
    assert all(alpha / r >= 1.0 for r, alpha in scaled)
    higher = adapters(_seed_points(space, ranking, 8, 16, paths, 2.0))
    assert all(alpha / r >= 2.0 for r, alpha in higher if r <= 16)
    plain = adapters(_seed_points(space, ranking, 8, 16, paths))
    assert {alpha for _, alpha in plain} == {16.0}  # without a baseline: the base config's alpha


def test_a_trial_under_the_baselines_progress_is_pruned_before_it_trains(repo, tmp_path):
    """run_trial records the adapter's scale in its progress and asks the guard before any fine-tune."""
    space = load_space(repo / "tune_spaces/strategy.yaml")
    base = load_config(repo / "jobs/configs/tiny-llama-reverse.yaml", ["parallelism.num_workers=1"])
    cost = CostModel(model_shape("tiny-llama"), Hardware(accelerator="cpu", cpus=2, memory_bytes=24 * 2**30))
    settings = SearchSettings(loss_ceiling=2.25, trial_tokens=32 * 16 * 64)  # 32 steps of 16 rows
    ctx = TrialContext(base, space, {}, cost, workload_for(base), settings, loss_ceiling=2.25)
    ctx.loss_reference = Observation("lora", progress(32, 3e-3, 2.0), 2.25, steps=32)  # r4 at alpha 8
    (tmp_path / "exp").mkdir()

    def trial(name, *overrides):
        config = load_config(
            repo / "jobs/configs/tiny-llama-reverse.yaml", ["parallelism.num_workers=1", *overrides]
        )
        return run_trial(ctx, config, tmp_path / "exp" / name / "run", outcome_dir=tmp_path / "exp" / name)

    half = trial("r8-alpha8", "lora.r=8", "lora.alpha=8")  # the same steps and rate at half the scale
    assert half["status"] == "pruned" and "under the baseline's" in half["reason"]
    assert half["loss_progress"] == progress(32, 3e-3, 1.0) and half["steps_planned"] == 32
    assert not (tmp_path / "exp" / "r8-alpha8" / "run").exists()  # nothing trained
    # Twice the micro-batch: 16 steps at twice the rate and scale, more steps x lr x scale, still pruned.
    fewer = trial("mb32", "lora.r=4", "lora.alpha=16", "training.micro_batch_size=32", "training.lr=6e-3")
    assert fewer["status"] == "pruned" and "16 optimizer steps" in fewer["reason"]
    # The guard reads both records back as observations of nothing: they never ran.
    assert _observations(tmp_path / "exp") == []


def test_a_precision_the_cost_model_cannot_tell_apart_gets_a_seed(repo):
    space = load_space(repo / "tune_spaces/strategy.yaml")
    base = load_config(None, ["model.name_or_path=tiny-llama"])
    cost = CostModel(model_shape("tiny-llama"), Hardware(accelerator="cpu", cpus=2, memory_bytes=24 * 2**30))
    ranking = recommend(base, space, cost, 800 * 2**20)
    paths = {p.path: _get(base, p.path) for p in space.parameters}
    key = {p.path: p.key for p in space.parameters}
    top = ranking.ranked[0]
    other = next(c for c in ranking.ranked if c.config.precision != top.config.precision)
    gap = 1 - other.prediction.tokens_per_s / top.prediction.tokens_per_s
    assert gap > 0

    def precisions(spread):
        return [
            point[key["precision"]] for point in _seed_points(space, ranking, 4, None, paths, None, spread)
        ]

    alone = precisions(None)
    assert len(alone) == 4 and set(alone) == {top.config.precision}  # the defaults rank one precision first
    mixed = precisions(gap + 0.01)
    assert mixed[:3] == alone[:3] and mixed[3] == other.config.precision  # the last seed gives way
    assert precisions(gap / 2) == alone  # told apart by more than the model's error
