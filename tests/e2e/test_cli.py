"""The `llmopt` command line, through the installed console script and typer's runner."""

import json
import shutil
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from llmopt.cli import app

pytestmark = pytest.mark.e2e
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_console_script_is_installed_and_validates_shipped_configs(repo):
    exe = shutil.which("llmopt")
    assert exe, "the llmopt console script is not on PATH"
    configs = sorted(str(p) for p in (repo / "jobs/configs").glob("*.yaml"))
    out = subprocess.run([exe, "config", "validate", *configs], capture_output=True, text=True, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("✓") == len(configs)


def test_validate_reports_every_error_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: -1\ntraining:\n  lrate: 0.1\nparallelism:\n  zero_stage: 7\n")
    result = invoke("config", "validate", str(bad))
    assert result.exit_code == 2
    assert "3 config error(s)" in result.output
    for fragment in ("lora.r", "training.lrate: unknown field; did you mean 'lr'?", "parallelism.zero_stage"):
        assert fragment in result.output
    fixed = invoke(
        "config", "validate", str(bad), "lora.r=8", "training={lr: 0.1}", "parallelism.zero_stage=2"
    )
    assert fixed.exit_code == 0, fixed.output


def test_validate_target_train_flags_what_the_backend_cannot_run(tmp_path):
    path = tmp_path / "large.yaml"
    path.write_text("template: large_model\n")
    assert invoke("config", "validate", str(path)).exit_code == 0
    result = invoke("config", "validate", str(path), "--target", "train")
    assert result.exit_code == 2 and "does not split layers" in result.output


def test_show_resolves_templates_and_overrides():
    result = invoke("config", "show", "--template", "small_model", "training.lr=0.01", "name=demo")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert data["lora"]["r"] == 8 and data["training"]["lr"] == 0.01 and data["name"] == "demo"
    assert data["data"]["prompt_template"].startswith("### Instruction:\n")


def test_templates_listing_and_detail():
    listing = invoke("config", "templates")
    assert listing.exit_code == 0
    for name in ("small_model", "large_model", "inference_optimized"):
        assert name in listing.output
    detail = invoke("config", "templates", "large_model")
    assert yaml.safe_load(detail.output)["parallelism"]["tensor_parallel_size"] == 4
    assert invoke("config", "templates", "nope").exit_code == 2


def test_models_info_json_and_errors():
    result = invoke("models", "info", "base-100m", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["hidden_size"] == 768 and info["weight_bytes"]["fp32"] == 4 * info["num_parameters"]
    missing = invoke("models", "info", "/no/such/model")
    assert missing.exit_code == 1 and "cannot read the config" in missing.output
    assert "tiny-moe" in invoke("models", "list").output


def test_recommend_applies_the_seed_rules(tmp_path):
    out = tmp_path / "rec.yaml"
    result = invoke("recommend", "--model", "tiny-llama", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "tier <1B" in result.output and "small_model" in result.output
    data = yaml.safe_load(out.read_text())
    assert data["lora"]["r"] == 8 and data["checkpointing"]["policy"] == "uniform"
    assert data["model"]["name_or_path"] == "tiny-llama"
    inference = invoke("recommend", "-m", "tiny-llama", "--mode", "inference")
    assert "inference_optimized" in inference.output


def test_eval_command(tmp_path):
    out = tmp_path / "eval.json"
    result = invoke("eval", "data.max_eval_samples=16", "model.max_seq_len=64", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "exact match 0.0% (0/16)" in result.output
    assert json.loads(out.read_text())["num_examples"] == 16
    bad = invoke("eval", "data.dataset=/no/such.jsonl")
    assert bad.exit_code == 1 and "fix data.dataset" in bad.output


def test_data_commands(tmp_path):
    result = invoke(
        "data", "generate", "--task", "sort", "--out", str(tmp_path), "--num-train", "20", "--num-test", "5"
    )
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "sort.train.jsonl").read_text().splitlines()) == 20
    shown = invoke("data", "show", str(tmp_path / "sort.test.jsonl"), "--rows", "1")
    assert "5 rows" in shown.output
    assert invoke("data", "generate", "--task", "nope").exit_code == 2


@pytest.mark.slow
def test_finetune_then_runs_list_and_show(ray_cluster, tmp_path):
    result = invoke(
        "finetune",
        "training.max_steps=2",
        "parallelism.num_workers=1",
        "model.max_seq_len=64",
        "data.max_eval_samples=4",
        "name=cli",
        f"output_dir={tmp_path}",
    )
    assert result.exit_code == 0, result.output
    listing = json.loads(invoke("runs", "list", "--output-dir", str(tmp_path), "--json").output)
    assert len(listing) == 1 and listing[0]["status"] == "finished" and listing[0]["steps"] == 2
    assert invoke("runs", "list", "--output-dir", str(tmp_path)).exit_code == 0  # the table form
    run = next(tmp_path.glob("cli-*"))
    shown = invoke("runs", "show", run.name, "--output-dir", str(tmp_path))
    assert shown.exit_code == 0 and "adapter" in shown.output and "loss.png" in shown.output
    assert invoke("runs", "show", "nope", "--output-dir", str(tmp_path)).exit_code == 1
    bad = invoke("finetune", "parallelism.tensor_parallel_size=2", "parallelism.num_workers=2")
    assert bad.exit_code == 2 and "does not split layers" in bad.output


@pytest.mark.slow
def test_gpu_configs_fail_before_any_worker_on_a_cpu_cluster(ray_cluster, tmp_path):
    import torch

    result = invoke("finetune", "resources.gpus_per_worker=1", f"output_dir={tmp_path}")
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())  # rich wraps long lines
    assert "resources.gpus_per_worker: resources.gpus_per_worker=1 asks for GPUs" in output
    assert not list(tmp_path.iterdir())  # nothing started, no run directory
    if not torch.cuda.is_available():
        evaluated = invoke("eval", "resources.accelerator=gpu")
        assert evaluated.exit_code == 2 and "sees no CUDA GPU" in " ".join(evaluated.output.split())
