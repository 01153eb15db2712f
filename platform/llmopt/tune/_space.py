"""Search spaces as YAML data: parameters over RunConfig fields, conditions, and their samplers.

A space file (see `tune_spaces/strategy.yaml`):

    name: strategy
    description: ...
    applies_when: not model.is_moe        # optional: which models the space is for
    base:                                 # optional config overlay under every sample
      checkpointing: {policy: none}
    parameters:
      - path: parallelism.zero_stage      # the RunConfig field it sets (also its default name)
        type: choice
        values: [0, 1, 2, 3]
      - path: parallelism.offload_optimizer
        type: choice
        values: [none, cpu]
        when: parallelism.zero_stage >= 2 # sampled only when the condition holds
      - path: training.lr
        type: loguniform
        low: 1.0e-4
        high: 1.0e-2

Types: `choice` (`values`: scalars or lists), `int` (`low`, `high`, optional `step`, `log`), `uniform`
and `loguniform` (`low`, `high`). A `when` condition is a Python-like expression over earlier
parameters (by name or path), other config fields (the base config's value), `model.*` facts
(`is_moe`, `num_experts`, `experts_per_token`, `num_layers`, `num_parameters`, `hidden_size`,
`model_type`) and `hardware.*` facts (`accelerator`, `gpus`, `cpus`, `memory_gb`), with `and`, `or`,
`not`, comparisons and `in`. An inactive parameter is not sampled; the config keeps its base value.

Samplers: `define_by_run()` is an Optuna define-by-run function (for
`ray.tune.search.optuna.OptunaSearch(space=...)`) that asks only for active parameters;
`optuna_distributions()` and `tune_search_space()` give every parameter's distribution (for searchers
without conditions: inactive values are dropped by `active()`); `grid()` enumerates the space for the
cost model's ranking. `to_config()` turns sampled values into a validated RunConfig.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from llmopt.config import ConfigError, ConfigIssue, RunConfig, deep_merge, read_yaml, validate_config
from llmopt.tune._condition import Condition, close_path, field_at, get_path, set_path

MODEL_FACTS = (
    "is_moe",
    "num_experts",
    "experts_per_token",
    "num_layers",
    "num_parameters",
    "hidden_size",
    "model_type",
)
HARDWARE_FACTS = ("accelerator", "gpus", "cpus", "memory_gb")

Scalar = bool | int | float | str | None


def _strict() -> ConfigDict:
    return ConfigDict(extra="forbid", frozen=True)


class Parameter(BaseModel):
    """One searched setting."""

    model_config = _strict()

    path: str = Field(description="The RunConfig field it sets, dotted (e.g. `lora.r`).")
    name: str | None = Field(None, description="Name in Tune/Optuna and in conditions; default: `path`.")
    type: Literal["choice", "int", "uniform", "loguniform"] = Field(description="Distribution.")
    values: list[Any] | None = Field(None, description="With `choice`: the candidates (scalars or lists).")
    low: float | None = Field(None, description="Lower bound (int, uniform, loguniform).")
    high: float | None = Field(None, description="Upper bound, included.")
    step: int | None = Field(None, ge=1, description="With `int`: the grid step.")
    log: bool = Field(False, description="With `int`: sample on a log scale.")
    when: str | None = Field(None, description="Condition under which the parameter is sampled.")
    default: Any = Field(
        None, description="Value the cost-model grid holds it at when the cost model does not read it."
    )
    description: str = Field("", description="What the parameter means.")

    @model_validator(mode="after")
    def _bounds(self) -> Parameter:
        where = f"parameter {self.key!r}"
        if self.type == "choice":
            if not self.values:
                raise ValueError(
                    f"{where}: type 'choice' needs a non-empty `values` list; e.g. values: [4, 8, 16]"
                )
            if self.low is not None or self.high is not None:
                raise ValueError(f"{where}: type 'choice' takes `values`, not low/high; remove low/high")
            if self.default is not None and self.default not in self.values:
                raise ValueError(f"{where}: default {self.default!r} is not one of values {self.values}")
            return self
        if self.values is not None:
            raise ValueError(f"{where}: type {self.type!r} takes low/high, not `values`; use type: choice")
        if self.low is None or self.high is None:
            raise ValueError(f"{where}: type {self.type!r} needs both `low` and `high`")
        if self.low >= self.high:
            raise ValueError(
                f"{where}: low={self.low:g} must be below high={self.high:g}; swap or widen them"
            )
        if (self.type == "loguniform" or self.log) and self.low <= 0:
            raise ValueError(f"{where}: a log scale needs low > 0 (got low={self.low:g}); e.g. low: 1.0e-5")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"{where}: type 'int' needs whole bounds (got {self.low:g}..{self.high:g})")
        if self.default is not None and not self.low <= self.default <= self.high:
            raise ValueError(f"{where}: default {self.default!r} is outside [{self.low:g}, {self.high:g}]")
        return self

    @property
    def key(self) -> str:
        return self.name or self.path

    # Optuna's categorical choices must be None/bool/int/float/str: list values travel as labels.
    @cached_property
    def labels(self) -> list[Scalar]:
        return [_label(v) for v in self.values or []]

    def decode(self, value: Any) -> Any:
        """The config value of a sampled value (a choice label back to its list; config values pass)."""
        if self.type == "choice":
            for label, original in zip(self.labels, self.values or [], strict=True):
                if type(label) is type(value) and label == value:  # 1 == True must not match
                    return original
            return value
        return int(value) if self.type == "int" else value

    def grid_values(self, points: int, enumerate_values: bool) -> list[Any]:
        """Values the cost-model grid visits.

        Enumerated: every choice, or `points` values across a range. Not enumerated (a setting the cost
        model does not read): only `default`, else the first choice or the range's middle.
        """
        if self.type == "choice":
            if enumerate_values:
                return list(self.values or [])
            return [self.default if self.default is not None else (self.values or [None])[0]]
        low, high = float(self.low), float(self.high)  # type: ignore[arg-type]
        logscale = self.type == "loguniform" or self.log
        if not enumerate_values:
            if self.default is not None:
                return [self.default]
            middle = math.sqrt(low * high) if logscale else (low + high) / 2
            return [round(middle) if self.type == "int" else middle]
        if points == 1:
            grid = [math.sqrt(low * high) if logscale else (low + high) / 2]
        else:
            grid = [
                math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / (points - 1))
                if logscale
                else low + i * (high - low) / (points - 1)
                for i in range(points)
            ]
        if self.type == "int":
            step = self.step or 1
            grid = sorted({int(low + round((g - low) / step) * step) for g in grid})
        return grid


def _label(value: Any) -> Scalar:
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value) or "[]"
    if isinstance(value, Mapping):
        return yaml.safe_dump(dict(value), default_flow_style=True).strip()
    return value


class SearchSpaceFile(BaseModel):
    """The YAML document of a search space."""

    model_config = _strict()

    name: str = Field(description="Short name of the space.")
    description: str = Field("", description="What the space searches.")
    applies_when: str | None = Field(
        None, description="Condition on model/hardware facts for which models it is."
    )
    base: dict[str, Any] = Field(
        default_factory=dict, description="Config overlay applied under every sample."
    )
    parameters: Annotated[list[Parameter], Field(min_length=1)] = Field(description="The searched settings.")


def space_facts(shape=None, hardware=None) -> dict[str, Any]:
    """`model.*` and `hardware.*` facts for conditions, from a ModelShape and a Hardware (either optional)."""
    facts: dict[str, Any] = {}
    if shape is not None:
        facts.update(
            {
                "model.is_moe": shape.is_moe,
                "model.num_experts": shape.num_experts,
                "model.experts_per_token": shape.top_k,
                "model.num_layers": shape.num_layers,
                "model.num_parameters": shape.params,
                "model.hidden_size": shape.hidden,
                "model.model_type": shape.model_type,
            }
        )
    if hardware is not None:
        facts.update(
            {
                "hardware.accelerator": hardware.accelerator,
                "hardware.gpus": hardware.gpus,
                "hardware.cpus": hardware.cpus,
                "hardware.memory_gb": hardware.memory_bytes / 2**30,
            }
        )
    return facts


class SearchSpace:
    """A validated search space. Build with `load_space(path)` or `SearchSpace.from_data(mapping)`."""

    def __init__(self, spec: SearchSpaceFile, source: str | None = None):
        self.spec, self.source = spec, source
        self.parameters = spec.parameters
        self.conditions = {p.key: Condition(p.when) for p in self.parameters if p.when}
        self.applies = Condition(spec.applies_when) if spec.applies_when else None
        self._by_key = {p.key: p for p in self.parameters}
        self._by_path = {p.path: p for p in self.parameters}

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def from_data(cls, data: Mapping[str, Any], source: str | None = None) -> SearchSpace:
        """Validate a space mapping; every problem is reported at once (ConfigError, field + fix).

        The file's keys and each parameter are validated on their own, so one broken parameter does not
        hide the problems of the others; cross-parameter checks then run on the valid ones.
        """
        data = dict(data)
        raw = data.get("parameters")
        issues: list[ConfigIssue] = []
        params: list[Parameter] = []
        names: set[str] = set()
        for i, entry in enumerate(raw if isinstance(raw, list) else []):
            label = (entry.get("name") or entry.get("path") or i) if isinstance(entry, dict) else i
            names.update({str(label), str(entry.get("path"))} if isinstance(entry, dict) else set())
            try:
                params.append(Parameter.model_validate(entry))
            except ValidationError as exc:
                issues += _issues(exc, f"parameters.{label}")
        header = {**data, "parameters": params or raw}
        try:
            spec = SearchSpaceFile.model_validate(header)
        except ValidationError as exc:
            issues += [i for i in _issues(exc, "") if not i.path.startswith("parameters.")]
            spec = None
        if spec is not None:
            issues += _semantic_issues(spec, names)
        if issues:
            raise ConfigError(issues, source)
        assert spec is not None
        return cls(spec, source)

    # --- conditions and values --------------------------------------------------------------------
    def _lookup(self, values: Mapping[str, Any], base: Mapping[str, Any], facts: Mapping[str, Any]):
        def lookup(name: str) -> Any:
            param = self._by_key.get(name) or self._by_path.get(name)
            if param is not None and param.key in values:
                return param.decode(values[param.key])
            if name in facts:
                return facts[name]
            if (
                name.startswith(("model.", "hardware."))
                and name.split(".", 1)[1] in MODEL_FACTS + HARDWARE_FACTS
            ):
                raise KeyError(f"condition needs fact {name!r}; pass it in `facts` (see space_facts)")
            return get_path(base, param.path if param else name)

        return lookup

    def applies_to(self, facts: Mapping[str, Any]) -> bool:
        """Whether the space's `applies_when` holds for these facts (True without one)."""
        return self.applies is None or self.applies(self._lookup({}, {}, facts))

    def active(
        self, values: Mapping[str, Any], base: RunConfig | Mapping[str, Any] | None = None, facts=None
    ) -> dict[str, Any]:
        """The sampled values whose condition holds (in parameter order), decoded to config values."""
        base_data = self._base_data(base)
        facts = facts or {}
        kept: dict[str, Any] = {}
        for p in self.parameters:
            cond = self.conditions.get(p.key)
            if p.key in values and (cond is None or cond(self._lookup(kept, base_data, facts))):
                kept[p.key] = p.decode(values[p.key])
        return kept

    def _base_data(self, base: RunConfig | Mapping[str, Any] | None) -> dict[str, Any]:
        if isinstance(base, RunConfig):
            data = base.model_dump(mode="json")
        else:
            data = validate_config(dict(base or {})).model_dump(mode="json")
        return deep_merge(data, self.spec.base)

    def overlay(self, values: Mapping[str, Any], base=None, facts=None) -> dict[str, Any]:
        """The nested config overlay of the active values, over the space's `base`."""
        overlay = dict(self.spec.base)
        for key, value in self.active(values, base, facts).items():
            nested: dict[str, Any] = {}
            set_path(nested, self._by_key[key].path, value)
            overlay = deep_merge(overlay, nested)
        return overlay

    def overrides(self, values: Mapping[str, Any], base=None, facts=None) -> list[str]:
        """The active values as `a.b=value` override strings (for logs and CLI reproduction)."""

        def text(value: Any) -> str:
            return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()

        return [f"{self._by_key[k].path}={text(v)}" for k, v in self.active(values, base, facts).items()]

    def to_config(
        self, values: Mapping[str, Any], base: RunConfig | Mapping[str, Any] | None = None, facts=None
    ) -> RunConfig:
        """Validate base + space base + active values into a RunConfig.

        Raises:
            ConfigError: naming each offending field and the fix (e.g. a combination the schema forbids).
        """
        base_data = base.model_dump(mode="json") if isinstance(base, RunConfig) else dict(base or {})
        return validate_config(deep_merge(base_data, self.overlay(values, base, facts)), source=self.source)

    def config_for_active(self, active: Mapping[str, Any], base_data: Mapping[str, Any]) -> RunConfig:
        """Validate `base_data` + the space's base + already-active, decoded values (no conditions run).

        The fast path for values that come from `grid`, `sample` or `active`.

        Raises:
            ConfigError: the combination is not a valid config.
        """
        data = deep_merge(base_data, self.spec.base)
        for key, value in active.items():
            node = data
            *parents, leaf = self._by_key[key].path.split(".")
            for part in parents:
                node[part] = dict(node.get(part) or {})
                node = node[part]
            node[leaf] = self._by_key[key].decode(value)
        return validate_config(data, source=self.source)

    def config_unvalidated(self, active: Mapping[str, Any], base: RunConfig) -> RunConfig:
        """`base` with the space's base and the active values set by copy, skipping validation (~20x
        faster than `config_for_active`; for cost-model ranking, where only the chosen ones are then
        validated). Values must already be config values of the right types."""
        updates: dict[str, dict[str, Any]] = {}
        flat: dict[str, Any] = {}
        for section, fields in self.spec.base.items():
            if isinstance(fields, Mapping):
                updates.setdefault(section, {}).update(fields)
            else:
                flat[section] = fields
        for key, value in active.items():
            path = self._by_key[key].path.split(".")
            if len(path) == 1:
                flat[path[0]] = self._by_key[key].decode(value)
            elif len(path) == 2:
                updates.setdefault(path[0], {})[path[1]] = self._by_key[key].decode(value)
            else:  # deeper fields (serving.batching.*): take the validated path
                return self.config_for_active(active, base.model_dump(mode="json"))
        sections = {name: getattr(base, name).model_copy(update=fields) for name, fields in updates.items()}
        return base.model_copy(update={**sections, **flat})

    # --- samplers ---------------------------------------------------------------------------------
    def define_by_run(self, base: RunConfig | Mapping[str, Any] | None = None, facts=None):
        """An Optuna define-by-run function: suggests only parameters whose condition holds.

        Use as `OptunaSearch(space=space.define_by_run(base, facts), metric=..., mode=...)`; the trial
        config then holds the active parameters by name (choice lists as labels: `decode` / `active`).
        """
        base_data = self._base_data(base)
        facts = dict(facts or {})

        def suggest(trial) -> None:
            chosen: dict[str, Any] = {}
            for p in self.parameters:
                cond = self.conditions.get(p.key)
                if cond is not None and not cond(self._lookup(chosen, base_data, facts)):
                    continue
                if p.type == "choice":
                    chosen[p.key] = trial.suggest_categorical(p.key, p.labels)
                elif p.type == "int":
                    chosen[p.key] = trial.suggest_int(
                        p.key, int(p.low), int(p.high), step=p.step or 1, log=p.log
                    )
                else:
                    chosen[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.type == "loguniform")
            return None

        return suggest

    def optuna_distributions(self) -> dict[str, Any]:
        """Every parameter as an Optuna distribution (no conditions: filter samples with `active`)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out: dict[str, Any] = {}
        for p in self.parameters:
            if p.type == "choice":
                out[p.key] = CategoricalDistribution(p.labels)
            elif p.type == "int":
                out[p.key] = IntDistribution(int(p.low), int(p.high), log=p.log, step=p.step or 1)
            else:
                out[p.key] = FloatDistribution(p.low, p.high, log=p.type == "loguniform")
        return out

    def tune_search_space(self) -> dict[str, Any]:
        """Every parameter as a `ray.tune` domain (no conditions: filter samples with `active`)."""
        from ray import tune

        out: dict[str, Any] = {}
        for p in self.parameters:
            if p.type == "choice":
                out[p.key] = tune.choice(p.labels)
            elif p.type == "int":
                high = int(p.high) + 1  # tune's integer upper bounds are exclusive
                if p.log:
                    out[p.key] = tune.lograndint(int(p.low), high)
                else:
                    out[p.key] = (
                        tune.qrandint(int(p.low), int(p.high), p.step)
                        if p.step
                        else tune.randint(int(p.low), high)
                    )
            elif p.type == "loguniform":
                out[p.key] = tune.loguniform(p.low, p.high)
            else:
                out[p.key] = tune.uniform(p.low, p.high)
        return out

    def sample(self, rng, base=None, facts=None) -> dict[str, Any]:
        """One random sample of the active parameters (a `random.Random`), as config values."""
        base_data = self._base_data(base)
        facts = dict(facts or {})
        chosen: dict[str, Any] = {}
        for p in self.parameters:
            cond = self.conditions.get(p.key)
            if cond is not None and not cond(self._lookup(chosen, base_data, facts)):
                continue
            if p.type == "choice":
                chosen[p.key] = rng.choice(p.values)
            elif p.type == "int":
                chosen[p.key] = rng.randrange(int(p.low), int(p.high) + 1, p.step or 1)
            elif p.type == "loguniform":
                chosen[p.key] = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
            else:
                chosen[p.key] = rng.uniform(p.low, p.high)
        return chosen

    def grid(self, base=None, facts=None, points: int = 3, enumerate_paths=None) -> Iterator[dict[str, Any]]:
        """Every combination of active parameter values, depth-first in parameter order.

        Parameters whose path is in `enumerate_paths` (what the cost model reads) take every choice, or
        `points` values across a range; the others are held at their `default` (or first choice, or
        the range's middle).
        """
        base_data = self._base_data(base)
        facts = dict(facts or {})
        enumerate_paths = set(enumerate_paths or ())

        def walk(i: int, chosen: dict[str, Any]) -> Iterator[dict[str, Any]]:
            if i == len(self.parameters):
                yield dict(chosen)
                return
            p = self.parameters[i]
            cond = self.conditions.get(p.key)
            if cond is not None and not cond(self._lookup(chosen, base_data, facts)):
                yield from walk(i + 1, chosen)
                return
            for value in p.grid_values(points, p.path in enumerate_paths):
                chosen[p.key] = value
                yield from walk(i + 1, chosen)
            chosen.pop(p.key, None)

        yield from walk(0, {})

    def grid_size(self, base=None, facts=None, points: int = 3, enumerate_paths=None) -> int:
        return sum(1 for _ in self.grid(base, facts, points, enumerate_paths))


def _issues(exc: ValidationError, prefix: str) -> list[ConfigIssue]:
    issues = []
    for error in exc.errors():
        path = ".".join(str(p) for p in [prefix, *error["loc"]] if p != "")
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = (
                "unknown key; a space has name, description, applies_when, base, parameters; a parameter "
                "has path, name, type, values, low, high, step, log, when, default, description"
            )
        issues.append(ConfigIssue(path, message))
    return issues


def _semantic_issues(spec: SearchSpaceFile, all_names: set[str]) -> list[ConfigIssue]:
    """Checks across parameters: known paths, values the schema accepts, resolvable conditions.

    `all_names` holds every parameter's name and path (valid or not): a condition naming one that comes
    later is an error, not a read of the base config.
    """
    issues: list[ConfigIssue] = []
    seen_keys: set[str] = set()
    seen_paths: set[str] = set()
    earlier: set[str] = set()
    try:
        validate_config(spec.base)
    except ConfigError as exc:
        issues += [ConfigIssue(f"base.{i.path}" if i.path else "base", i.message) for i in exc.issues]
    for p in spec.parameters:
        where = f"parameters.{p.key}"
        field = field_at(p.path)
        if field is None:
            hint = close_path(p.path)
            issues.append(ConfigIssue(f"{where}.path", f"{p.path!r} is not a RunConfig field{hint}"))
        else:
            annotated = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation  # type: ignore[misc]
            adapter = TypeAdapter(annotated)
            candidates = p.values if p.type == "choice" else [p.low, p.high]
            if p.type == "int":
                candidates = [int(c) for c in candidates]  # type: ignore[arg-type]
            for value in candidates or []:
                try:
                    adapter.validate_python(value)
                except ValidationError as exc:
                    reason = exc.errors()[0]["msg"]
                    issues.append(
                        ConfigIssue(f"{where}.values", f"{value!r} is not valid for {p.path}: {reason}")
                    )
        if p.key in seen_keys or p.path in seen_paths:
            issues.append(ConfigIssue(where, f"{p.key!r} ({p.path}) is defined twice; keep one definition"))
        if p.when:
            try:
                cond = Condition(p.when)
            except ValueError as exc:
                issues.append(ConfigIssue(f"{where}.when", str(exc)))
            else:
                for name in cond.names:
                    problem = _unknown_name(name, earlier)
                    if name in all_names and name not in earlier:
                        problem = (
                            f"{name!r} is a parameter defined at or after this one; move it above "
                            f"{p.key!r} (conditions read earlier parameters)"
                        )
                    if problem:
                        issues.append(ConfigIssue(f"{where}.when", problem))
        seen_keys.add(p.key)
        seen_paths.add(p.path)
        earlier.update({p.key, p.path})
    if spec.applies_when:
        try:
            cond = Condition(spec.applies_when)
        except ValueError as exc:
            issues.append(ConfigIssue("applies_when", str(exc)))
        else:
            for name in cond.names:
                if name not in {f"model.{f}" for f in MODEL_FACTS} | {
                    f"hardware.{f}" for f in HARDWARE_FACTS
                }:
                    issues.append(
                        ConfigIssue("applies_when", f"{name!r} is not a model.* or hardware.* fact")
                    )
    return issues


def _unknown_name(name: str, earlier: set[str]) -> str | None:
    if name in earlier:
        return None
    head, _, rest = name.partition(".")
    if (head == "model" and rest in MODEL_FACTS) or (head == "hardware" and rest in HARDWARE_FACTS):
        return None
    if field_at(name) is not None:
        return None
    if head == "hardware":
        return f"unknown fact {name!r}; hardware facts: {', '.join(HARDWARE_FACTS)}"
    return (
        f"{name!r} is neither an earlier parameter, a RunConfig field nor a fact "
        f"(model.{{{','.join(MODEL_FACTS)}}}); move the parameter it names above this one, or fix the name"
    )


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file.

    Raises:
        ConfigError: listing every problem in the file, each with its location and the fix.
    """
    return SearchSpace.from_data(read_yaml(path), source=str(path))
