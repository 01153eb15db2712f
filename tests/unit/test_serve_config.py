"""Shipped Serve config files (serve_apps/configs/*.yaml) validate against Ray's own schema, strictly.

Ray's ServeDeploySchema ignores unknown keys, so a misspelt option would be dropped without a word:
every key is also checked against the schema's fields. No Ray cluster is needed.
"""

import inspect
import os
from pathlib import Path

import pytest
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

from llmopt.config import ConfigError, load_config, validate_config

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = sorted((REPO / "serve_apps" / "configs").glob("*.yaml"))


def _unknown(data: dict, model, where: str) -> list[str]:
    names = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return [f"{where}.{key}" for key in data if key not in names]


def _unknown_keys(config: dict) -> list[str]:
    problems = _unknown(config, ServeDeploySchema, "")
    problems += _unknown(config.get("http_options") or {}, HTTPOptionsSchema, "http_options")
    for i, application in enumerate(config.get("applications") or []):
        where = f"applications[{i}]"
        problems += _unknown(application, ServeApplicationSchema, where)
        for j, deployment in enumerate(application.get("deployments") or []):
            problems += _unknown(deployment, DeploymentSchema, f"{where}.deployments[{j}]")
            scaling = deployment.get("autoscaling_config") or {}
            problems += _unknown(scaling, AutoscalingConfig, f"{where}.deployments[{j}].autoscaling_config")
    return problems


def test_serve_configs_exist():
    assert [p.name for p in SERVE_CONFIGS] == ["llm.yaml"]


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_validates_with_rays_schema(path):
    data = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(data)
    assert _unknown_keys(data) == []
    for application in schema.applications:
        # No runtime_env: a local working_dir would have to be an absolute local:// URI (see the header).
        assert application.runtime_env == {}, application.name
        module, _, attr = application.import_path.partition(":")
        assert (REPO / Path(*module.split("."))).with_suffix(".py").is_file(), application.import_path
        assert attr, application.import_path
        # The builder's args are a run config (relative to the repository root) and overrides.
        config = load_config(REPO / application.args["config"], application.args.get("overrides", []))
        for deployment in application.deployments:
            if deployment.user_config:  # LLMServer.reconfigure takes the run config's batching fields
                validate_config(
                    {**config.model_dump(mode="json"), "serving": {"batching": deployment.user_config}}
                )


def test_unknown_keys_are_caught():
    data = yaml.safe_load((REPO / "serve_apps/configs/llm.yaml").read_text())
    data["http_options"]["prot"] = 1
    data["applications"][0]["deployments"][0]["autoscaling_config"]["max_replica"] = 3
    assert _unknown_keys(data) == [
        "http_options.prot",
        "applications[0].deployments[0].autoscaling_config.max_replica",
    ]


def test_the_shipped_llm_config():
    data = yaml.safe_load((REPO / "serve_apps/configs/llm.yaml").read_text())
    assert data["http_options"] == {"host": "127.0.0.1", "port": 8000}
    (application,) = data["applications"]
    assert application["name"] == "llm" and application["route_prefix"] == "/"
    assert application["import_path"] == "serve_apps.llm:app"
    # It autoscales to two replicas, which the run config cannot see: it keeps the split layout explicitly.
    assert application["args"] == {
        "config": "jobs/configs/tiny-llama-reverse.yaml",
        "overrides": ["serving.layout=split"],
    }
    server = next(d for d in application["deployments"] if d["name"] == "LLMServer")
    assert server["user_config"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}
    scaling = AutoscalingConfig(**server["autoscaling_config"])
    assert 1 <= scaling.min_replicas < scaling.max_replicas


def test_autoscaling_serve_options_fixed_or_bounded():
    fixed = load_config(None, ["serving.autoscaling.min_replicas=2", "serving.autoscaling.max_replicas=2"])
    assert fixed.serving.autoscaling.serve_options() == {"num_replicas": 2}
    bounded = load_config(
        None, ["serving.autoscaling.max_replicas=3", "serving.autoscaling.target_ongoing_requests=4"]
    )
    options = bounded.serving.autoscaling.serve_options()["autoscaling_config"]
    assert options["max_replicas"] == 3 and options["target_ongoing_requests"] == 4
    AutoscalingConfig(**options)  # Ray's own schema accepts every key


def test_throughput_mode_sets_rays_variables_and_keeps_the_users(monkeypatch):
    """`--throughput-optimized` sets Ray Serve's own variables (names Ray still reads), never overriding one
    the user set, and reports HAProxy's stats and metrics ports."""
    from ray.serve._private import constants

    from llmopt.cluster import HAPROXY_PORT_ENV, SERVE_THROUGHPUT_ENV, use_serve_throughput_mode

    read_by_ray = inspect.getsource(constants)
    names = [*SERVE_THROUGHPUT_ENV, *HAPROXY_PORT_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]
    for name in names:
        assert f'"{name}"' in read_by_ray, name
        monkeypatch.setenv(name, "")  # recorded, so that the test's end restores this process's environment
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "7")
    ports = use_serve_throughput_mode()
    assert ports == {"RAY_SERVE_HAPROXY_STATS_PORT": 18404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
    assert {k: os.environ[k] for k in SERVE_THROUGHPUT_ENV} == SERVE_THROUGHPUT_ENV
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "7"


def test_importing_the_serving_code_makes_torchs_idle_threads_sleep_and_keeps_a_users_setting():
    """Replicas import serve_apps before torch: OMP_WAIT_POLICY=PASSIVE unless the user chose one."""
    import subprocess
    import sys

    code = "import serve_apps, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def policy(extra: dict[str, str]) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code], env={**env, **extra}, cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-500:]
        return done.stdout.strip()

    assert policy({}) == "PASSIVE"
    assert policy({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["serving.batching.mode=static"],
        ["serving.autoscaling.min_replicas=1", "serving.autoscaling.max_replicas=3"],
        ["resources.accelerator=gpu"],
        ["resources.gpus_per_worker=0.5", "resources.cpus_per_worker=4"],
    ],
    ids=["default", "static", "autoscaled", "gpu", "half-gpu"],
)
def test_deployment_options_are_valid_serve_options_and_resolved(overrides):
    from llmopt.deployment import INGRESS, SERVER, deployment_options

    config = load_config(None, overrides)
    options = deployment_options(config)
    for name, entry in options.items():
        DeploymentSchema.model_validate({"name": name, **entry})  # Ray's own schema of a Serve config entry
        assert _unknown(entry, DeploymentSchema, name) == []
    server = options[SERVER]
    # user_config is what LLMServer.reconfigure applies: resolved numbers, never null
    assert server["user_config"] == {
        "max_batch_size": config.serving.batching.max_batch_size,
        "batch_wait_timeout_s": config.serving.batching.wait_timeout_s,
    }
    assert None not in server["user_config"].values()
    actor = server["ray_actor_options"]
    assert actor["num_cpus"] == config.resources.cpus_per_worker
    assert actor.get("num_gpus", 0) == config.resources.gpus
    if config.serving.single_layout:  # one deployment: the model replicas serve HTTP themselves
        assert INGRESS not in options
    else:
        assert options[INGRESS]["num_replicas"] == 1


@pytest.mark.parametrize(
    ("overrides", "single"),
    [
        ([], True),
        (["serving.autoscaling.max_replicas=2"], False),
        (["serving.models={b: tiny-llama}"], False),
        (["serving.layout=split"], False),
        (["serving.layout=single", "serving.autoscaling.max_replicas=3"], True),
    ],
    ids=["default", "autoscaled", "two-models", "split", "single-autoscaled"],
)
def test_layout_auto_is_single_for_one_model_on_one_replica(overrides, single):
    """`auto` puts HTTP and the model in one deployment only where the split layout's routing has nothing to
    do: one model, one replica (sessions and adapters return to the replica that holds them only through the
    ingress's multiplexed routing)."""
    from llmopt.deployment import INGRESS, SERVER, deployment_options

    config = load_config(None, overrides)
    assert config.serving.single_layout is single
    options = deployment_options(config)
    assert set(options) == ({SERVER} if single else {SERVER, INGRESS})
    if single:
        # Serve lets every request the replica can run or queue through; the replica bounds them itself.
        ongoing = 2 * config.serving.batching.max_batch_size
        assert options[SERVER]["max_ongoing_requests"] == ongoing + config.serving.max_queued_requests + 16
        assert options[SERVER]["max_queued_requests"] == -1


@pytest.mark.parametrize("field", ["models", "routes"])
def test_single_layout_refuses_several_models_naming_the_field(field):
    value = "{b: tiny-llama}" if field == "models" else "{r: {arms: {a: {model: tiny-llama, weight: 1}}}}"
    with pytest.raises(ConfigError, match=rf"serving.layout=single .* serving.{field} is set.*layout=split"):
        load_config(None, ["serving.layout=single", f"serving.{field}={value}"])
