"""The run-config schema: shipped YAML validates, broken configs report every error with the fix."""

from pathlib import Path

import pytest
import yaml

from llmopt.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    backend_errors,
    dump_config,
    load_config,
    rule_based_recommendation,
    templates,
    validate_config,
)
from llmopt.config._templates import TEMPLATE_DIR

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(
    p
    for folder in ("jobs/configs", "serve_apps/configs", "tune_spaces", "kuberay")
    for p in (REPO / folder).glob("**/*.yaml")
    if folder == "jobs/configs"  # other folders hold other schemas; their own tests validate them
)


def _errors(data_or_path, overrides=()):
    with pytest.raises(ConfigError) as info:
        if isinstance(data_or_path, dict):
            validate_config(apply_overrides(data_or_path, overrides))
        else:
            load_config(data_or_path, overrides)
    return info.value.issues


def test_shipped_configs_exist_and_validate():
    assert len(SHIPPED) >= 2
    for path in SHIPPED:
        config = load_config(path)
        assert backend_errors(config) == [], path


@pytest.mark.parametrize("name", sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml")))
def test_every_template_validates(name):
    config = validate_config({"template": name})
    assert isinstance(config, RunConfig)


def test_every_field_is_described():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation, f"{prefix}{name}.")

    walk(RunConfig)


def test_broken_config_reports_all_errors_at_once(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "lora": {"rank": 8, "r": 0},
                "training": {"lr": -1, "micro_batch": 4},
                "parallelism": {"zero_stage": 5, "offload_params": "cpu"},
                "checkpointing": {"policy": "memory_budget"},
                "precison": "fp32",
            }
        )
    )
    issues = _errors(path)
    paths = {issue.path for issue in issues}
    assert {
        "lora.rank",
        "lora.r",
        "training.lr",
        "training.micro_batch",
        "parallelism.zero_stage",
        "checkpointing",
        "precison",
    } <= paths
    by_path = {issue.path: issue.message for issue in issues}
    assert "did you mean 'r'" in by_path["lora.rank"]
    assert "did you mean 'micro_batch_size'" in by_path["training.micro_batch"]
    assert "did you mean 'precision'" in by_path["precison"]
    assert "(got 5)" in by_path["parallelism.zero_stage"]
    assert "memory_budget_gb" in by_path["checkpointing"]
    message = str(ConfigError(issues, str(path)))
    assert f"{len(issues)} config error(s) in {path}" in message


def test_cross_field_errors_name_both_values_and_the_fix():
    issues = _errors(
        {},
        [
            "parallelism.zero_stage=1",
            "parallelism.offload_params=cpu",
            "parallelism.num_workers=3",
            "parallelism.tensor_parallel_size=2",
        ],
    )
    messages = [i.message for i in issues if i.path == "parallelism"]
    assert len(messages) == 2
    assert any("offload_params='cpu' needs zero_stage=3 (got zero_stage=1)" in m for m in messages)
    assert any("num_workers=3 is not a multiple" in m and "use num_workers=2" in m for m in messages)

    issues = _errors(
        {}, ["quantization.mode=nf4", "lora.enabled=false", "resources.accelerator=cpu", "precision=fp16"]
    )
    text = " | ".join(i.message for i in issues)
    assert "quantization.mode='nf4' needs lora.enabled=true" in text
    assert "DeepSpeed refuses fp16 on CPU" in text

    issues = _errors({}, ["serving.max_ongoing_requests=4", "serving.batching.max_batch_size=16"])
    assert "max_ongoing_requests=4 is below serving.batching.max_batch_size=16" in issues[0].message


def test_peft_method_combinations_peft_cannot_train_name_the_fix():
    cases = {
        ("lora.method=dora", "lora.target_parameters=[mlp.experts.down_proj]"): "plain LoRA only",
        ("lora.method=ia3", "lora.bias=all"): "only lora and dora train biases",
        ("lora.method=prompt_tuning", "lora.target_modules=all-linear"): "leave target_modules at auto",
        ("lora.method=loha", "quantization.mode=nf4"): "do not wrap bitsandbytes-quantized layers",
        ("lora.method=prefix_tuning", "checkpointing.policy=uniform"): "set checkpointing.policy=none",
        ("lora.method=prompt_tuning", "data.packing=true"): "set data.packing=false",
        ("lora.method=prefix_tuning", "training.save_merged=true"): "cannot be merged",
        (
            "lora.method=dora",
            "model.name_or_path=tiny-moe",
            "moe.mode=finetune",
            "moe.adapter_targets=[experts]",
        ): ("use lora.method=lora or moe.adapter_targets=[attention]"),
        ("lora.method=prefix_tuning", "moe.mode=finetune", "moe.adapter_targets=[attention,router]"): (
            "set moe.adapter_targets=[attention]"
        ),
    }
    for overrides, fix in cases.items():
        text = " | ".join(i.message for i in _errors({}, list(overrides)))
        assert fix in text and overrides[0].split("=")[1] in text, (overrides, text)
    ok = load_config(None, ["lora.method=dora", "quantization.mode=nf4", "lora.modules_to_save=[lm_head]"])
    assert ok.lora.method == "dora"
    for method in ("ia3", "prompt_tuning", "prefix_tuning", "loha", "lokr"):
        load_config(None, [f"lora.method={method}", "lora.modules_to_save=[lm_head]"])
    issues = _errors({}, ["lora.method=bottleneck"])
    assert "lora.method" in issues[0].path and "prompt_tuning" in issues[0].message


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides(
        {},
        [
            "training.lr=3e-4",
            "lora.target_modules=[q_proj, v_proj]",
            "training.max_steps=null",
            "model.name_or_path=/models/x",
        ],
    )
    config = validate_config(data)
    assert config.training.lr == pytest.approx(3e-4)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.training.max_steps is None
    assert config.model.name_or_path == "/models/x"


def test_bad_override_and_bad_yaml_are_config_errors(tmp_path):
    assert "not of the form a.b=value" in str(_errors({}, ["training.lr"])[0])
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    assert "invalid YAML" in str(_errors(bad)[0])
    assert "does not exist" in str(_errors(tmp_path / "missing.yaml")[0])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "top level must be a mapping" in str(_errors(listing)[0])


def test_template_then_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("template: small_model\nlora:\n  r: 16\n")
    config = load_config(path, ["lora.alpha=32"])
    assert (config.lora.r, config.lora.alpha) == (16, 32)
    assert config.checkpointing.policy == "uniform"  # from the template
    assert "unknown template 'huge'" in str(_errors({"template": "huge"})[0])


def test_yaml_round_trip(tmp_path):
    config = load_config(None, ["template=large_model", "training.betas=[0.8, 0.95]"])
    path = tmp_path / "out.yaml"
    dump_config(config, path)
    assert load_config(path) == config


def test_large_model_template_is_valid_data_but_not_trainable_here():
    config = validate_config({"template": "large_model"})
    assert (config.parallelism.tensor_parallel_size, config.parallelism.pipeline_parallel_size) == (4, 2)
    problems = backend_errors(config)
    assert len(problems) == 1
    assert "tensor_parallel_size=4 x pipeline_parallel_size=2" in problems[0]
    assert "zero_stage=3" in problems[0]


def test_seed_templates_match_the_seed_system():
    t = {name: tpl.overlay for name, tpl in templates().items()}
    assert t["small_model"]["lora"] == {"enabled": True, "r": 8, "alpha": 8}
    assert t["small_model"]["checkpointing"]["policy"] == "uniform"
    assert (
        t["large_model"]["lora"]["r"],
        t["large_model"]["moe"]["num_experts"],
        t["large_model"]["moe"]["top_k"],
    ) == (64, 32, 2)
    assert t["large_model"]["checkpointing"]["policy"] == "memory_budget"
    serving = validate_config({"template": "inference_optimized"}).serving
    assert (serving.precision, serving.quantization, serving.batching.max_batch_size) == ("fp16", "int8", 8)
    assert serving.kv_cache.enabled


@pytest.mark.parametrize(
    ("params", "mode", "template", "r", "precision"),
    [
        (3_400_000, "train", "small_model", 8, "auto"),
        (999_999_999, "train", "small_model", 8, "auto"),
        (1_000_000_000, "train", "small_model", 32, "fp16"),
        (7_000_000_000, "train", "small_model", 32, "fp16"),
        (13_000_000_000, "train", "large_model", 64, "auto"),
        (70_000_000_000, "train", "large_model", 64, "auto"),
        (7_000_000_000, "inference", "inference_optimized", 8, "auto"),
    ],
)
def test_rule_based_selector(params, mode, template, r, precision):
    rec = rule_based_recommendation(params, mode)
    assert rec.template == template
    config = validate_config(rec.config_data())
    assert config.lora.r == r
    assert config.precision == precision
    if template == "large_model":
        assert config.moe.mode == "upcycle" and config.parallelism.tensor_parallel_size == 4
    if mode == "train":
        assert config.checkpointing.policy != "none"
