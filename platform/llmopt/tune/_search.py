"""The strategy search: a Ray Tune run (OptunaSearch + ASHA) whose trials are short real fine-tunes.

Every trial builds a RunConfig from the sampled strategy, sizes it to the same number of training
tokens as every other trial (steps = ceil(tokens / (micro_batch x accumulation x max_seq_len))), asks
the cost model first (a strategy predicted above the memory budget returns at once as `pruned`,
without training), then runs `llmopt.train.finetune` (a nested Ray Train run) in a thread while the
trial streams the run's `metrics.jsonl` to Tune, one report per optimizer step, so that ASHA can stop
slow strategies early. A run whose measured peak memory passes the budget is stopped and recorded as
infeasible; a crash, an out-of-memory kill or a timeout is recorded too: nothing escapes a trial, and
the search goes on.

The rule-based template (`baseline_config`) runs through the same trial code, token budget, eval set
and resources before the search, so the report compares both from one run.

Resources: the trial (its actor, which drives the nested Ray Train run) holds no CPU, only a little of
Ray's logical memory, and its worker `resources.cpus_per_worker` (0.99 by default). A trial holding a
whole CPU made its nested TorchTrainer wait forever on a 2-CPU cluster; holding 0.01 CPU, trial actors
gathered on one node and left its CPUs short of a worker's, so that on 1-CPU nodes the trials ran one
after another on the other node.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from llmopt.config import ConfigError, ConfigIssue, RunConfig, format_bytes, validate_config
from llmopt.tune._cost import CostModel
from llmopt.tune._hardware import GIB
from llmopt.tune._loss_guard import (
    SCALED_METHODS,
    LossGuard,
    Observation,
    family,
    highest_meeting,
    progress,
    update_scale,
)
from llmopt.tune._rank import COST_PATHS, baseline_config, describe, recommend
from llmopt.tune._report import SearchResult, write_outputs
from llmopt.tune._space import SearchSpace, space_facts
from llmopt.tune._workload import Workload, workload_for

Objective = Literal["throughput", "loss"]
WORST_SCORE = -1.0e9  # what an infeasible, pruned or crashed trial scores (mode is always "max")


@dataclass
class SearchSettings:
    """How a strategy search runs.

    Attributes:
        objective: `throughput` (highest tokens/s under the memory budget and loss ceiling) or `loss`
            (lowest held-out loss under the memory budget, within `trial_time_s` per trial).
        memory_budget_bytes: Peak memory allowed per worker (None: only the machine's limits).
        memory_margin: Share of the budget a prediction must stay under to run: a strategy predicted above
            `memory_budget_bytes x (1 - memory_margin)` is pruned, as the cost model cannot tell whether it
            fits. None: the calibration's mean leave-one-out peak-memory error on this machine (0 when
            uncalibrated, whose error is not known).
        loss_ceiling: Highest held-out loss a feasible strategy may reach; `"baseline"` takes the
            rule-based template's measured held-out loss from the same run; None: no ceiling.
        num_samples: Trials the searcher proposes.
        max_concurrent_trials: Trials running at once; None: from the cluster (`concurrent_trials`).
        time_budget_s: Wall-clock limit of the whole search (None: none).
        trial_tokens: Training tokens every trial (and the baseline) trains on.
        trial_time_s: A trial that has not finished after this many seconds is stopped (infeasible).
        eval_samples: Held-out rows every trial evaluates on (the same rows for all).
        workers: Ray Train workers per trial.
        cpus_per_worker: CPUs of each trial worker (the trial itself holds none).
        seeds: The cost model's top-ranked distinct strategies evaluated first.
        prune: Ask the cost model before training (pruned strategies return at once, not run).
        baseline: Run the rule-based template in the same run.
        scheduler: `asha` (stop weak trials at rungs of `grace_period` steps), `fifo`, or `auto`: ASHA
            unless a loss ceiling judges a throughput search (a trial's early tokens/s says nothing about
            whether its final held-out loss meets the ceiling, and ASHA then stopped the useful ones).
        grace_period: Steps before ASHA may stop a trial.
        points: Strategies (search-space values by parameter name) to evaluate first, before the seeds.
        calibrate: Measure the cost model's probes first: `auto` when no calibration of the model on this
            machine is cached, `always`, or `never` (cached or uncalibrated defaults).
        seed: Searcher seed.
        name: Experiment name (Tune's directory under `<out>/tune/`).
    """

    objective: Objective = "throughput"
    memory_budget_bytes: int | None = None
    memory_margin: float | None = None
    loss_ceiling: float | Literal["baseline"] | None = None
    num_samples: int = 12
    max_concurrent_trials: int | None = 1
    time_budget_s: float | None = None
    trial_tokens: int = 32_768
    trial_time_s: float = 600.0
    eval_samples: int = 64
    workers: int = 1
    cpus_per_worker: float = 0.99
    seeds: int = 4
    prune: bool = True
    baseline: bool = True
    scheduler: Literal["auto", "asha", "fifo"] = "auto"
    grace_period: int = 4
    points: list[dict[str, Any]] = field(default_factory=list)
    calibrate: Literal["auto", "always", "never"] = "auto"
    seed: int = 0
    name: str = "strategy-search"

    def check(self) -> None:
        """Raise ConfigError naming each invalid setting and its fix."""
        issues = []
        if self.objective not in ("throughput", "loss"):
            issues.append(ConfigIssue("objective", f"{self.objective!r} must be 'throughput' or 'loss'"))
        for name in ("num_samples", "max_concurrent_trials", "trial_tokens", "eval_samples", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                issues.append(ConfigIssue(name, f"{getattr(self, name)} must be at least 1"))
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            issues.append(ConfigIssue("memory_budget", "must be positive, e.g. 1GiB"))
        if self.memory_margin is not None and not 0 <= self.memory_margin < 0.5:
            issues.append(
                ConfigIssue("memory_margin", f"{self.memory_margin} must be a share in [0, 0.5), e.g. 0.05")
            )
        if isinstance(self.loss_ceiling, str) and self.loss_ceiling != "baseline":
            issues.append(ConfigIssue("loss_ceiling", f"{self.loss_ceiling!r}: give a number or 'baseline'"))
        if self.loss_ceiling == "baseline" and not self.baseline:
            issues.append(
                ConfigIssue("loss_ceiling", "'baseline' needs the baseline run; drop --no-baseline")
            )
        if self.calibrate not in ("auto", "always", "never"):
            issues.append(ConfigIssue("calibrate", f"{self.calibrate!r} must be auto, always or never"))
        if self.cpus_per_worker <= 0:
            issues.append(ConfigIssue("cpus_per_worker", f"{self.cpus_per_worker} must be > 0 (e.g. 0.99)"))
        if issues:
            raise ConfigError(issues)


def concurrent_trials(
    nodes: list[dict[str, float]], workers: int, cpus_per_worker: float, gpus_per_worker: float
) -> tuple[int, str]:
    """How many trials the cluster runs at once, and why.

    Args:
        nodes: Each alive node's total resources (`ray.nodes()[i]["Resources"]`: CPU, GPU, ...).
        workers, cpus_per_worker, gpus_per_worker: One trial's Ray Train workers and what each holds.

    GPU trials: as many as the nodes' worker slots (a slot: `gpus_per_worker` GPUs and `cpus_per_worker`
    CPUs on one node) hold whole trials. CPU trials: one per node that holds a whole trial, because a
    trial's score is the tokens/s it measures and two trials on the same cores measure each other.
    """
    if gpus_per_worker > 0:
        slots = sum(
            int(min(n.get("GPU", 0.0) // gpus_per_worker, n.get("CPU", 0.0) // cpus_per_worker))
            for n in nodes
        )
        gpus = sum(n.get("GPU", 0.0) for n in nodes)
        count = slots // workers
        why = (
            f"{slots} worker slot(s) of {gpus_per_worker:g} GPU + {cpus_per_worker:g} CPU over {len(nodes)} "
            f"node(s) with {gpus:g} GPU(s), {workers} worker(s) a trial"
        )
    else:
        count = sum(1 for n in nodes if n.get("CPU", 0.0) >= workers * cpus_per_worker - 1e-9)
        why = (
            f"one CPU trial per node that holds its {workers} x {cpus_per_worker:g} CPUs ({count} of "
            f"{len(nodes)} node(s)): trials on the same cores would measure each other's tokens/s"
        )
    return max(1, count), why


def trial_placement(
    nodes: list[dict[str, float]], workers: int, cpus_per_worker: float, gpus_per_worker: float
) -> str:
    """`STRICT_PACK` (every worker of a trial on one node) when a node can hold a whole trial, else `PACK`.

    A trial measures its strategy's tokens/s: spread over nodes it would measure the network too, and two
    trials of one strategy would measure differently by where they landed.
    """

    def holds(node: dict[str, float]) -> bool:
        cpu_ok = node.get("CPU", 0.0) >= workers * cpus_per_worker - 1e-9
        return cpu_ok and (gpus_per_worker <= 0 or node.get("GPU", 0.0) >= workers * gpus_per_worker - 1e-9)

    return "STRICT_PACK" if any(holds(n) for n in nodes) else "PACK"


# --- scoring (pure) ------------------------------------------------------------------------------------
TRIAL_RESOURCES = {"memory": 64 * 2**20}  # a trial's own actor; see the module doc
SEED_SCALE_FACTOR = 2.0  # a seeded adapter's update scale over the baseline's; see `_seed_points`
# Ends the reason of a trial pruned for the memory margin; the search's counts find those trials by it.
MARGIN_REASON = "the cost model's memory error on this machine (--memory-margin 0 runs it)"
UNCALIBRATED_SPREAD = 0.25  # seeds of another precision within this share of the top, uncalibrated


def feasibility(
    ok: bool,
    peak_bytes: int | None,
    eval_loss: float | None,
    budget_bytes: int | None,
    loss_ceiling: float | None,
    seconds: float | None = None,
    time_limit_s: float | None = None,
) -> tuple[bool, str]:
    """Whether a finished trial meets the budget and ceiling, and if not, why (the first reason)."""
    if not ok:
        return False, "run failed"
    if budget_bytes is not None and (peak_bytes or 0) > budget_bytes:
        return False, f"memory: peak {format_bytes(peak_bytes or 0)} > budget {format_bytes(budget_bytes)}"
    if loss_ceiling is not None and (eval_loss is None or not eval_loss <= highest_meeting(loss_ceiling)):
        return False, f"loss: held-out loss {eval_loss} > ceiling {loss_ceiling:.4f}"
    if time_limit_s is not None and seconds is not None and seconds > time_limit_s:
        return False, f"time: {seconds:.0f} s > {time_limit_s:.0f} s"
    return True, ""


def score(objective: Objective, feasible: bool, tokens_per_s: float | None, loss: float | None) -> float:
    """The searched metric (always maximised): tokens/s, or minus the loss; WORST_SCORE when infeasible."""
    if not feasible:
        return WORST_SCORE
    if objective == "throughput":
        return float(tokens_per_s or 0.0)
    return -float(loss) if loss is not None and math.isfinite(loss) else WORST_SCORE


# --- one trial ------------------------------------------------------------------------------------------
@dataclass
class TrialContext:
    """What every trial needs; shipped once through the object store (`tune.with_parameters`)."""

    base: RunConfig
    space: SearchSpace
    facts: dict[str, Any]
    cost: CostModel
    workload: Workload
    settings: SearchSettings
    loss_ceiling: float | None = None
    loss_reference: Observation | None = None  # the baseline's (family, log(steps x lr), held-out loss)
    memory_margin: float = 0.0  # `SearchSettings.memory_margin`, resolved
    # The experiment's storage directory. A trial's own directory is on the node that runs it (Tune syncs
    # no artifacts by default), so outcome records are written here, where every node's trials and the
    # driver read them; on a cluster of several machines it is a shared filesystem, as Tune requires.
    experiment: Path | None = None


def trial_config(config: RunConfig, settings: SearchSettings, run_dir: Path, name: str) -> RunConfig:
    """`config` sized for a trial: the same training tokens, eval rows and resources as every other."""
    data = config.model_dump(mode="json")
    train = data["training"]
    per_step = train["micro_batch_size"] * train["gradient_accumulation_steps"] * settings.workers
    steps = max(2, math.ceil(settings.trial_tokens / (per_step * config.model.max_seq_len)))
    train.update(
        max_steps=steps,
        warmup_steps=min(train["warmup_steps"], steps // 5),
        eval_every_steps=None,
        checkpoint_every_steps=None,
        log_every_steps=1,
        keep_checkpoints=1,
        save_merged=False,
    )
    data["data"]["max_eval_samples"] = settings.eval_samples
    data["parallelism"].update(num_workers=settings.workers, min_workers=None)
    data["resources"]["cpus_per_worker"] = settings.cpus_per_worker
    # A trial measures the strategy it was given: switching to denser checkpointing mid-trial would score
    # another plan under this one's name (the budget prunes trials instead).
    data["monitor"]["adaptive_checkpointing"] = False
    data.update(name=name, output_dir=str(run_dir.parent))
    return validate_config(data)


def error_summary(error: str, limit: int = 500) -> str:
    """A failed run's error in one line: its first line and the exception it ended with.

    Ray Train's errors carry a worker traceback whose last line names the actual exception; the head of
    the text alone ("WorkerGroupError: Training failed due to worker errors:") says nothing.
    """
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "no error text"
    tail = next(
        (line for line in reversed(lines) if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)),
        lines[-1],
    )
    text = lines[0] if tail == lines[0] else f"{lines[0]} ... {tail}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_new(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    if not path.exists():
        return [], offset
    with path.open() as handle:
        handle.seek(offset)
        text = handle.read()
    complete = text[: text.rfind("\n") + 1]
    records = [json.loads(line) for line in complete.splitlines() if line.strip()]
    return records, offset + len(complete.encode())


def run_trial(
    ctx: TrialContext,
    config: RunConfig,
    run_dir: Path,
    report: Callable[[dict[str, Any]], None] | None = None,
    values: Mapping[str, Any] | None = None,
    outcome_dir: Path | None = None,
) -> dict[str, Any]:
    """Run one strategy for the trial budget and return its record (never raises for a bad strategy).

    Args:
        ctx: The search's shared context.
        config: The strategy's full config (before trial sizing).
        run_dir: The fine-tune's run directory.
        report: Called with every intermediate record (Tune's `report`), and with the final one.
        values: The sampled parameter values (kept in the record).
        outcome_dir: Where the record goes (`outcome.json`; default `run_dir`'s parent); its parent holds
            the other trials' records, which the loss guard reads.

    Returns:
        A flat record: status (`ok`, `infeasible`, `pruned`, `error`), feasible, reason, score,
        tokens_per_s, peak_memory_bytes, eval_loss, loss, steps, seconds, the prediction and the values.
    """
    from llmopt.train import finetune

    s = ctx.settings
    budget = s.memory_budget_bytes
    record: dict[str, Any] = {
        "strategy": describe(config),
        "status": "error",
        "feasible": False,
        "reason": "",
        "score": WORST_SCORE,
        "tokens_per_s": None,
        "peak_memory_bytes": None,
        "eval_loss": None,
        "eval_exact_match": None,
        "loss": None,
        "steps": 0,
        "seconds": 0.0,
        **{f"param/{k}": v for k, v in (values or {}).items()},
    }

    outcome_dir = outcome_dir or run_dir.parent

    def finish(**updates: Any) -> dict[str, Any]:
        record.update(updates)
        record["done"] = True
        _write_outcome(outcome_dir, record)
        if report is not None:
            report(dict(record))
        return record

    try:
        config = trial_config(config, s, run_dir, run_dir.name)
    except ConfigError as exc:
        return finish(status="error", reason=f"invalid config: {exc}")
    record["steps_planned"] = config.training.max_steps
    prediction = ctx.cost.predict(config, ctx.workload, budget)
    record.update(
        predicted_peak_bytes=prediction.peak_bytes,
        predicted_tokens_per_s=prediction.tokens_per_s,
    )
    if s.prune and not prediction.fits:
        return finish(status="pruned", reason="pruned by cost model: " + "; ".join(prediction.reasons))
    if s.prune and budget is not None and prediction.peak_bytes > budget * (1 - ctx.memory_margin):
        return finish(
            status="pruned",
            reason=f"pruned by cost model: predicted peak {format_bytes(prediction.peak_bytes)} is within "
            f"{ctx.memory_margin:.1%} of the budget {format_bytes(budget)}, {MARGIN_REASON}",
        )
    record.update(
        family=family(config),
        loss_progress=progress(config.training.max_steps, config.training.lr, update_scale(config)),
    )
    if s.prune and ctx.loss_ceiling is not None:
        guard = LossGuard(ctx.loss_ceiling, ctx.loss_reference, _observations(outcome_dir.parent))
        why = guard.judge(record["family"], record["loss_progress"], config.training.max_steps)
        if why:
            return finish(status="pruned", reason=why)

    if run_dir.exists():  # a restored trial starts over: no stale metrics.jsonl
        shutil.rmtree(run_dir, ignore_errors=True)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = finetune(config, run_dir=run_dir, progress=False)
        except BaseException as exc:
            box["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=target, name="llmopt-trial-finetune", daemon=True)
    start = time.perf_counter()
    thread.start()
    offset, peak, history = 0, 0, []
    abort = ""
    while True:
        alive = thread.is_alive()
        records, offset = _read_new(run_dir / "metrics.jsonl", offset)
        for r in records:
            history.append(r)
            peak = max(peak, int(r.get("peak_memory_bytes") or 0))
            if r.get("final"):
                continue
            over = budget is not None and peak > budget
            live = {
                "status": "running",
                "done": False,
                "feasible": not over,
                "score": score(s.objective, not over, r.get("tokens_per_s"), r.get("loss")),
                "tokens_per_s": r.get("tokens_per_s"),
                "peak_memory_bytes": peak,
                "loss": r.get("loss"),
                "steps": r.get("step"),
                "seconds": time.perf_counter() - start,
                "node_id": r.get("node_id"),
            }
            record.update({k: v for k, v in live.items() if k not in ("status", "done")})
            if over:
                abort = (
                    f"memory: peak {format_bytes(peak)} > budget {format_bytes(budget)} "
                    f"(stopped at step {r.get('step')})"
                )
                break
            if report is not None:
                report(live)
        if abort or not alive:
            break
        if time.perf_counter() - start > s.trial_time_s:
            abort = f"time: not finished after {s.trial_time_s:.0f} s (stopped)"
            break
        thread.join(timeout=0.5)
    seconds = time.perf_counter() - start
    if abort:
        # The nested run is left to Tune: ending this trial ends its actor, and Ray then ends the actors
        # (Train controller, workers) and placement groups this actor owns.
        return finish(status="infeasible", feasible=False, reason=abort, score=WORST_SCORE, seconds=seconds)
    result = box.get("result")
    error = box.get("error") or (result.error if result is not None else "no result")
    if error:
        kind = "out of memory" if "memory" in error.lower() or "killed" in error.lower() else "crashed"
        return finish(
            status="infeasible",
            reason=f"{kind}: {error_summary(error)}",
            feasible=False,
            score=WORST_SCORE,
            seconds=seconds,
            peak_memory_bytes=peak or None,
        )
    metrics = dict(result.metrics or {})
    final = next((r for r in reversed(history or result.history) if r.get("final")), {})
    metrics = {**final, **metrics}
    tokens_per_s = metrics.get("throughput_tokens_per_s") or metrics.get("tokens_per_s")
    peak = max(peak, int(metrics.get("peak_memory_bytes") or 0))
    eval_loss = metrics.get("eval_loss")
    ok, why = feasibility(True, peak, eval_loss, budget, ctx.loss_ceiling)
    return finish(
        status="ok" if ok else "infeasible",
        feasible=ok,
        reason=why,
        score=score(s.objective, ok, tokens_per_s, eval_loss),
        tokens_per_s=tokens_per_s,
        peak_memory_bytes=peak,
        eval_loss=eval_loss,
        eval_exact_match=metrics.get("eval_exact_match"),
        loss=metrics.get("loss"),
        steps=metrics.get("step"),
        seconds=seconds,
        train_seconds=result.seconds,
    )


def _observation(record: Mapping[str, Any]) -> Observation | None:
    """A finished run's (family, progress, held-out loss), if it got that far."""
    loss, value = record.get("eval_loss"), record.get("loss_progress")
    if record.get("status") not in ("ok", "infeasible") or loss is None or value is None:
        return None
    if not math.isfinite(loss):
        return None
    return Observation(record["family"], value, loss, int(record.get("steps_planned") or 0))


def _observations(experiment: Path) -> list[Observation]:
    """The finished trials of a search so far, from their `outcome.json` files (trials run in actors of
    their own; the experiment directory is what they share)."""
    found = []
    for path in sorted(experiment.glob("*/outcome.json")):
        try:
            observation = _observation(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError):
            continue
        if observation is not None:
            found.append(observation)
    return found


def _get(config: RunConfig, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        node = getattr(node, part, None)
    return node


class _DefineByRun:
    """`SearchSpace.define_by_run` as a picklable object (Tune checkpoints the searcher with pickle)."""

    def __init__(self, space: SearchSpace, base: RunConfig, facts: Mapping[str, Any]):
        self.space, self.base, self.facts = space, base, dict(facts)

    def __call__(self, trial) -> None:
        return self.space.define_by_run(self.base, self.facts)(trial)


def _write_outcome(outcome_dir: Path, record: Mapping[str, Any]) -> None:
    outcome_dir.mkdir(parents=True, exist_ok=True)
    (outcome_dir / "outcome.json").write_text(json.dumps(record, indent=2, default=str))


def _finished_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("done") else None


def _tune_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable: one sampled strategy (see `run_trial`)."""
    from ray import tune

    trial_dir = Path(tune.get_context().get_trial_dir())
    outcome_dir = ctx.experiment / trial_dir.name if ctx.experiment else trial_dir
    finished = _finished_record(outcome_dir / "outcome.json")
    if finished is not None:  # done before the search's driver died, after Tune last saved its state
        tune.report(finished)
        return
    values = ctx.space.active(params, ctx.base, ctx.facts)
    try:
        config = ctx.space.to_config(params, ctx.base, ctx.facts)
    except ConfigError as exc:
        record = {"status": "error", "done": True, "feasible": False, "score": WORST_SCORE}
        record["reason"] = f"invalid config: {exc}"
        _write_outcome(outcome_dir, record)
        tune.report(record)
        return
    run_trial(ctx, config, trial_dir / "run", report=tune.report, values=values, outcome_dir=outcome_dir)


# --- the search -----------------------------------------------------------------------------------------
def _cost_model(
    base: RunConfig, calibrate: Literal["auto", "always", "never"], log: Callable[[str], None]
) -> tuple[CostModel, dict[str, Any]]:
    """The cost model for `base`'s model here, calibrated when asked, and what it knows of its errors.

    `auto` measures the probes (a few real steps each) when this model has no cached calibration on this
    machine; `always` measures again (after a hardware or software change); `never` uses the cache or
    the uncalibrated defaults.
    """
    from llmopt.tune._calibrate import calibrate_in_subprocess, load_calibration
    from llmopt.tune._hardware import Hardware
    from llmopt.tune._shape import model_shape

    hardware = Hardware.detect()
    calibration = None if calibrate == "always" else load_calibration(base.model.name_or_path, hardware)
    if calibration is None and calibrate != "never":
        log(f"cost model: calibrating on {base.model.name_or_path} (a few real steps of each probe) ...")
        calibration = calibrate_in_subprocess(base, hardware, log=lambda line: log(f"  {line}"))
    shape = model_shape(base.model.name_or_path)
    info: dict[str, Any] = {"calibrated": calibration is not None}
    if calibration is not None:
        info.update(
            created=calibration.created,
            path=str(calibration.path) if calibration.path else None,
            probe_errors=calibration.summary(),
        )
    return CostModel(shape, hardware, calibration.coefficients if calibration else None), info


def _within(param, value: Any) -> bool:
    if value is None:
        return False
    if param.type == "choice":
        return value in (param.values or [])
    return isinstance(value, (int, float)) and param.low <= value <= param.high


def _seed_points(
    space: SearchSpace,
    ranking,
    n: int,
    max_batch: int | None = None,
    base_values: Mapping[str, Any] | None = None,
    scale: float | None = None,
    spread: float | None = None,
) -> list[dict[str, Any]]:
    """The ranking's top `n` distinct strategies as Optuna points (choice labels, active params only).

    With `max_batch` (micro-batch x accumulation), only strategies taking at least as many optimizer
    steps on the token budget as that batch are seeded: the cost model predicts speed, not loss, and
    under a loss ceiling its fastest (largest-batch) strategies take too few steps to meet it.

    With `scale` (the baseline's adapter update scale, `alpha / r`), a seeded adapter's alpha is the
    choice nearest twice that scale at the seed's rank, never under it. Alpha is a setting the cost model
    ignores, so the base config's alpha is otherwise kept at every rank. Under a ceiling set by the
    baseline's own loss, a seed that trains as the baseline does (the same steps, rate and scale) at best
    ties it, and in bf16 it lost 0.005 to it on the shipped search; at twice the scale, the same steps and
    rate (LoRA r4 at alpha 8 beside the baseline's r8 at alpha 8) beat it by 0.014.

    With `spread` (the cost model's relative step-time error), the best strategy of another precision whose
    predicted tokens/s are within that share of the top's takes the place of the last seed.
    """
    points = []
    if max_batch is not None:
        keep = [
            c
            for c in ranking.ranked
            if c.config.training.micro_batch_size * c.config.training.gradient_accumulation_steps <= max_batch
        ]
        ranking = type(ranking)(ranked=keep)
    base = base_values or {}
    alpha = next((p for p in space.parameters if p.path == "lora.alpha"), None)
    chosen = [candidate for candidate, _ in ranking.distinct(n)]
    if spread is not None and chosen:
        # The calibration measures one compute rate per precision from a few short probes; when another
        # precision's best is predicted within the model's own error of the top, the probes have not
        # decided between them, so a trial does (on an AVX512-BF16 CPU the probes put bf16 8% under fp32
        # in one calibration and over it in another; measured, bf16 trained 18-32% faster).
        top = chosen[0].prediction.tokens_per_s
        for candidate in ranking.ranked:  # fastest first
            if candidate.prediction.tokens_per_s < top * (1 - spread):
                break
            held = Counter(c.config.precision for c in chosen)
            if candidate.config.precision in held:
                continue
            # The last seed whose precision another seed also has gives way.
            slots = [i for i in range(len(chosen) - 1, 0, -1) if held[chosen[i].config.precision] > 1]
            if not slots:
                break
            chosen[slots[0]] = candidate
    for candidate in chosen:
        point = {}
        for key, value in candidate.values.items():
            param = next(p for p in space.parameters if p.key == key)
            if param.path not in COST_PATHS and _within(param, base.get(param.path)):
                value = base[param.path]  # a setting the cost model ignores (lr): the base run's value
            point[key] = param.labels[param.values.index(value)] if param.type == "choice" else value
        if scale and alpha is not None and alpha.key in point and alpha.type == "choice":
            lora = candidate.config.lora
            floor = [a for a in alpha.values if float(a) / lora.r >= scale * (1 - 1e-9)]
            if lora.enabled and lora.method in SCALED_METHODS and floor:
                wanted = math.log(SEED_SCALE_FACTOR * scale * lora.r)
                best = min(floor, key=lambda a: abs(math.log(float(a)) - wanted))
                point[alpha.key] = alpha.labels[alpha.values.index(best)]
        points.append(point)
    return points


def _cleanup_placement_groups(log: Callable[[str], None]) -> int:
    """Remove this job's placement groups still holding resources after the search (a killed nested
    run can leave them behind)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for pg_id, entry in ray.util.placement_group_table().items():
        if entry.get("state") != "CREATED" or entry.get("creator_job_id", job) != job:
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
        except Exception as exc:
            log(f"could not remove placement group {pg_id}: {exc}")
    if removed:
        log(f"removed {removed} leftover placement group(s)")
    return removed


def _rows_from(results, experiment: Path) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        path = Path(result.path) if result.path else None
        record = None
        if path is not None and (path / "outcome.json").exists():
            record = json.loads((path / "outcome.json").read_text())
        if record is None:
            # Stopped by ASHA (or killed) before its end: the last streamed report is what there is.
            metrics = dict(result.metrics or {})
            record = {
                **{
                    k: metrics.get(k)
                    for k in ("tokens_per_s", "peak_memory_bytes", "loss", "steps", "seconds")
                },
                "status": "stopped" if result.error is None else "error",
                "feasible": False,
                "score": WORST_SCORE,
                "reason": "ended without a record: stopped early by the scheduler (ASHA), or its process died"
                if result.error is None
                else str(result.error)[:500],
                **{f"param/{k}": v for k, v in (result.config or {}).items()},
            }
        record["trial_id"] = (path.name if path else None) or (result.metrics or {}).get("trial_id")
        record.setdefault("strategy", "")
        rows.append(record)
    return rows


def memory_margin(setting: float | None, probe_errors: dict[str, float] | None) -> float:
    """`SearchSettings.memory_margin` resolved: the setting, else the calibration's mean leave-one-out
    peak-memory error (a strategy predicted that close to the budget fits or not by the model's error), else
    0 (uncalibrated: the defaults' error here is not known)."""
    if setting is not None:
        return setting
    error = (probe_errors or {}).get("loo_memory_error")
    return min(0.25, error) if error is not None and math.isfinite(error) else 0.0


def run_search(
    base: RunConfig,
    space: SearchSpace,
    settings: SearchSettings,
    out_dir: Path,
    resume: Path | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Search the space's strategies for `base`'s model with real short fine-tunes; write the outputs.

    Args:
        base: The run config the strategies start from (model, data, training settings).
        space: The search space.
        settings: Objective, budgets, trial sizing, searcher and scheduler settings.
        out_dir: Where best.yaml, trials.csv/json, pareto.png and summary.json go; Tune's experiment goes
            under `out_dir/tune/<settings.name>`.
        resume: A Tune experiment directory of an interrupted search: restored, unfinished trials go on.
        log: Where progress lines go.

    Returns:
        The search result (also written to `out_dir`).

    Raises:
        ConfigError: invalid settings, or a space that does not apply to the model.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from llmopt.cluster import init_ray

    settings.check()
    start = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started_ray = not ray.is_initialized()
    init_ray()
    try:
        trial_base = base.model_copy(
            update={
                "parallelism": base.parallelism.model_copy(
                    update={"num_workers": settings.workers, "min_workers": None}
                ),
                "resources": base.resources.model_copy(update={"cpus_per_worker": settings.cpus_per_worker}),
            }
        )
        cost, cost_info = _cost_model(trial_base, settings.calibrate, log)
        probe_errors = cost_info.get("probe_errors")
        state = f"calibrated {cost_info['created']}" if cost_info["calibrated"] else "uncalibrated defaults"
        log(
            f"cost model: {state} for {base.model.name_or_path} on {cost.hardware.describe()}"
            + (
                f"; probe errors (mean |predicted-measured|/measured, leave-one-out): peak memory "
                f"{probe_errors['loo_memory_error']:.0%}, step time {probe_errors['loo_step_time_error']:.0%}"
                if probe_errors
                else ""
            )
        )
        alive = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        res = trial_base.resources
        placement = trial_placement(alive, settings.workers, res.cpus_per_worker, res.gpus_per_worker)
        parallelism = trial_base.parallelism.model_copy(update={"placement_strategy": placement})
        trial_base = trial_base.model_copy(update={"parallelism": parallelism})
        log(f"trial placement: {placement} (each trial's {settings.workers} worker(s))")
        if settings.max_concurrent_trials is None:
            count, why = concurrent_trials(
                alive,
                settings.workers,
                trial_base.resources.cpus_per_worker,
                trial_base.resources.gpus_per_worker,
            )
            settings = replace(settings, max_concurrent_trials=min(count, settings.num_samples))
            log(f"concurrent trials: {settings.max_concurrent_trials} ({why})")
        facts = space_facts(cost.shape, cost.hardware)
        workload = workload_for(trial_base)
        ctx = TrialContext(trial_base, space, facts, cost, workload, settings)
        # The trials' margin, set once the baseline ran: the template is the reference, never pruned for it.
        margin = memory_margin(settings.memory_margin, probe_errors)
        budget = settings.memory_budget_bytes
        usable = int(budget * (1 - margin)) if budget is not None else None

        # The cost model's view of the whole space: how many strategies it prunes, and the seeds.
        ranking = recommend(trial_base, space, cost, usable, settings.workers, points=2)
        grid = ranking.counts()
        log(
            f"cost model: {grid['candidates']} grid strategies, {grid['fit']} predicted to fit, "
            f"{grid['pruned']} pruned before running (budget "
            + (
                f"{format_bytes(budget)}, less a {margin:.1%} margin for the cost model's "
                f"memory error: {format_bytes(usable)})"
                if budget is not None
                else "none)"
            )
        )
        max_batch, scale = None, None
        # Twice the probes' mean leave-one-out step-time error: how far apart two predictions must be
        # before the cost model has told them apart (uncalibrated: the defaults' own error is unknown).
        loo = (probe_errors or {}).get("loo_step_time_error")
        spread = min(0.5, 2 * loo) if loo is not None else UNCALIBRATED_SPREAD
        base_paths = {p.path: _get(trial_base, p.path) for p in space.parameters}
        if settings.loss_ceiling is not None and settings.baseline:
            reference = baseline_config(trial_base, cost.shape.params)
            max_batch = reference.training.micro_batch_size * reference.training.gradient_accumulation_steps
            scale = update_scale(reference) if reference.lora.enabled else None
        seeds = (
            [
                *settings.points,
                *_seed_points(space, ranking, settings.seeds, max_batch, base_paths, scale, spread),
            ]
            if not resume
            else []
        )

        baseline = None
        ctx.loss_ceiling = None if settings.loss_ceiling == "baseline" else settings.loss_ceiling
        if settings.baseline:
            baseline = _run_baseline(ctx, out_dir, log)
        ceiling = settings.loss_ceiling
        if ceiling == "baseline":
            ceiling = baseline.get("eval_loss") if baseline else None
            log(f"loss ceiling: the baseline's held-out loss {ceiling}")
        ctx.loss_ceiling = ceiling
        ctx.loss_reference = _observation(baseline) if baseline is not None else None
        ctx.memory_margin = margin
        if baseline is not None and ceiling is not None and baseline.get("eval_loss") is not None:
            ok, why = feasibility(
                baseline["status"] in ("ok", "infeasible") and baseline.get("tokens_per_s") is not None,
                baseline.get("peak_memory_bytes"),
                baseline.get("eval_loss"),
                settings.memory_budget_bytes,
                ceiling,
            )
            baseline.update(feasible=ok, reason=why)

        experiment = Path(resume).resolve() if resume is not None else out_dir / "tune" / settings.name
        ctx.experiment = experiment
        trainable = tune.with_resources(tune.with_parameters(_tune_trial, ctx=ctx), TRIAL_RESOURCES)
        if resume is not None:
            log(f"resuming the search in {resume}")
            tuner = tune.Tuner.restore(
                str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            searcher = OptunaSearch(
                space=_DefineByRun(space, trial_base, facts),
                metric="score",
                mode="max",
                points_to_evaluate=seeds or None,
                seed=settings.seed,
            )
            scheduler = (
                ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=10_000,
                    grace_period=settings.grace_period,
                    reduction_factor=2,
                )
                if settings.scheduler == "asha"
                or (
                    settings.scheduler == "auto"
                    and not (settings.objective == "throughput" and settings.loss_ceiling is not None)
                )
                else FIFOScheduler()
            )
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric="score",
                    mode="max",
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=settings.num_samples,
                    max_concurrent_trials=settings.max_concurrent_trials,
                    time_budget_s=settings.time_budget_s,
                ),
                run_config=tune.RunConfig(
                    name=settings.name,
                    storage_path=str(out_dir / "tune"),
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    verbose=1,
                ),
            )
        results = tuner.fit()
        rows = _rows_from(results, experiment)
    finally:
        if ray.is_initialized():
            _cleanup_placement_groups(log)
        if started_ray:
            ray.shutdown()

    counts = {
        "sampled": len(rows),
        "ok": sum(r["status"] == "ok" for r in rows),
        "feasible": sum(bool(r.get("feasible")) for r in rows),
        "pruned": sum(r["status"] == "pruned" for r in rows),
        "pruned_loss": sum(str(r.get("reason", "")).startswith("projected to miss") for r in rows),
        "pruned_margin": sum(str(r.get("reason", "")).endswith(MARGIN_REASON) for r in rows),
        "ran": sum(r["status"] in ("ok", "infeasible", "stopped") for r in rows),
        "infeasible": sum(r["status"] == "infeasible" for r in rows),
        "stopped": sum(r["status"] == "stopped" for r in rows),
        "error": sum(r["status"] == "error" for r in rows),
        "grid_candidates": grid["candidates"],
        "grid_pruned": grid["pruned"],
        "seeds": len(seeds),
    }
    feasible = [r for r in rows if r.get("feasible") and r["status"] == "ok"]
    best = max(feasible, key=lambda r: r["score"]) if feasible else None
    best_config = None
    if best is not None:
        params = {k.removeprefix("param/"): v for k, v in best.items() if k.startswith("param/")}
        best_config = best_strategy_config(base, space, params, facts, settings)
    result = SearchResult(
        rows=rows,
        best=best,
        best_config=best_config,
        baseline=baseline,
        counts=counts,
        out_dir=out_dir,
        experiment_path=experiment,
        settings={k: v for k, v in asdict(settings).items()},
        seconds=time.perf_counter() - start,
        seeds=seeds,
        loss_ceiling=ceiling,
        cost_model={**cost_info, "memory_margin": margin},
    )
    write_outputs(result)
    return result


def best_strategy_config(
    base: RunConfig,
    space: SearchSpace,
    params: Mapping[str, Any],
    facts: Mapping[str, Any],
    settings: SearchSettings,
) -> RunConfig:
    """The winning strategy over `base` as a full run: the base's length and CPUs, the search's workers
    and memory budget."""
    config = space.to_config(params, base, facts)
    data = config.model_dump(mode="json")
    data["parallelism"].update(num_workers=settings.workers, min_workers=None)
    if settings.memory_budget_bytes:
        data["resources"]["memory_budget_gb"] = round(settings.memory_budget_bytes / GIB, 4)
    return validate_config(data)


def _run_baseline(ctx: TrialContext, out_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The rule-based template through the same trial code, budget and resources, as a Ray task."""
    import ray

    config = baseline_config(ctx.base, ctx.cost.shape.params)
    config = config.model_copy(
        update={
            "parallelism": config.parallelism.model_copy(
                update={"num_workers": ctx.settings.workers, "min_workers": None}
            ),
            "resources": config.resources.model_copy(
                update={"cpus_per_worker": ctx.settings.cpus_per_worker}
            ),
        }
    )
    log(f"baseline (rule-based template): {describe(config)} ...")
    task = ray.remote(num_cpus=0, memory=TRIAL_RESOURCES["memory"])(run_trial)
    record = ray.get(task.remote(ctx, config, out_dir / "baseline" / "run"))
    record["trial_id"] = "baseline"
    log(
        f"baseline: {record['status']} {record.get('tokens_per_s') or 0:.0f} tokens/s, "
        f"held-out loss {record.get('eval_loss')}, peak {format_bytes(record.get('peak_memory_bytes') or 0)}"
        + (f" ({record['reason']})" if record.get("reason") else "")
    )
    return record
