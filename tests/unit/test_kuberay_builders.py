"""KubeRay manifests from run configs: sizing, secure defaults, the Serve config, the examples, the CLI."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kuberay import (
    DEFAULT_IMAGE,
    MANIFEST_DIR,
    RAY_VERSION,
    KubeRayOptions,
    build_raycluster,
    build_rayjob,
    build_rayservice,
    image_path,
    llm_application,
    load_manifests,
    rayservice_from_files,
    render_examples,
    resource_name,
)
from kuberay.cli import app as kuberay_app
from llmopt.config import load_config, validate_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "tiny-llama-reverse.yaml"
IN_IMAGE = "/home/ray/app/jobs/configs/tiny-llama-reverse.yaml"


def _containers(obj):
    """Every container of every pod template in a RayJob / RayService / RayCluster."""
    spec = obj["spec"]
    cluster = {"RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}.get(
        obj["kind"], spec
    )
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    if "submitterPodTemplate" in spec:
        templates.append(spec["submitterPodTemplate"])
    containers = [(t, c) for t in templates for c in t["spec"]["containers"]]
    if "autoscalerOptions" in cluster:
        containers.append((None, cluster["autoscalerOptions"]))
    return cluster, containers


def _all_examples():
    return [load_manifests(MANIFEST_DIR / name)[0] for name in sorted(render_examples())]


@pytest.mark.parametrize("obj", _all_examples(), ids=lambda o: o["kind"])
def test_every_container_is_limited_and_unprivileged(obj):
    _, containers = _containers(obj)
    assert containers
    for template, container in containers:
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], container.get("name")
        assert {"cpu", "memory"} <= set(resources["limits"]), container.get("name")
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 1000
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        if template is not None:
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True
            assert container["image"] == DEFAULT_IMAGE


@pytest.mark.parametrize("obj", _all_examples(), ids=lambda o: o["kind"])
def test_dashboard_and_services_stay_inside_the_cluster(obj):
    cluster, _ = _containers(obj)
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    assert head["rayStartParams"]["num-cpus"] == "0"  # no workloads beside the GCS and dashboard
    text = yaml.safe_dump(obj)
    assert "LoadBalancer" not in text and "NodePort" not in text
    if obj["kind"] == "RayService":
        assert obj["spec"]["serveService"]["spec"]["type"] == "ClusterIP"
    # Only the head's autoscaler sidecar talks to the Kubernetes API.
    for group in cluster["workerGroupSpecs"]:
        assert group["template"]["spec"]["automountServiceAccountToken"] is False


def test_rayjob_runs_the_finetune_entry_point_sized_from_the_config():
    config = load_config(TINY, ["resources.memory_gb_per_worker=3"])
    job = build_rayjob(config, config_path=IN_IMAGE, overrides=["resources.memory_gb_per_worker=3"])
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"] == "tiny-llama-reverse"
    assert spec["entrypoint"] == (
        f"python -m jobs.finetune --config {IN_IMAGE} resources.memory_gb_per_worker=3 "
        "output_dir=/home/ray/runs"
    )
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 300 and spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 86400
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION and cluster["enableInTreeAutoscaling"] is False
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == config.parallelism.num_workers
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "1", "memory": "4Gi"}  # 3 GiB for the worker + 1 GiB node overhead
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    assert volumes["runs"] == {"name": "runs", "emptyDir": {}}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory"}


def test_rayjob_gpus_elastic_workers_shared_storage_and_tune():
    config = load_config(
        TINY,
        [
            "resources.accelerator=gpu",
            "resources.gpus_per_worker=1",
            "resources.cpus_per_worker=3.5",
            "parallelism.num_workers=4",
            "parallelism.min_workers=2",
        ],
    )
    options = KubeRayOptions(runs_claim="llmopt-runs", active_deadline_seconds=None, image="r.io/llmopt:1")
    job = build_rayjob(config, config_path=IN_IMAGE, overrides=["output_dir=/mnt/x"], options=options)
    assert "activeDeadlineSeconds" not in job["spec"]
    assert job["spec"]["entrypoint"].endswith("output_dir=/mnt/x")  # an explicit output_dir wins
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 4, 4)
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "5Gi", "nvidia.com/gpu": "1"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["volumes"][0] == {"name": "runs", "persistentVolumeClaim": {"claimName": "llmopt-runs"}}
    assert pod["containers"][0]["image"] == "r.io/llmopt:1"
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert "automountServiceAccountToken" not in head  # the autoscaler sidecar needs the token

    tune = build_rayjob(load_config(TINY), config_path=IN_IMAGE, job="tune", job_args=["--trials", "8"])
    assert tune["spec"]["entrypoint"].startswith(f"python -m jobs.tune --config {IN_IMAGE} --trials 8 ")
    (group,) = tune["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 4)  # trials share an autoscaled group


def test_rayservice_from_the_shipped_serve_config():
    service = rayservice_from_files(serve_config=REPO / "serve_apps/configs/llm.yaml")
    shipped = yaml.safe_load((REPO / "serve_apps/configs/llm.yaml").read_text())["applications"][0]
    spec = service["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    serve = yaml.safe_load(spec["serveConfigV2"])
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}  # the pod IP, behind ClusterIP
    (application,) = serve["applications"]
    assert application["import_path"] == "serve_apps.llm:app"
    assert application["args"]["config"] == IN_IMAGE
    assert application["args"]["overrides"] == [
        "serving.layout=split",
        "serving.api_keys_env=LLMOPT_API_KEYS",
    ]
    deployments = {d["name"]: d for d in application["deployments"]}
    shipped_server = next(d for d in shipped["deployments"] if d["name"] == "LLMServer")
    server = deployments["LLMServer"]
    assert server["autoscaling_config"] == shipped_server["autoscaling_config"]
    assert server["user_config"] == shipped_server["user_config"]
    assert server["ray_actor_options"] == {"num_cpus": 1.0} and server["max_replicas_per_node"] == 1
    assert deployments["LLMIngress"]["ray_actor_options"] == {"num_cpus": 0}
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    scaling = shipped_server["autoscaling_config"]
    assert (group["minReplicas"], group["maxReplicas"]) == (scaling["min_replicas"], scaling["max_replicas"])
    # The API keys come from a Secret on every pod (the ingress may run on any of them).
    for template in [cluster["headGroupSpec"]["template"], group["template"]]:
        (env,) = template["spec"]["containers"][0]["env"]
        assert env["name"] == "LLMOPT_API_KEYS"
        assert env["valueFrom"]["secretKeyRef"] == {
            "name": "tiny-llama-reverse-api-keys",
            "key": "api-keys",
            "optional": False,
        }
    ports = {
        p["name"]: p["containerPort"]
        for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "serve": 8000}


def test_rayservice_from_a_run_config_and_its_serving_section():
    overrides = [
        "serving.autoscaling.min_replicas=2",
        "serving.autoscaling.max_replicas=5",
        "serving.api_keys_env=MY_KEYS",
        "resources.gpus_per_worker=1",
        "resources.accelerator=gpu",
    ]
    config = load_config(TINY, overrides)
    options = KubeRayOptions(name="chat", api_keys_secret="keys")
    service = build_rayservice(config, llm_application(IN_IMAGE, overrides), options)
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = serve["applications"]
    assert application["args"]["overrides"] == overrides  # the config names its env var already
    server = application["deployments"][0]
    assert (
        server["autoscaling_config"]["min_replicas"] == 2
        and server["autoscaling_config"]["max_replicas"] == 5
    )
    assert server["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 5)
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["env"][0]["name"] == "MY_KEYS"
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "keys"
    assert service["spec"]["serveService"]["metadata"]["name"] == "chat-serve"

    open_service = build_rayservice(load_config(TINY), llm_application(IN_IMAGE), KubeRayOptions(auth=False))
    assert (
        "env"
        not in open_service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    )
    with pytest.raises(ValueError, match=r"serve_apps\.llm:app only"):
        build_rayservice(load_config(TINY), {"name": "x", "import_path": "other:app", "args": {}})


def test_rayservice_in_serves_throughput_mode_sets_it_on_every_pod():
    options = KubeRayOptions(auth=False, throughput_optimized=True)
    spec = build_rayservice(load_config(TINY), llm_application(IN_IMAGE), options)["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    wanted = [
        {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"},
        {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"},
    ]
    for group in groups:
        assert group["template"]["spec"]["containers"][0]["env"] == wanted


def test_serve_config_v2_passes_rays_own_schema_and_the_builder_args():
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    service = rayservice_from_files(serve_config=REPO / "serve_apps/configs/llm.yaml")
    data = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(data)
    names = set(DeploymentSchema.model_fields)
    for deployment in data["applications"][0]["deployments"]:
        assert set(deployment) <= names, set(deployment) - names  # Ray ignores unknown keys silently
    # The app builder would load exactly this run config (the path mapped back into the repository).
    args = schema.applications[0].args
    config = load_config(REPO / Path(args["config"]).relative_to("/home/ray/app"), args["overrides"])
    assert config.serving.api_keys_env == "LLMOPT_API_KEYS"
    server = next(d for d in schema.applications[0].deployments if d.name == "LLMServer")
    validate_config({**config.model_dump(mode="json"), "serving": {"batching": server.user_config}})


def test_raycluster_autoscales_between_bounds():
    config = load_config(TINY)
    cluster = build_raycluster(config, KubeRayOptions(name="dev", min_workers=1, max_workers=6))
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["enableInTreeAutoscaling"] is True
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 6)
    assert cluster["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] == 60
    default = build_raycluster(config)
    (group,) = default["spec"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, config.parallelism.num_workers)
    with pytest.raises(ValueError, match="min_workers=5 exceeds max_workers=2"):
        build_raycluster(config, KubeRayOptions(min_workers=5, max_workers=2))


def test_names_and_image_paths():
    assert resource_name("Tiny_Llama.Reverse", "RayJob") == "tiny-llama-reverse"
    assert resource_name("7up", "RayCluster") == "up"
    assert len(resource_name("a" * 80, "RayService")) == 47
    with pytest.raises(ValueError, match="cannot make a RayJob name"):
        resource_name("123", "RayJob")
    assert image_path(TINY, REPO) == IN_IMAGE
    with pytest.raises(ValueError, match="outside the repository"):
        image_path("/etc/hosts", REPO)
    with pytest.raises(ValueError, match="extra"):
        KubeRayOptions(imag="typo")


def test_checked_in_examples_are_fresh():
    rendered = render_examples()
    assert set(rendered) == {
        "rayjob.finetune-lora.yaml",
        "rayservice.llm.yaml",
        "raycluster.autoscaling.yaml",
    }
    on_disk = {p.name for p in MANIFEST_DIR.glob("*.yaml")}
    assert on_disk == set(rendered), f"unexpected files in {MANIFEST_DIR}: {on_disk ^ set(rendered)}"
    stale = [name for name, text in rendered.items() if (MANIFEST_DIR / name).read_text() != text]
    assert not stale, (
        f"kuberay/manifests/ is stale ({', '.join(stale)}): the configs or builders changed; regenerate "
        "with `llmopt kuberay examples` from the repository root and commit the result"
    )


def test_dockerfile_matches_the_manifests():
    text = (REPO / "kuberay" / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(RAY_VERSION)}$", text, re.M)
    assert "rayproject/ray:${RAY_VERSION}-py311-cpu" in text
    assert f"-t {DEFAULT_IMAGE} ." in text  # the documented tag is the manifests' default image
    assert re.search(r"^USER 1000:100$", text, re.M) and "WORKDIR /home/ray/app" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "outputs"} <= set(ignored)


def test_cli_render_writes_yaml(tmp_path):
    runner = CliRunner()
    out = tmp_path / "job.yaml"
    result = runner.invoke(
        kuberay_app,
        [
            "render",
            "rayjob",
            "--config",
            str(TINY),
            "training.max_steps=50",
            "--name",
            "smoke",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    (job,) = load_manifests(out)
    assert job["metadata"]["name"] == "smoke" and "training.max_steps=50" in job["spec"]["entrypoint"]
    assert "warning: no --runs-claim" in result.output  # worker checkpoints need shared storage
    result = runner.invoke(kuberay_app, ["render", "rayjob", "-c", str(TINY), "--runs-claim", "runs"])
    assert result.exit_code == 0 and "warning" not in result.output

    result = runner.invoke(kuberay_app, ["render", "rayservice", "--config", str(TINY), "--no-auth"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["kind"] == "RayService"

    result = runner.invoke(kuberay_app, ["render", "rayjob", "--config", str(TINY), "training.lr=-1"])
    assert result.exit_code == 2 and "training.lr" in result.output
    result = runner.invoke(kuberay_app, ["render", "rayjob"])
    assert result.exit_code == 2 and "needs --config" in result.output
    result = runner.invoke(kuberay_app, ["render", "deployment", "--config", str(TINY)])
    assert result.exit_code == 2 and "unknown kind" in result.output
    result = runner.invoke(kuberay_app, ["examples", "--check"])
    assert result.exit_code == 0 and "up to date" in result.output


def test_llmopt_kuberay_forwards_to_the_kuberay_cli(tmp_path):
    from llmopt.cli import app

    result = CliRunner().invoke(app, ["kuberay", "render", "raycluster", "--max-workers", "3"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 3
    result = CliRunner().invoke(app, ["kuberay", "--help"])
    assert result.exit_code == 0 and "render" in result.output and "apply" in result.output
    # The installed command finds kuberay through its entry point, from any directory.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    exe = Path(sys.executable).parent / "llmopt"
    done = subprocess.run(
        [str(exe), "kuberay", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "render" in done.stdout, done.stdout + done.stderr


def test_public_api_is_listed():
    import kuberay

    for name in kuberay.__all__:
        assert hasattr(kuberay, name), f"kuberay.__all__ lists missing {name}"


def test_rayservice_of_the_default_config_carries_the_app_builders_options():
    """The renderer and `serve_apps.llm:app` share `deployment_options`: no null batch_wait_timeout_s (which
    LLMServer.reconfigure cannot apply), the same queue bounds and the same GPU request."""
    from llmopt.deployment import INGRESS, SERVER, deployment_options

    for overrides in ([], ["resources.accelerator=gpu"], ["serving.autoscaling.max_replicas=3"]):
        config = load_config(None, overrides)
        service = build_rayservice(config, llm_application(None, overrides), KubeRayOptions(auth=False))
        (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        assert "config" not in application["args"]  # the pods load the default run config too
        deployments = {d["name"]: d for d in application["deployments"]}
        derived = deployment_options(config, kuberay=True)
        server = deployments[SERVER]
        assert server["user_config"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}
        for key, value in derived[SERVER].items():
            assert server[key] == value, key
        assert server["max_replicas_per_node"] == 1
        if config.serving.single_layout:  # one model on one replica: it serves HTTP itself, no ingress
            assert set(deployments) == {SERVER}
            continue
        ingress = deployments[INGRESS]
        assert ingress["ray_actor_options"] == {"num_cpus": 0}  # the head advertises no CPUs
        assert ingress["max_ongoing_requests"] == derived[INGRESS]["max_ongoing_requests"]
        gpus = config.resources.gpus
        (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == ("1" if gpus else None)


class _Bound:
    """Stands in for a deployment of `serve_apps.llm`: records the options the app builder gives it."""

    def __init__(self) -> None:
        self.options_given: dict | None = None

    def options(self, **options):
        self.options_given = options
        return self

    def bind(self, *args):
        return self


@pytest.mark.parametrize(
    "config_file",
    [None, *sorted((REPO / "jobs" / "configs").glob("*.yaml"))],
    ids=lambda p: "default" if p is None else p.stem,
)
def test_rendered_deployments_are_the_app_builders_deployment_options(config_file, monkeypatch):
    """One mapping from a run config to Serve options (`deployment_options`), two users: the RayService that
    `llmopt kuberay render rayservice` writes holds exactly its options (in the pod layout), and
    `serve_apps.llm:app`, built from the rendered args, binds exactly its options (in the local layout)."""
    import serve_apps.llm as llm
    from llmopt.deployment import INGRESS, SERVER, deployment_options

    source = [] if config_file is None else ["--config", str(config_file)]
    result = CliRunner().invoke(kuberay_app, ["render", "rayservice", *source])
    assert result.exit_code == 0, result.output
    (application,) = yaml.safe_load(yaml.safe_load(result.stdout)["spec"]["serveConfigV2"])["applications"]
    args = dict(application["args"])
    if config_file is None:
        assert "config" not in args
    else:
        assert args["config"] == image_path(config_file, REPO)
        args["config"] = str(config_file)  # the image's copy of it
    config = load_config(config_file, args.get("overrides", []))
    rendered = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application["deployments"]}
    assert rendered == deployment_options(config, kuberay=True)
    assert None not in rendered[SERVER]["user_config"].values()

    bound = {SERVER: _Bound(), INGRESS: _Bound()}
    monkeypatch.setattr(llm, "LLMServer", bound[SERVER])
    monkeypatch.setattr(llm, "LLMIngress", bound[INGRESS])
    llm.app(args)
    local = deployment_options(config)
    given = {}
    for cls, b in bound.items():  # with serving.layout=single the ingress class is bound named LLMServer
        if b.options_given is not None:
            options = dict(b.options_given)
            given[options.pop("name", cls)] = options
    assert given == local
    # The two layouts differ in placement only: one model replica per worker pod, an ingress without CPU.
    assert rendered[SERVER] == {**local[SERVER], "max_replicas_per_node": 1}
    if INGRESS in local:
        assert rendered[INGRESS] == {**local[INGRESS], "ray_actor_options": {"num_cpus": 0}}


def test_render_rayservice_takes_a_run_config_or_a_serve_config_not_both():
    result = CliRunner().invoke(
        kuberay_app,
        ["render", "rayservice", "--config", str(TINY), "--serve-config", "serve_apps/configs/llm.yaml"],
    )
    assert result.exit_code == 2 and "not both" in result.output


def test_rayservice_keeps_the_split_layout_where_the_serve_config_autoscales_the_model():
    """`serving.layout: auto` decides from the run config; bounds above one replica that only the Serve
    config's LLMServer entry states pin the split layout in the args, so the pods build what was rendered. A
    single-layout app refuses options for an ingress it does not deploy."""
    config = load_config(None)
    assert config.serving.single_layout

    def render(deployments, overrides=()):
        application = {"name": "llm", "import_path": "serve_apps.llm:app", "args": {}}
        application["deployments"] = deployments
        cfg = load_config(None, list(overrides))
        service = build_rayservice(cfg, application, KubeRayOptions(auth=False))
        (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        return app

    scaled = render([{"name": "LLMServer", "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}])
    assert scaled["args"]["overrides"] == ["serving.layout=split"]
    assert {d["name"] for d in scaled["deployments"]} == {"LLMServer", "LLMIngress"}
    alone = render([{"name": "LLMServer", "num_replicas": 1}])
    assert "overrides" not in alone["args"] and {d["name"] for d in alone["deployments"]} == {"LLMServer"}
    with pytest.raises(ValueError, match=r"LLMIngress, which serving\.layout=single does not deploy"):
        render([{"name": "LLMIngress", "num_replicas": 1}], ["serving.layout=single"])
