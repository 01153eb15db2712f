"""The RayService's Serve app deploys as rendered: `llmopt kuberay render rayservice`'s `serveConfigV2`,
deployed with `serve deploy` on a `ray start --head` cluster, answers completions over HTTP.

One case per config a user renders a RayService from: the default run config (no `--config`), each
shipped run config (`jobs/configs/*.yaml`) and the shipped Serve config behind
`kuberay/manifests/rayservice.llm.yaml`. Only what must differ between a pod and this machine is changed
before deploying (`_on_this_machine`); the deployments' options (`user_config`, replicas, actor resources)
go to Serve exactly as rendered, and the replica must report the rendered batch settings as the ones it
runs. Each case deletes its application with `serve shutdown`; the `head_node` fixture (conftest.py) kills
the cluster at the end.
"""

from __future__ import annotations

import copy
import secrets
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml

from kuberay import load_manifests
from kuberay._pods import APP_DIR
from llmopt.config import load_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
SHIPPED_RUN_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
SHIPPED_MANIFEST = REPO / "kuberay" / "manifests" / "rayservice.llm.yaml"
# What `llmopt kuberay examples` renders the shipped manifest from (kuberay/_render.py, render_examples).
MANIFEST_SOURCE = ["--serve-config", "serve_apps/configs/llm.yaml", "--name", "llm"]
BODY = {"prompt": "reverse: 123", "max_tokens": 4, "temperature": 0}

CASES = [
    pytest.param([], id="default-config"),
    *(pytest.param(["--config", str(path.relative_to(REPO))], id=path.stem) for path in SHIPPED_RUN_CONFIGS),
    pytest.param(MANIFEST_SOURCE, id="manifest-rayservice.llm"),
]


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def _render(source: list[str], out: Path) -> dict[str, Any]:
    """The RayService as a user renders it: the installed `llmopt` command, from the repository root."""
    done = _run(str(BIN / "llmopt"), "kuberay", "render", "rayservice", *source, "-o", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    (service,) = load_manifests(out)
    assert service["kind"] == "RayService"
    return service


def _api_keys_env(service: dict[str, Any]) -> str:
    """The variable the rendered pods hold the API keys in (from the Secret), the same on every pod."""
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    names = {
        env["name"] for t in templates for env in t["spec"]["containers"][0]["env"] if "valueFrom" in env
    }
    (name,) = names
    return name


def _on_this_machine(serve_config: dict[str, Any], *, port: int, keys_env: str, key: str) -> dict[str, Any]:
    """The rendered Serve config with only what must differ between a pod and this machine changed.

    1. `http_options`: a pod binds 0.0.0.0:8000 (behind the RayService's ClusterIP Service); here the proxy
       stays on loopback, on a free port.
    2. `args.config`: the image holds the repository at /home/ray/app (kuberay/Dockerfile); here it is REPO.
       The model itself is a preset each replica builds (or finds in its cache), so it needs no mapping.
    3. The API keys: the rendered pods get them from a Secret as an environment variable of every Ray
       container; here the application's runtime_env sets that variable for its replicas.
    """
    adapted = copy.deepcopy(serve_config)
    adapted["http_options"] = {"host": "127.0.0.1", "port": port}
    (application,) = adapted["applications"]
    args = application["args"]
    if "config" in args:  # the default run config names no file
        args["config"] = str(REPO / PurePosixPath(args["config"]).relative_to(APP_DIR))
    assert "runtime_env" not in application  # the image is the environment: nothing to merge with
    application["runtime_env"] = {"env_vars": {keys_env: key}}
    return adapted


def _serve(*args: str, head) -> subprocess.CompletedProcess:
    done = _run(str(BIN / "serve"), *args, "--address", head.dashboard, env=head.env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _wait_running(head, name: str, timeout: float = 600) -> dict[str, Any]:
    """`serve status` of application `name` once RUNNING; fails at once on a failed deployment."""
    deadline, status = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        applications = yaml.safe_load(_serve("status", head=head).stdout) or {}
        status = (applications.get("applications") or {}).get(name, {})
        assert status.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), status
        if status.get("status") == "RUNNING":
            return status
        time.sleep(2)
    pytest.fail(f"application {name!r} not RUNNING within {timeout} s: {status}")


@pytest.mark.parametrize("source", CASES)
def test_rendered_rayservice_deploys_and_answers(source, head_node, free_port, tmp_path):
    service = _render(source, tmp_path / "rayservice.yaml")
    rendered = yaml.safe_load(service["spec"]["serveConfigV2"])
    if source == MANIFEST_SOURCE:  # the shipped manifest is this render (test_checked_in_examples_are_fresh)
        (shipped,) = load_manifests(SHIPPED_MANIFEST)
        assert yaml.safe_load(shipped["spec"]["serveConfigV2"]) == rendered
    (application,) = rendered["applications"]
    server = next(d for d in application["deployments"] if d["name"] == "LLMServer")
    # The run config the pods build the application from, read here from the same file and overrides.
    args = application["args"]
    config_file = REPO / PurePosixPath(args["config"]).relative_to(APP_DIR) if "config" in args else None
    run_config = load_config(config_file, args.get("overrides", []))
    model = run_config.model.name_or_path

    port, key = free_port(), secrets.token_hex(16)
    adapted = _on_this_machine(rendered, port=port, keys_env=_api_keys_env(service), key=key)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(adapted, sort_keys=False))
    try:
        _serve("deploy", str(path), head=head_node)
        status = _wait_running(head_node, application["name"])
        # One model on one replica serves HTTP from its own replica (serving.layout: auto -> single).
        expected = {"LLMServer"} if run_config.serving.single_layout else {"LLMServer", "LLMIngress"}
        assert set(status["deployments"]) == expected, status

        # The deployments run with the rendered options: Serve's view, and the replica's own batch settings
        # (a null in user_config would surface here as the mode's default instead of the rendered value).
        deployed = _serve("config", head=head_node).stdout
        (running,) = [a for a in yaml.safe_load_all(deployed) if a and a["name"] == application["name"]]
        assert running["deployments"] == application["deployments"]
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {key}"}
        stats = httpx.get(f"{url}/api/v1/stats", headers=auth, timeout=60)
        assert stats.status_code == 200, stats.text
        engine = stats.json()["engine"]
        assert {k: engine[k] for k in server["user_config"]} == server["user_config"]

        # Auth is on, as rendered: no key, no completion.
        refused = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60)
        assert refused.status_code == 401, refused.text
        response = httpx.post(f"{url}/v1/completions", json=BODY, headers=auth, timeout=120)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion" and body["model"] == model
        (choice,) = body["choices"]
        assert isinstance(choice["text"], str)
        assert 1 <= body["usage"]["completion_tokens"] <= BODY["max_tokens"]
    finally:
        # Serve and every application go, so the next case deploys on a clean cluster.
        _run(str(BIN / "serve"), "shutdown", "-y", "--address", head_node.dashboard, env=head_node.env)
