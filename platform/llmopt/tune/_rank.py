"""Prune strategies that cannot fit and rank the rest by predicted throughput, before any trial runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.config import ConfigError, RunConfig, deep_merge, rule_based_recommendation, validate_config
from llmopt.tune._cost import CostModel, Prediction
from llmopt.tune._space import SearchSpace, space_facts
from llmopt.tune._workload import Workload, workload_for

# Config fields the cost model reads: numeric ranges over these are enumerated in the ranking grid;
# the others (learning rate, LoRA alpha, dropout, router loss weight, ...) cost the same at any value.
COST_PATHS = frozenset(
    {
        "model.max_seq_len",
        "model.attn_implementation",
        "data.packing",
        "lora.enabled",
        "lora.method",
        "lora.num_virtual_tokens",
        "lora.r",
        "lora.target_modules",
        "lora.target_parameters",
        "lora.modules_to_save",
        "quantization.mode",
        "quantization.double_quant",
        "moe.mode",
        "moe.adapter_targets",
        "moe.num_experts",
        "moe.top_k",
        "checkpointing.policy",
        "checkpointing.every_k_layers",
        "checkpointing.memory_budget_gb",
        "parallelism.num_workers",
        "parallelism.zero_stage",
        "parallelism.offload_optimizer",
        "parallelism.offload_params",
        "precision",
        "training.micro_batch_size",
        "training.gradient_accumulation_steps",
        "resources.cpus_per_worker",
    }
)


@dataclass
class Candidate:
    """A strategy with its predicted cost.

    Attributes:
        values: The search-space parameter values that made it (empty for the baseline).
        config: The full, validated run config.
        prediction: The cost model's prediction for it.
        label: A short description of the strategy.
    """

    values: dict[str, Any]
    config: RunConfig
    prediction: Prediction
    label: str

    def row(self) -> dict[str, Any]:
        """Flat record for tables and JSON."""
        p = self.prediction
        return {
            "strategy": self.label,
            **{f"param/{k}": v for k, v in self.values.items()},
            "predicted_peak_bytes": p.peak_bytes,
            "predicted_tokens_per_s": p.tokens_per_s,
            "predicted_step_time_s": p.step_time_s,
            "trainable_params": p.trainable_params,
            "fits": p.fits,
            "reasons": "; ".join(p.reasons),
        }


@dataclass
class Ranking:
    """The outcome of pruning and ranking.

    Attributes:
        ranked: Candidates predicted to fit, highest tokens/s first (lower peak memory breaks ties).
        pruned: Candidates predicted not to fit, each with `prediction.reasons`.
        invalid: `(values, error)` of combinations the config schema rejects.
        budget_bytes: The per-worker memory budget applied (None: only the machine's limits).
        baseline: The rule-based template's strategy for the same model and budget, predicted alike.
    """

    ranked: list[Candidate] = field(default_factory=list)
    pruned: list[Candidate] = field(default_factory=list)
    invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    budget_bytes: int | None = None
    baseline: Candidate | None = None

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None

    def distinct(self, n: int) -> list[tuple[Candidate, int]]:
        """The first `n` ranked candidates with distinct predictions, each with how many equivalent
        candidates (same predicted memory and step time, e.g. a memory budget that checkpoints nothing)
        it stands for."""
        groups: dict[tuple, list] = {}
        for c in self.ranked:
            key = (c.prediction.peak_bytes, round(c.prediction.step_time_s, 9), c.prediction.trainable_params)
            if key in groups:
                groups[key][1] += 1
            elif len(groups) < n:
                groups[key] = [c, 0]
        return [(c, extra) for c, extra in groups.values()]

    def counts(self) -> dict[str, int]:
        """Candidates considered, fitting, pruned (and pruned per reason kind), invalid."""
        kinds = Counter(reason.split(":", 1)[0] for c in self.pruned for reason in c.prediction.reasons[:1])
        return {
            "candidates": len(self.ranked) + len(self.pruned) + len(self.invalid),
            "fit": len(self.ranked),
            "pruned": len(self.pruned),
            "invalid": len(self.invalid),
            **{f"pruned_{kind.replace(' ', '_')}": n for kind, n in sorted(kinds.items())},
        }


_METHOD_NAMES = {
    "lora": "LoRA",
    "dora": "DoRA",
    "ia3": "IA3",
    "loha": "LoHa",
    "lokr": "LoKr",
    "prompt_tuning": "prompt-tuning",
    "prefix_tuning": "prefix-tuning",
}


def describe(config: RunConfig) -> str:
    """A compact one-line summary of a config's strategy, e.g. `LoRA r8 auto ckpt/1 Z2 fp32 mb16x1`.

    Method (`full`, `LoRA`, `QLoRA-int8/nf4`, `DoRA`, `IA3`, `LoHa`, `LoKr` with rank and targets, or
    `prompt-tuning` / `prefix-tuning` with their virtual tokens), MoE settings, checkpointing
    (`no-ckpt`, `ckpt/k` every k-th layer, `ckpt<=BUDGETG`), ZeRO stage (`+oo` optimizer offload, `+po`
    parameter offload), precision, micro-batch x accumulation, and workers when more than one.
    """
    parts = []
    if config.lora.enabled:
        lora = config.lora
        targets = lora.target_modules
        targets = targets if isinstance(targets, str) else ",".join(targets)
        name = _METHOD_NAMES[lora.method]
        if config.quantization.mode != "none":
            name = f"Q{name}-{config.quantization.mode}"
        if lora.method in ("prompt_tuning", "prefix_tuning"):
            parts.append(f"{name} {lora.num_virtual_tokens}vt")
        elif lora.method == "ia3":
            parts.append(f"{name} {targets}")
        else:
            parts.append(f"{name} r{lora.r} {targets}")
    else:
        parts.append("full")
    if config.moe.mode != "none":
        k = config.moe.upcycle_top_k if config.moe.mode == "upcycle" else config.moe.top_k
        top = f" top{k}" if k is not None else ""
        parts.append(f"{config.moe.mode}{top} [{','.join(config.moe.adapter_targets)}]")
    ckpt = config.checkpointing
    parts.append(
        {
            "none": "no-ckpt",
            "uniform": f"ckpt/{ckpt.every_k_layers}",
            "memory_budget": f"ckpt<={ckpt.memory_budget_gb or 0:.2g}G",
        }[ckpt.policy]
    )
    par = config.parallelism
    zero = f"Z{par.zero_stage}"
    zero += "+oo" if par.offload_optimizer != "none" else ""
    zero += "+po" if par.offload_params != "none" else ""
    parts += [zero, config.precision]
    parts.append(f"mb{config.training.micro_batch_size}x{config.training.gradient_accumulation_steps}")
    if par.num_workers > 1:
        parts.append(f"{par.num_workers}w")
    return " ".join(parts)


def _complexity(config: RunConfig) -> int:
    """Moving parts of a strategy: among equal predictions, the simpler one ranks first."""
    par = config.parallelism
    return (
        par.zero_stage
        + (par.offload_optimizer != "none")
        + (par.offload_params != "none")
        + (config.checkpointing.policy != "none")
        + (config.quantization.mode != "none")
    )


def _sort_key(c: Candidate):
    return (-c.prediction.tokens_per_s, c.prediction.peak_bytes, _complexity(c.config))


def prune(
    model: CostModel,
    candidates: Iterable[tuple[dict[str, Any], RunConfig]],
    budget_bytes: int | None = None,
    workload: Workload | None = None,
) -> tuple[list[Candidate], list[Candidate]]:
    """Predict every candidate and split them into those that fit and those that do not.

    Args:
        model: The cost model.
        candidates: `(values, config)` pairs.
        budget_bytes: Peak memory allowed per worker (None: each config's `resources.memory_budget_gb`).
        workload: Sequence lengths (default: each config's own data, tokenized once per data setting).

    Returns:
        `(fits, pruned)`; every pruned candidate's `prediction.reasons` says why.
    """
    fits, pruned = [], []
    for values, config in candidates:
        prediction = model.predict(config, workload or workload_for(config), budget_bytes)
        candidate = Candidate(dict(values), config, prediction, describe(config))
        (fits if prediction.fits else pruned).append(candidate)
    return fits, pruned


def rank(
    model: CostModel,
    candidates: Iterable[tuple[dict[str, Any], RunConfig]],
    budget_bytes: int | None = None,
    workload: Workload | None = None,
) -> Ranking:
    """Prune, then order the fitting candidates by predicted tokens/s (highest first)."""
    fits, pruned = prune(model, candidates, budget_bytes, workload)
    fits.sort(key=_sort_key)
    pruned.sort(key=_sort_key)
    return Ranking(ranked=fits, pruned=pruned, budget_bytes=budget_bytes)


def space_candidates(
    space: SearchSpace,
    base: RunConfig,
    facts: Mapping[str, Any],
    points: int = 3,
    invalid: list[tuple[dict[str, Any], str]] | None = None,
    validate: bool = True,
):
    """Yield `(values, config)` for the space's grid over `base` (see `SearchSpace.grid`).

    With `validate`, combinations the schema rejects are appended to `invalid` as `(values, message)`
    and skipped; without, configs are built by copy and must be validated before use (`validated`).
    """
    base_data = base.model_dump(mode="json")
    for values in space.grid(base, facts, points, COST_PATHS):
        if not validate:
            yield values, space.config_unvalidated(values, base)
            continue
        try:
            yield values, space.config_for_active(values, base_data)
        except ConfigError as exc:
            if invalid is not None:
                invalid.append((values, _message(exc)))


def _message(exc: ConfigError) -> str:
    return "; ".join(str(i) for i in exc.issues)


def validated(candidate: Candidate) -> Candidate:
    """The candidate with its config validated by the schema (raises ConfigError)."""
    config = validate_config(candidate.config.model_dump(mode="json"))
    return Candidate(candidate.values, config, candidate.prediction, candidate.label)


def baseline_config(base: RunConfig, num_params: int) -> RunConfig:
    """The seed's rule-based strategy (template + rules by size) applied over `base`."""
    rec = rule_based_recommendation(num_params, "train")
    data = deep_merge(base.model_dump(mode="json"), rec.config_data())
    return validate_config(data)


def recommend(
    base: RunConfig,
    space: SearchSpace,
    model: CostModel,
    budget_bytes: int | None,
    workers: int | None = None,
    points: int = 3,
    validate_top: int = 50,
) -> Ranking:
    """Rank a space's strategies for `base`'s model on the cost model's machine, without running anything.

    Args:
        base: The run config the strategies start from (model, data, training settings).
        space: The search space.
        model: The cost model (its shape must be `base`'s model).
        budget_bytes: Peak memory allowed per worker.
        workers: Data-parallel workers for every candidate (default: `base`'s).
        points: Values per enumerated numeric range.
        validate_top: How many of the best fitting candidates are validated by the config schema (the
            rest of `ranked` is built unvalidated; validate before use with `validated`).

    Returns:
        The ranking, with the rule-based baseline predicted for the same model, workers and budget.
    """
    if workers:
        base = base.model_copy(
            update={"parallelism": base.parallelism.model_copy(update={"num_workers": workers})}
        )
    facts = space_facts(model.shape, model.hardware)
    if not space.applies_to(facts):
        raise ConfigError(
            [
                _issue(
                    f"search space {space.name!r} applies when {space.spec.applies_when!r}, which "
                    f"{base.model.name_or_path!r} does not meet; choose the space for this model"
                )
            ],
            space.source,
        )
    # Predicting is cheap and validation is not: configs are built by copy, and only the candidates a
    # caller sees (the first `validate_top` that fit) are validated; rejected ones move to `invalid`.
    ranking = rank(model, space_candidates(space, base, facts, points, validate=False), budget_bytes)
    checked: list[Candidate] = []
    for candidate in ranking.ranked:
        if len(checked) >= validate_top:
            checked.append(candidate)
            continue
        try:
            checked.append(validated(candidate))
        except ConfigError as exc:
            ranking.invalid.append((candidate.values, _message(exc)))
    ranking.ranked = checked
    try:
        config = baseline_config(base, model.shape.params)
    except ConfigError:
        config = None
    if config is not None:
        prediction = model.predict(config, workload_for(config), budget_bytes)
        ranking.baseline = Candidate({}, config, prediction, describe(config))
    return ranking


def _issue(message: str):
    from llmopt.config import ConfigIssue

    return ConfigIssue("space", message)


def default_space_path(is_moe: bool, roots: Iterable[Path] | None = None) -> Path | None:
    """The shipped space for a dense or MoE model: `tune_spaces/strategy[-moe].yaml` under the working
    directory or the source checkout; None when neither has it."""
    import llmopt

    name = "strategy-moe.yaml" if is_moe else "strategy.yaml"
    roots = list(roots) if roots is not None else [Path.cwd(), Path(llmopt.__file__).resolve().parents[2]]
    for root in roots:
        if (root / "tune_spaces" / name).is_file():
            return root / "tune_spaces" / name
    return None
