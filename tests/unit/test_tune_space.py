"""Search spaces (llmopt.tune): shipped files, validation errors, conditions, Optuna / Tune mapping."""

import random

import pytest

from llmopt.config import ConfigError, load_config
from llmopt.tune import Hardware, SearchSpace, load_space, model_shape, space_facts

CPU = Hardware(accelerator="cpu", cpus=2, memory_bytes=24 * 2**30)
DENSE = space_facts(model_shape("tiny-llama"), CPU)
MOE = space_facts(model_shape("tiny-moe"), CPU)


def space(*parameters: dict, **top) -> SearchSpace:
    return SearchSpace.from_data({"name": "t", "parameters": list(parameters), **top})


ZERO = {"path": "parallelism.zero_stage", "type": "choice", "values": [0, 1, 2, 3]}
OFFLOAD = {
    "path": "parallelism.offload_optimizer",
    "type": "choice",
    "values": ["none", "cpu"],
    "when": "parallelism.zero_stage >= 2",
}


def test_every_shipped_space_is_valid(repo):
    files = sorted((repo / "tune_spaces").glob("*.yaml"))
    assert {f.name for f in files} >= {"strategy.yaml", "strategy-moe.yaml"}
    for path in files:
        loaded = load_space(path)
        facts = MOE if loaded.spec.applies_when and "is_moe" in loaded.spec.applies_when else DENSE
        if "not model.is_moe" in (loaded.spec.applies_when or ""):
            facts = DENSE
        assert loaded.applies_to(facts), path
        base = load_config(None, [f"model.name_or_path={'tiny-moe' if facts is MOE else 'tiny-llama'}"])
        rng = random.Random(0)
        for _ in range(30):  # random samples are valid configs
            loaded.to_config(loaded.sample(rng, base, facts), base, facts)
    dense, moe = (
        load_space(repo / "tune_spaces/strategy.yaml"),
        load_space(repo / "tune_spaces/strategy-moe.yaml"),
    )
    assert dense.applies_to(DENSE) and not dense.applies_to(MOE)
    assert moe.applies_to(MOE) and not moe.applies_to(DENSE)
    assert {"moe.top_k", "moe.router_aux_loss_coef"} <= {p.path for p in moe.parameters}


def test_shipped_space_covers_the_strategy_fields(repo):
    paths = {p.path for p in load_space(repo / "tune_spaces/strategy.yaml").parameters}
    assert paths >= {
        "lora.enabled", "lora.r", "lora.alpha", "lora.target_modules", "quantization.mode",
        "checkpointing.policy", "checkpointing.every_k_layers", "checkpointing.memory_budget_gb",
        "parallelism.zero_stage", "parallelism.offload_optimizer", "parallelism.offload_params",
        "precision", "training.micro_batch_size", "training.gradient_accumulation_steps", "training.lr",
    }  # fmt: skip


def test_every_error_is_reported_at_once_with_field_and_fix():
    with pytest.raises(ConfigError) as info:
        SearchSpace.from_data(
            {
                "name": "bad",
                "parameters": [
                    {"path": "lora.rank", "type": "choice", "values": [4]},
                    {"path": "lora.r", "type": "choice", "values": [0, 8]},
                    {"path": "training.lr", "type": "loguniform", "low": 0.0, "high": 1e-3},
                    {"path": "training.warmup_steps", "type": "int", "low": 10, "high": 2},
                    {"path": "lora.alpha", "type": "choice", "values": [8], "when": "later.thing > 1"},
                    {"path": "lora.dropout", "type": "choice", "values": [0.1], "frobnicate": 1},
                    {"path": "precision", "type": "choice", "values": ["fp64"]},
                    {"path": "training.seed", "type": "choice", "values": [1, 2], "default": 3},
                ],
            },
            source="bad.yaml",
        )
    text = str(info.value)
    assert "bad.yaml" in text
    assert "parameters.lora.rank.path" in text and "did you mean 'lora.r'" in text
    assert "0 is not valid for lora.r" in text
    assert "training.lr" in text and "low > 0" in text
    assert "low=10 must be below high=2" in text
    assert "'later.thing' is neither an earlier parameter" in text
    assert "unknown key" in text
    assert "'fp64' is not valid for precision" in text
    assert "default 3 is not one of values [1, 2]" in text


def test_conditions_must_name_earlier_parameters_and_known_facts():
    later = dict(OFFLOAD)
    with pytest.raises(ConfigError, match="move it above"):
        space(later, ZERO)
    with pytest.raises(ConfigError, match="only names, constants"):
        space(ZERO, {**OFFLOAD, "when": "__import__('os')"})
    with pytest.raises(ConfigError, match="hardware facts"):
        space(ZERO, {**OFFLOAD, "when": "hardware.tpus > 0"})
    with pytest.raises(ConfigError, match="applies_when"):
        space(ZERO, applies_when="parallelism.zero_stage > 1")
    # A config field that is not a parameter reads the base config's value.
    ok = space({**OFFLOAD, "when": "parallelism.zero_stage >= 2"})
    assert ok.active({"parallelism.offload_optimizer": "cpu"}, load_config(None, [])) == {}


def test_offload_only_sampled_for_zero_2_and_3():
    s = space(ZERO, OFFLOAD)
    grid = list(
        s.grid(facts=DENSE, enumerate_paths={"parallelism.zero_stage", "parallelism.offload_optimizer"})
    )
    assert len(grid) == 2 + 2 * 2  # stages 0 and 1 alone, 2 and 3 with each offload choice
    for values in grid:
        assert ("parallelism.offload_optimizer" in values) == (values["parallelism.zero_stage"] >= 2)
    inactive = s.active({"parallelism.zero_stage": 1, "parallelism.offload_optimizer": "cpu"})
    assert inactive == {"parallelism.zero_stage": 1}
    config = s.to_config({"parallelism.zero_stage": 1, "parallelism.offload_optimizer": "cpu"})
    assert config.parallelism.offload_optimizer == "none"  # dropped, so the config stays valid
    assert s.overrides({"parallelism.zero_stage": 2, "parallelism.offload_optimizer": "cpu"}) == [
        "parallelism.zero_stage=2",
        "parallelism.offload_optimizer=cpu",
    ]


def test_model_facts_gate_moe_parameters(repo):
    moe = load_space(repo / "tune_spaces/strategy-moe.yaml")
    sampled = moe.sample(random.Random(1), load_config(None, ["model.name_or_path=tiny-moe"]), MOE)
    assert "moe.top_k" in sampled
    gated = space({"path": "moe.top_k", "type": "choice", "values": [1, 2], "when": "model.is_moe"})
    assert gated.active({"moe.top_k": 1}, facts=DENSE) == {}
    assert gated.active({"moe.top_k": 1}, facts=MOE) == {"moe.top_k": 1}
    with pytest.raises(KeyError, match="space_facts"):
        gated.active({"moe.top_k": 1})


def test_list_valued_choices_travel_as_labels():
    s = space(
        {"path": "lora.enabled", "type": "choice", "values": [True]},
        {
            "path": "moe.adapter_targets",
            "type": "choice",
            "values": [["attention"], ["attention", "experts"]],
            "when": "lora.enabled",
        },
    )
    param = s.parameters[1]
    assert param.labels == ["attention", "attention+experts"]
    assert param.decode("attention+experts") == ["attention", "experts"]
    assert param.decode(["attention"]) == ["attention"]  # config values pass through
    config = s.to_config({"lora.enabled": True, "moe.adapter_targets": "attention+experts"})
    assert config.moe.adapter_targets == ["attention", "experts"]


def test_optuna_mapping_and_define_by_run(repo):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    strategy = load_space(repo / "tune_spaces/strategy.yaml")
    dists = strategy.optuna_distributions()
    assert isinstance(dists["parallelism.zero_stage"], CategoricalDistribution)
    assert dists["training.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    base = load_config(None, ["model.name_or_path=tiny-llama"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    suggest = strategy.define_by_run(base, DENSE)
    for _ in range(40):
        trial = study.ask()
        suggest(trial)
        params = trial.params
        assert ("parallelism.offload_optimizer" in params) == (params["parallelism.zero_stage"] >= 2)
        assert ("lora.r" in params) == params["lora.enabled"]
        assert ("checkpointing.every_k_layers" in params) == (params["checkpointing.policy"] == "uniform")
        strategy.to_config(params, base, DENSE)  # every define-by-run sample is a valid config
        study.tell(trial, 0.0)


def test_ray_tune_search_space_and_optuna_search(repo):
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float

    strategy = load_space(repo / "tune_spaces/strategy.yaml")
    domains = strategy.tune_search_space()
    assert isinstance(domains["precision"], Categorical) and isinstance(domains["training.lr"], Float)
    assert isinstance(tune.choice([1]), Categorical)
    base = load_config(None, ["model.name_or_path=tiny-llama"])
    searcher = OptunaSearch(
        space=strategy.define_by_run(base, DENSE), metric="tokens_per_s", mode="max", seed=0
    )
    for i in range(5):
        suggested = searcher.suggest(f"trial-{i}")
        config = strategy.to_config(suggested, base, DENSE)
        assert config.parallelism.zero_stage == suggested["parallelism.zero_stage"]


def test_grid_holds_cost_neutral_settings_fixed(repo):
    from llmopt.tune import COST_PATHS

    strategy = load_space(repo / "tune_spaces/strategy.yaml")
    base = load_config(None, ["model.name_or_path=tiny-llama"])
    seen_lr, seen_alpha, seen_budget = set(), set(), set()
    for values in strategy.grid(base, DENSE, points=3, enumerate_paths=COST_PATHS):
        seen_lr.add(values["training.lr"])
        seen_alpha.add(values.get("lora.alpha"))
        seen_budget.add(values.get("checkpointing.memory_budget_gb"))
    assert seen_lr == {1e-3}  # the parameter's default
    assert seen_alpha <= {16, None}
    assert len(seen_budget - {None}) == 3  # a range the cost model reads is enumerated
