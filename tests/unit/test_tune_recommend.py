"""Instant recommendation: rank a search space with the cost model, library and `llmopt recommend`."""

import json

import pytest
import yaml
from typer.testing import CliRunner

import llmopt.tune
from llmopt.cli import app
from llmopt.config import ConfigError, backend_errors, load_config, validate_config
from llmopt.tune import (
    GIB,
    Calibration,
    Coefficients,
    CostModel,
    Hardware,
    default_space_path,
    load_space,
    model_shape,
    recommend,
)

CPU = Hardware(accelerator="cpu", cpus=2, memory_bytes=24 * GIB, cpu_name="test")
MIB = 1024**2
runner = CliRunner()


@pytest.fixture
def uncalibrated(monkeypatch):
    monkeypatch.setattr(llmopt.tune, "load_calibration", lambda model, hardware: None)


def test_recommend_prunes_and_ranks_without_running(repo):
    space = load_space(repo / "tune_spaces/strategy.yaml")
    base = load_config(None, ["model.name_or_path=tiny-llama"])
    model = CostModel(model_shape("tiny-llama"), CPU)
    ranking = recommend(base, space, model, 700 * MIB)
    counts = ranking.counts()
    assert counts["candidates"] == counts["fit"] + counts["pruned"] + counts["invalid"] > 1000
    assert counts["pruned"] == counts["pruned_memory"] > 0  # only the budget prunes on this machine
    assert all(c.prediction.peak_bytes > 700 * MIB for c in ranking.pruned)
    assert all(c.prediction.peak_bytes <= 700 * MIB for c in ranking.ranked)
    speeds = [c.prediction.tokens_per_s for c in ranking.ranked]
    assert speeds == sorted(speeds, reverse=True)
    best = ranking.best
    assert best is not None and not backend_errors(best.config)
    assert validate_config(best.config.model_dump(mode="json")) == best.config
    assert ranking.baseline is not None and ranking.baseline.config.lora.r == 8  # the small_model template
    assert best.prediction.tokens_per_s >= ranking.baseline.prediction.tokens_per_s
    # Two workers on two cores: every candidate runs two workers, throughput roughly doubles.
    two = recommend(base, space, model, 700 * MIB, workers=2)
    assert two.best.config.parallelism.num_workers == 2
    assert two.best.prediction.tokens_per_s > 1.5 * best.prediction.tokens_per_s
    # Three workers need three CPUs: all pruned, none fits.
    three = recommend(base, space, model, 700 * MIB, workers=3)
    assert three.best is None and three.counts()["pruned"] == three.counts()["candidates"]
    assert all(any(r.startswith("cpus: 3 workers") for r in c.prediction.reasons) for c in three.pruned)


def test_space_for_the_wrong_model_is_refused(repo):
    moe_space = load_space(repo / "tune_spaces/strategy-moe.yaml")
    base = load_config(None, ["model.name_or_path=tiny-llama"])
    with pytest.raises(ConfigError, match="applies when"):
        recommend(base, moe_space, CostModel(model_shape("tiny-llama"), CPU), GIB)
    assert default_space_path(False, [repo]).name == "strategy.yaml"
    assert default_space_path(True, [repo]).name == "strategy-moe.yaml"
    assert default_space_path(True, [repo / "nowhere"]) is None


def test_cli_recommend_with_budget_writes_a_runnable_config(tmp_path, repo, monkeypatch, uncalibrated):
    monkeypatch.chdir(repo)
    out = tmp_path / "best.yaml"
    result = runner.invoke(
        app, ["recommend", "-m", "tiny-llama", "--memory-budget", "700MiB", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "uncalibrated defaults" in text and "700.0 MiB per worker" in text
    assert "rule-based" in text and "pruned before running" in text
    data = yaml.safe_load(out.read_text())
    config = validate_config(data)
    assert config.model.name_or_path == "tiny-llama"
    assert config.resources.memory_budget_gb == pytest.approx(700 / 1024)
    assert not backend_errors(config)


def test_cli_recommend_errors_and_seed_behaviour(tmp_path, repo, monkeypatch, uncalibrated):
    monkeypatch.chdir(repo)
    bad = runner.invoke(app, ["recommend", "-m", "tiny-llama", "--memory-budget", "4 parsecs"])
    assert bad.exit_code == 2 and "4GiB" in bad.output
    none_fit = runner.invoke(app, ["recommend", "-m", "tiny-llama", "--memory-budget", "100MiB"])
    assert none_fit.exit_code == 1 and "no strategy is predicted to fit" in " ".join(none_fit.output.split())
    broken = tmp_path / "space.yaml"
    broken.write_text("name: x\nparameters:\n  - {path: lora.rank, type: choice, values: [4]}\n")
    result = runner.invoke(
        app, ["recommend", "-m", "tiny-llama", "--memory-budget", "1GiB", "--space", str(broken)]
    )
    assert result.exit_code == 2 and "did you mean 'lora.r'" in " ".join(result.output.split())
    seed = runner.invoke(app, ["recommend", "-m", "tiny-llama"])  # without a budget: the seed's rules
    assert seed.exit_code == 0 and "tier <1B" in seed.output


def test_cli_recommend_reports_a_cached_calibration(tmp_path, repo, monkeypatch):
    monkeypatch.chdir(repo)
    calibration = Calibration(
        model="tiny-llama",
        machine="m",
        hardware=CPU.to_dict(),
        coefficients=Coefficients.defaults(CPU),
        in_process_runtime_bytes=450 * MIB,
        worker_extra_bytes=180 * MIB,
        created="2026-01-01T00:00:00+00:00",
    )
    path = calibration.save(tmp_path / "cal.json")
    loaded = Calibration.from_dict(json.loads(path.read_text()), str(path))
    assert loaded.coefficients == calibration.coefficients
    monkeypatch.setattr(llmopt.tune, "load_calibration", lambda model, hardware: loaded)
    result = runner.invoke(app, ["recommend", "-m", "tiny-llama", "--memory-budget", "1GiB", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "calibrated 2026-01-01" in " ".join(result.output.split())
