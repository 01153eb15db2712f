"""The KubeRay client against a tiny fake API server on 127.0.0.1: real requests, surfaced errors.

The `kubernetes` package builds and sends the requests; the server answers with recorded responses
(a 422 Invalid and a 404 body as the API server writes them). Status and wait logic run on recorded
RayJob / RayService / RayCluster status objects (field names from the CRDs' status schemas).
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client as k8s

from kuberay import KubeRayClient, KubeRayError, api_error, kind_of, phase
from kuberay._client import MERGE_PATCH

BASE = "/apis/ray.io/v1/namespaces/default"
JOB = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "finetune-lora"},
    "spec": {"entrypoint": "python -m jobs.finetune"},
}
INVALID = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": 'RayJob.ray.io "finetune-lora" is invalid: spec.backoffLimit: Invalid value: "string": '
    'spec.backoffLimit in body must be of type integer: "string"',
    "reason": "Invalid",
    "details": {
        "name": "finetune-lora",
        "group": "ray.io",
        "kind": "RayJob",
        "causes": [
            {
                "reason": "FieldValueTypeInvalid",
                "message": 'Invalid value: "string": spec.backoffLimit in body must be of type integer: '
                '"string"',
                "field": "spec.backoffLimit",
            },
            {
                "reason": "FieldValueInvalid",
                "message": "Invalid value: 2: must be less than or equal to 1",
                "field": "spec.rayClusterSpec.workerGroupSpecs[0].minReplicas",
            },
        ],
    },
    "code": 422,
}
NOT_FOUND = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": 'rayservices.ray.io "llm" not found',
    "reason": "NotFound",
    "details": {"name": "llm", "group": "ray.io", "kind": "rayservices"},
    "code": 404,
}
EXISTS = {
    **NOT_FOUND,
    "message": 'rayjobs.ray.io "finetune-lora" already exists',
    "reason": "AlreadyExists",
    "code": 409,
}


class FakeAPIServer:
    """Answers (method, path) with queued (status, body) pairs and records every request."""

    def __init__(self):
        self.routes: dict[tuple[str, str], list[tuple[int, dict | str]]] = {}
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fake.requests.append(
                    {
                        "method": self.command,
                        "path": url.path,
                        "query": parse_qs(url.query),
                        "content_type": self.headers.get("Content-Type"),
                        "body": json.loads(body) if body else None,
                    }
                )
                queue = fake.routes.get((self.command, url.path)) or [(500, "no recorded response")]
                status, payload = queue.pop(0) if len(queue) > 1 else queue[0]
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header(
                    "Content-Type", "application/json" if isinstance(payload, dict) else "text/plain"
                )
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def on(self, method: str, path: str, *responses: tuple[int, dict | str]) -> None:
        self.routes[(method, path)] = list(responses)


@pytest.fixture
def server():
    fake = FakeAPIServer()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.httpd.shutdown()
        fake.httpd.server_close()
        fake.thread.join(timeout=5)


@pytest.fixture
def kube(server):
    configuration = k8s.Configuration(host=server.url)
    configuration.retries = 0
    return KubeRayClient(k8s.ApiClient(configuration))


def test_apply_creates_with_strict_field_validation(server, kube):
    server.on("POST", f"{BASE}/rayjobs", (201, {**JOB, "metadata": {"name": "finetune-lora", "uid": "1"}}))
    action, created = kube.apply(JOB)
    assert action == "created" and created["metadata"]["uid"] == "1"
    (request,) = server.requests
    assert request["body"] == JOB
    assert request["query"] == {"fieldManager": ["llmopt"], "fieldValidation": ["Strict"]}


def test_apply_patches_an_existing_resource_with_a_merge_patch(server, kube):
    server.on("POST", f"{BASE}/rayjobs", (409, EXISTS))
    server.on("PATCH", f"{BASE}/rayjobs/finetune-lora", (200, JOB))
    action, _ = kube.apply(JOB, dry_run=True)
    assert action == "configured"
    create, patch = server.requests
    assert create["query"]["dryRun"] == ["All"] and patch["query"]["dryRun"] == ["All"]
    assert patch["content_type"] == MERGE_PATCH and patch["body"] == JOB
    assert patch["query"]["fieldValidation"] == ["Strict"]


def test_invalid_is_surfaced_with_the_servers_message_and_causes(server, kube):
    server.on("POST", f"{BASE}/rayjobs", (422, INVALID))
    with pytest.raises(KubeRayError) as info:
        kube.apply(JOB)
    error = info.value
    assert error.status == 422 and error.reason == "Invalid"
    text = str(error)
    assert text.startswith(
        "create RayJob default/finetune-lora failed: HTTP 422 Unprocessable Entity (Invalid): "
    )
    assert 'spec.backoffLimit in body must be of type integer: "string"' in text
    # The cause the message leaves out is listed; the one it repeats is not.
    assert "  - spec.rayClusterSpec.workerGroupSpecs[0].minReplicas: Invalid value: 2" in text
    assert text.count("spec.backoffLimit:") == 1
    assert len(server.requests) == 1  # no patch after a 422


def test_not_found_and_non_json_errors(server, kube):
    server.on("GET", f"{BASE}/rayservices/llm", (404, NOT_FOUND))
    with pytest.raises(KubeRayError) as info:
        kube.get("rayservice", "llm")
    assert info.value.status == 404
    assert str(info.value) == (
        'get RayService default/llm failed: HTTP 404 Not Found (NotFound): rayservices.ray.io "llm" not found'
    )
    server.on("DELETE", f"{BASE}/rayclusters/dev", (500, "etcdserver: request timed out"))
    with pytest.raises(KubeRayError, match="HTTP 500 Internal Server Error: etcdserver: request timed out"):
        kube.delete("raycluster", "dev")


def test_delete_and_list(server, kube):
    server.on("DELETE", f"{BASE}/rayservices/llm", (200, {"kind": "Status", "status": "Success"}))
    kube.delete("RayService", "llm")
    assert server.requests[-1]["query"] == {"propagationPolicy": ["Foreground"]}
    server.on("GET", f"{BASE}/rayjobs", (200, {"items": [JOB], "metadata": {}}))
    assert kube.list("rayjobs", label_selector="app.kubernetes.io/name=llmopt") == [JOB]
    assert server.requests[-1]["query"] == {"labelSelector": ["app.kubernetes.io/name=llmopt"]}


def test_an_unreachable_api_server_is_an_error():
    configuration = k8s.Configuration(host="http://127.0.0.1:1")  # nothing listens on port 1
    configuration.retries = 0
    kube = KubeRayClient(k8s.ApiClient(configuration))
    with pytest.raises(
        KubeRayError, match=r"get RayJob default/x failed: cannot reach the API server at http://127.0.0.1:1"
    ):
        kube.get("rayjob", "x")


def test_apply_refuses_other_kinds_and_versions(kube):
    with pytest.raises(ValueError, match="unknown kind 'Deployment'"):
        kube.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}})
    with pytest.raises(KubeRayError, match=r"apiVersion 'ray\.io/v1alpha1' is not ray\.io/v1"):
        kube.apply({**JOB, "apiVersion": "ray.io/v1alpha1"})
    assert kind_of("rayservices") == "RayService"


# --- status and wait on recorded status objects ---------------------------------------------------

RAYJOB_RUNNING = {"kind": "RayJob", "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}
RAYJOB_SUCCEEDED = {
    "kind": "RayJob",
    "status": {
        "jobDeploymentStatus": "Complete",
        "jobStatus": "SUCCEEDED",
        "rayClusterName": "finetune-lora-x7k2p",
        "succeeded": 1,
        "failed": 0,
    },
}
RAYJOB_FAILED = {
    "kind": "RayJob",
    "status": {
        "jobDeploymentStatus": "Failed",
        "jobStatus": "RUNNING",
        "reason": "DeadlineExceeded",
        "message": "The RayJob has passed the activeDeadlineSeconds. StartTime: ...",
        "failed": 1,
    },
}
RAYSERVICE_STARTING = {
    "kind": "RayService",
    "status": {
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "Initializing", "message": "waiting for serve"},
            {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster"},
        ],
        "numServeEndpoints": 0,
    },
}
RAYSERVICE_READY = {
    "kind": "RayService",
    "status": {
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"},
            {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster"},
        ],
        "numServeEndpoints": 2,
        "serviceStatus": "Running",
        "activeServiceStatus": {"applicationStatuses": {"llm": {"status": "RUNNING"}}},
    },
}


def test_phases_of_recorded_statuses():
    assert phase(RAYJOB_RUNNING) == phase(RAYJOB_RUNNING)
    running = phase(RAYJOB_RUNNING)
    assert (running.done, running.ok, running.summary) == (False, False, "deployment Running, job RUNNING")
    done = phase(RAYJOB_SUCCEEDED)
    assert done.done and done.ok
    failed = phase(RAYJOB_FAILED)
    assert failed.done and not failed.ok
    assert "DeadlineExceeded: The RayJob has passed the activeDeadlineSeconds" in failed.summary
    stopped = phase({"kind": "RayJob", "status": {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}})
    assert stopped.done and not stopped.ok
    assert not phase({"kind": "RayJob"}).done  # a fresh RayJob has no status yet

    starting = phase(RAYSERVICE_STARTING)
    assert not starting.done and "Ready=False (Initializing: waiting for serve)" in starting.summary
    ready = phase(RAYSERVICE_READY)
    assert ready.done and ready.ok
    assert ready.summary == "Ready=True (NonZeroServeEndpoints), 2 serve endpoint(s), app llm RUNNING"
    legacy = phase({"kind": "RayService", "status": {"serviceStatus": "Running"}})
    assert legacy.done and legacy.ok

    cluster = phase(
        {
            "kind": "RayCluster",
            "status": {
                "state": "ready",
                "readyWorkerReplicas": 2,
                "conditions": [{"type": "HeadPodReady", "status": "True"}],
            },
        }
    )
    assert cluster.done and cluster.ok and cluster.summary == "state ready, 2 worker(s) ready"
    with pytest.raises(ValueError, match="kind 'Pod'"):
        phase({"kind": "Pod"})


def _clock():
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    return (lambda: now[0]), sleep


def test_wait_for_a_rayjob_until_it_finishes(server, kube):
    path = f"{BASE}/rayjobs/finetune-lora"
    server.on("GET", path, (200, RAYJOB_RUNNING), (200, RAYJOB_RUNNING), (200, RAYJOB_SUCCEEDED))
    seen = []
    clock, sleep = _clock()
    final = kube.wait("rayjob", "finetune-lora", poll_s=5, on_change=seen.append, sleep=sleep, clock=clock)
    assert final.ok and clock() == 10.0
    assert [p.summary for p in seen] == [
        "deployment Running, job RUNNING",
        "deployment Complete, job SUCCEEDED",
    ]

    server.on("GET", path, (200, RAYJOB_FAILED))
    final = kube.wait("rayjob", "finetune-lora", sleep=sleep, clock=clock)
    assert final.done and not final.ok


def test_wait_for_a_rayservice_times_out_with_the_last_status(server, kube):
    server.on("GET", f"{BASE}/rayservices/llm", (200, RAYSERVICE_STARTING))
    clock, sleep = _clock()
    with pytest.raises(
        KubeRayError, match=r"RayService default/llm not done after 30 s: Ready=False"
    ) as info:
        kube.wait("rayservice", "llm", timeout_s=30, poll_s=10, sleep=sleep, clock=clock)
    assert info.value.status == 408
    server.on("GET", f"{BASE}/rayservices/llm", (200, RAYSERVICE_STARTING), (200, RAYSERVICE_READY))
    assert kube.wait("rayservice", "llm", sleep=sleep, clock=clock).ok


def test_api_error_without_a_body():
    class Bare(Exception):
        status, reason, body = 403, "Forbidden", None

    assert str(api_error(Bare(), "list rayjobs in prod")) == "list rayjobs in prod failed: HTTP 403 Forbidden"


def test_cli_apply_status_wait_delete(server, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import kuberay.cli as cli

    configuration = k8s.Configuration(host=server.url)
    configuration.retries = 0
    monkeypatch.setattr(cli, "_client", lambda context: KubeRayClient(k8s.ApiClient(configuration)))
    manifest = tmp_path / "job.yaml"
    manifest.write_text(json.dumps(JOB))
    runner = CliRunner()

    server.on("POST", f"{BASE}/rayjobs", (422, INVALID))
    result = runner.invoke(cli.app, ["apply", str(manifest)])
    assert result.exit_code == 1 and "HTTP 422" in result.output and "minReplicas" in result.output

    server.on("POST", f"{BASE}/rayjobs", (201, JOB))
    result = runner.invoke(cli.app, ["apply", str(manifest), "--dry-run"])
    assert result.exit_code == 0 and "RayJob default/finetune-lora created (server dry run)" in result.output

    server.on("GET", f"{BASE}/rayjobs/finetune-lora", (200, {**JOB, **RAYJOB_FAILED}))
    result = runner.invoke(cli.app, ["status", "rayjob", "finetune-lora"])
    assert result.exit_code == 1 and "deployment Failed" in result.output
    result = runner.invoke(cli.app, ["wait", "rayjob", "finetune-lora", "--poll", "0.01"])
    assert result.exit_code == 1 and "DeadlineExceeded" in result.output

    server.on("GET", f"{BASE}/rayjobs/finetune-lora", (200, {**JOB, **RAYJOB_SUCCEEDED}))
    result = runner.invoke(cli.app, ["status", "rayjob", "finetune-lora", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["jobStatus"] == "SUCCEEDED"

    server.on("DELETE", f"{BASE}/rayjobs/finetune-lora", (404, {**NOT_FOUND, "message": "gone"}))
    result = runner.invoke(cli.app, ["delete", "rayjob", "finetune-lora"])
    assert result.exit_code == 1 and "HTTP 404" in result.output and "gone" in result.output
