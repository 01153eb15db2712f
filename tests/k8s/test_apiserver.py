"""Our client and CLI against a real kube-apiserver (1.20.2, etcd on loopback) serving the KubeRay CRDs.

Each rendered example is dry-run, created, re-applied, merge-patched, listed, read and deleted through
`llmopt kuberay` / `KubeRayClient`; broken objects are rejected by the server and the server's message
reaches the user. No operator runs here, so objects get no status of their own: status handling runs on
recorded statuses written through the status subresource, as the operator writes them. The CEL rules
are not loaded into 1.20 (see `crd_for_1_20`); the offline tier (`tests/unit/test_kuberay_crds.py`)
evaluates them.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from _local_cluster import read_yaml, schema_children
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from kuberay import API_KEYS_SECRET_KEY, MANIFEST_DIR, KubeRayError, default_crd_dir, validate_manifest
from kuberay._client import GROUP, MERGE_PATCH, PLURALS, VERSION
from kuberay._crd import CRD_FILES
from kuberay._render import load_manifests

if os.environ.get("LLMOPT_K8S") != "1":
    reason = "real API-server tier: run `make test-k8s` (or LLMOPT_K8S=1 pytest tests/k8s)"
    pytest.skip(reason, allow_module_level=True)
pytestmark = pytest.mark.k8s

EXAMPLES = sorted(MANIFEST_DIR.glob("*.yaml"))
MANAGED = "app.kubernetes.io/managed-by=llmopt"
CRD_NAMES = {f"{plural}.{GROUP}" for plural in PLURALS.values()}
CRD_DIR = default_crd_dir()


def _example(kind: str) -> dict[str, Any]:
    for path in EXAMPLES:
        (obj,) = load_manifests(path)
        if obj["kind"] == kind:
            return obj
    raise LookupError(kind)


def _write(tmp_path: Path, obj: dict[str, Any]) -> Path:
    path = tmp_path / f"{obj['kind'].lower()}.{obj['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


def _flat(text: str) -> str:
    """Rich wraps long lines on the terminal's width: compare texts with whitespace collapsed."""
    return " ".join(text.split())


def _differences(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Where the stored object lacks or changed what was sent (server defaults may add fields)."""
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return [f"{path}: sent an object, stored {stored!r}"]
        out = []
        for key, value in sent.items():
            if key not in stored:
                out.append(f"{path}.{key}: dropped by the server (pruned: not in the CRD schema)")
            else:
                out += _differences(value, stored[key], f"{path}.{key}")
        return out
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) != len(sent):
            return [f"{path}: sent {len(sent)} item(s), stored {stored!r:.200}"]
        pairs = enumerate(zip(sent, stored, strict=True))
        return [d for i, (a, b) in pairs for d in _differences(a, b, f"{path}[{i}]")]
    return [] if sent == stored else [f"{path}: sent {sent!r}, stored {stored!r}"]


def _secret_names(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        found = {obj["secretKeyRef"]["name"]} if isinstance(obj.get("secretKeyRef"), dict) else set()
        return found.union(*(_secret_names(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_secret_names(v) for v in obj))
    return set()


def _cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def _crd_file(crd: dict[str, Any]) -> str:
    return CRD_FILES[crd["spec"]["names"]["kind"]]


def _gone(kube, kind: str, name: str, namespace: str) -> bool:
    try:
        kube.get(kind, name, namespace)
    except KubeRayError as exc:
        assert exc.status == 404, exc
        return True
    return False


def _ensure_secret(api_client, name: str, namespace: str) -> None:
    """The API keys Secret, as the README's `kubectl create secret generic` makes it."""
    core = k8s.CoreV1Api(api_client)
    body = k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name=name), string_data={API_KEYS_SECRET_KEY: "test-key-1,test-key-2"}
    )
    try:
        core.create_namespaced_secret(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
    stored = core.read_namespaced_secret(name, namespace)
    assert set(stored.data) == {API_KEYS_SECRET_KEY}


def test_the_server_serves_the_crds(cluster):
    version = k8s.VersionApi(cluster.api_client).get_code()
    assert (version.major, version.minor) == ("1", "20"), version.git_version
    ext = k8s.ApiextensionsV1Api(cluster.api_client)
    crds = json.loads(ext.list_custom_resource_definition(_preload_content=False).data)["items"]
    served = {
        crd["metadata"]["name"]: sorted(v["name"] for v in crd["spec"]["versions"] if v["served"])
        for crd in crds
    }
    assert served == {name: ["v1", "v1alpha1"] for name in CRD_NAMES}
    for crd in crds:
        (storage,) = (v for v in crd["spec"]["versions"] if v["storage"])
        assert storage["name"] == "v1" and storage["subresources"] == {"status": {}}
    # Only the CEL rules were taken out (1.20 does not know them; the offline tier evaluates them).
    for name, counts in cluster.crd_changes.items():
        assert set(counts) == {"CEL rules dropped (x-kubernetes-validations)"}, name
    # Every default is served, the empty-string ones included (the build's kube-openapi#230 fix).
    for crd in crds:
        stored, sent = _defaults(crd), _defaults(read_yaml(CRD_DIR / _crd_file(crd)))
        assert stored == sent and stored['""'] > 100, crd["metadata"]["name"]


def _defaults(crd: dict[str, Any]) -> Counter:
    """The values of every `default` in a CRD's schemas, counted."""
    found: Counter = Counter()

    def walk(schema: dict[str, Any]) -> None:
        if "default" in schema:
            found[json.dumps(schema["default"], sort_keys=True)] += 1
        for sub in schema_children(schema):
            walk(sub)

    for version in crd["spec"]["versions"]:
        walk(version["schema"]["openAPIV3Schema"])
    return found


def test_empty_strings_are_values_not_null(kube):
    """Under Go >= 1.16 an unpatched 1.20 rejects "" as null (kubernetes/kubernetes#99804)."""
    obj = copy.deepcopy(_example("RayJob"))
    container = obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container.setdefault("env", []).append({"name": "LLMOPT_EMPTY", "value": ""})
    _, dry = kube.apply(obj, dry_run=True)
    stored = dry["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "LLMOPT_EMPTY", "value": ""} in stored


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_dry_run_create_patch_list_delete(path, cluster, kube, llmopt, tmp_path):
    (obj,) = load_manifests(path)
    kind, name = obj["kind"], obj["metadata"]["name"]
    namespace = obj["metadata"].get("namespace", "default")
    for secret in _secret_names(obj):
        _ensure_secret(cluster.api_client, secret, namespace)

    # Server-side dry run: validated and defaulted, nothing stored.
    result = llmopt("apply", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"{kind} {namespace}/{name} created (server dry run)" in result.stdout
    assert _gone(kube, kind, name, namespace)
    _, dry = kube.apply(obj, dry_run=True)
    assert _gone(kube, kind, name, namespace)

    result = llmopt("apply", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{kind} {namespace}/{name} created" in result.stdout
    stored = kube.get(kind, name, namespace)
    # Every field we send is one the CRD knows (1.20 would prune an unknown one silently) and kept as sent.
    assert _differences(obj, stored) == []
    assert stored["spec"] == dry["spec"]  # the dry run defaulted exactly as the create did
    assert stored["metadata"]["generation"] == 1 and "status" not in stored  # no operator here
    version = stored["metadata"]["resourceVersion"]

    # Applying it again merge-patches (the create answers 409) and changes nothing.
    result = llmopt("apply", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{kind} {namespace}/{name} configured" in result.stdout
    assert kube.get(kind, name, namespace)["metadata"]["generation"] == 1

    # A changed manifest (more worker replicas) is merge-patched in place.
    changed = copy.deepcopy(obj)
    group = _cluster_spec(changed)["workerGroupSpecs"][0]
    group["maxReplicas"] += 1
    group["replicas"] = group["maxReplicas"]
    result = llmopt("apply", str(_write(tmp_path, changed)))
    assert result.returncode == 0, result.stderr
    assert f"{kind} {namespace}/{name} configured" in result.stdout
    patched = kube.get(kind, name, namespace)
    patched_group = _cluster_spec(patched)["workerGroupSpecs"][0]
    assert patched_group["replicas"] == patched_group["maxReplicas"] == group["maxReplicas"]
    assert patched["metadata"]["generation"] == 2 and patched["metadata"]["resourceVersion"] != version
    assert _differences(changed, patched) == []

    listed = [o["metadata"]["name"] for o in kube.list(kind, namespace, label_selector=MANAGED)]
    assert listed == [name]
    assert kube.list(kind, namespace, label_selector="app.kubernetes.io/managed-by=someone-else") == []

    result = llmopt("status", kind.lower(), name)  # a fresh object: no status yet, not done, exit 0
    assert result.returncode == 0, result.stderr
    assert f"{kind} {namespace}/{name}: " in result.stdout

    # `delete` asks for foreground deletion: the object is marked, and the garbage collector (in
    # kube-controller-manager, absent here) removes it once KubeRay's children are gone.
    result = llmopt("delete", kind.lower(), name)
    assert result.returncode == 0, result.stderr
    assert f"{kind} {namespace}/{name} deleted" in result.stdout
    marked = kube.get(kind, name, namespace)
    assert marked["metadata"]["deletionTimestamp"]
    assert marked["metadata"]["finalizers"] == ["foregroundDeletion"]
    kube.api.patch_namespaced_custom_object(  # what the garbage collector does when nothing depends on it
        GROUP, VERSION, namespace, PLURALS[kind], name, {"metadata": {"finalizers": None}},
        _content_type=MERGE_PATCH,
    )  # fmt: skip
    assert _gone(kube, kind, name, namespace)
    result = llmopt("delete", kind.lower(), name)
    assert result.returncode == 1 and "HTTP 404" in _flat(result.stderr) and "not found" in result.stderr


# --- status handling on recorded statuses ------------------------------------------------------------

T0 = "2026-01-01T00:00:00Z"


def _condition(kind: str, status: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": T0}


RECORDED = {
    "RayJob": [
        # (status as the operator writes it, exit code of `status`, `wait` done?, text in the summary)
        (
            {"jobDeploymentStatus": "Initializing", "startTime": T0},
            0, False, "deployment Initializing, job -",
        ),
        (
            {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "rec-x7k2p"},
            0, False, "deployment Running, job RUNNING",
        ),
        (
            {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "succeeded": 1, "endTime": T0},
            0, True, "deployment Complete, job SUCCEEDED",
        ),
        (
            {
                "jobDeploymentStatus": "Failed", "jobStatus": "RUNNING", "failed": 1,
                "reason": "DeadlineExceeded", "message": "The RayJob has passed the activeDeadlineSeconds.",
            },
            1, True, "deployment Failed, job RUNNING (DeadlineExceeded: The RayJob has passed",
        ),
    ],
    "RayService": [
        (
            {
                "conditions": [
                    _condition("Ready", "False", "Initializing", "waiting for serve"),
                    _condition("UpgradeInProgress", "False", "NoPendingCluster"),
                ],
                "numServeEndpoints": 0,
            },
            0, False, "Ready=False (Initializing: waiting for serve), 0 serve endpoint(s)",
        ),
        (
            {
                "conditions": [
                    _condition("Ready", "True", "NonZeroServeEndpoints"),
                    _condition("UpgradeInProgress", "False", "NoPendingCluster"),
                ],
                "numServeEndpoints": 2,
                "serviceStatus": "Running",
                "activeServiceStatus": {"applicationStatuses": {"llm": {"status": "RUNNING"}}},
            },
            0, True, "Ready=True (NonZeroServeEndpoints), 2 serve endpoint(s), app llm RUNNING",
        ),
    ],
    "RayCluster": [
        (
            {
                "conditions": [_condition("HeadPodReady", "False", "ContainersNotReady", "pulling image")],
                "readyWorkerReplicas": 0,
            },
            0, False, "state -, 0 worker(s) ready (ContainersNotReady: pulling image)",
        ),
        (
            {
                "state": "ready",
                "readyWorkerReplicas": 2,
                "conditions": [_condition("HeadPodReady", "True", "HeadPodRunningAndReady")],
            },
            0, True, "state ready, 2 worker(s) ready",
        ),
    ],
}  # fmt: skip


@pytest.mark.parametrize("kind", list(RECORDED))
def test_status_and_wait_on_recorded_statuses(kind, kube, llmopt):
    obj = copy.deepcopy(_example(kind))
    name, namespace = f"rec-{kind.lower()}", "default"
    obj["metadata"]["name"] = name
    kube.apply(obj)
    try:
        for status, code, done, summary in RECORDED[kind]:
            # The operator's write: a merge patch of the status subresource (validated by the status schema).
            kube.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURALS[kind], name, {"status": status}, _content_type=MERGE_PATCH
            )
            result = llmopt("status", kind.lower(), name)
            assert result.returncode == code, result.stdout + result.stderr
            assert summary in _flat(result.stdout)
            result = llmopt("status", kind.lower(), name, "--json")
            for key, value in status.items():
                assert json.loads(result.stdout)[key] == value
            result = llmopt("wait", kind.lower(), name, "--timeout", "0.5", "--poll", "0.1")
            if done:
                assert result.returncode == code and summary in _flat(result.stdout)
            else:
                assert result.returncode == 1 and "not done after 0.5 s" in _flat(result.stderr)
        # A spec change (apply = merge patch of the main resource) leaves the status alone, and a status
        # write never bumps the generation.
        stored = kube.get(kind, name, namespace)
        obj["metadata"]["labels"]["llmopt.io/note"] = "relabelled"
        kube.apply(obj)
        after = kube.get(kind, name, namespace)
        assert after["status"] == stored["status"] and after["metadata"]["generation"] == 1
    finally:
        kube.delete(kind, name, namespace, propagation="Background")  # no garbage collector needed
    assert _gone(kube, kind, name, namespace)


def test_status_schema_rejects_a_wrong_type(kube):
    obj = copy.deepcopy(_example("RayJob"))
    obj["metadata"]["name"] = "rec-wrong-status"
    kube.apply(obj)
    try:
        with pytest.raises(ApiException) as info:
            kube.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, "default", "rayjobs", "rec-wrong-status", {"status": {"succeeded": "one"}},
                _content_type=MERGE_PATCH,
            )  # fmt: skip
        assert info.value.status == 422
        assert "status.succeeded in body must be of type integer" in info.value.body
    finally:
        kube.delete("RayJob", "rec-wrong-status", propagation="Background")


# --- what the server rejects, and that the user sees why -----------------------------------------------


def _wrong_type(obj):
    obj["spec"]["backoffLimit"] = "three"


def _unsupported_value(obj):
    obj["spec"]["autoscalerOptions"]["upscalingMode"] = "Sideways"


def _missing_required(obj):
    del obj["spec"]["rayClusterConfig"]


def _missing_required_container_name(obj):
    del _cluster_spec(obj)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["name"]


BROKEN = [
    # (kind, change, text the server's message must contain)
    (
        "RayJob",
        _wrong_type,
        'spec.backoffLimit: Invalid value: "string": spec.backoffLimit in body must be of type integer',
    ),
    (
        "RayCluster",
        _unsupported_value,
        'spec.autoscalerOptions.upscalingMode: Unsupported value: "Sideways": '
        'supported values: "Default", "Aggressive", "Conservative"',
    ),
    ("RayService", _missing_required, "spec.rayClusterConfig: Required value"),
    (
        "RayJob",
        _missing_required_container_name,
        "spec.rayClusterSpec.workerGroupSpecs.template.spec.containers.name: Required value",
    ),
]


@pytest.mark.parametrize(("kind", "change", "expected"), BROKEN, ids=[c.__name__[1:] for _, c, _ in BROKEN])
def test_the_server_rejects_broken_objects_and_we_say_why(kind, change, expected, kube, llmopt, tmp_path):
    obj = copy.deepcopy(_example(kind))
    obj["metadata"]["name"] = "broken"
    change(obj)
    # What the server says, asked without our client in between.
    with pytest.raises(ApiException) as raw:
        kube.api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURALS[kind], obj)
    server_message = json.loads(raw.value.body)["message"]
    assert raw.value.status == 422 and expected in server_message

    for dry_run in (True, False):
        with pytest.raises(KubeRayError) as info:
            kube.apply(obj, dry_run=dry_run)
        assert info.value.status == 422 and info.value.reason == "Invalid"
        assert f"create {kind} default/broken failed: HTTP 422" in str(info.value)
        assert server_message in str(info.value)

    result = llmopt("apply", str(_write(tmp_path, obj)))
    assert result.returncode == 1
    assert "HTTP 422" in result.stderr and _flat(server_message) in _flat(result.stderr)
    assert result.stdout == ""
    assert _gone(kube, kind, "broken", "default")  # nothing stored, not even half


def test_unknown_fields_are_pruned_by_1_20_and_caught_offline(kube):
    """1.20 ignores fieldValidation=Strict (1.25+) and prunes; `llmopt kuberay validate` reports them."""
    obj = copy.deepcopy(_example("RayJob"))
    obj["metadata"]["name"] = "unknown-field"
    obj["spec"]["entrypointTypo"] = "python -m jobs.finetune"
    report = validate_manifest(obj)
    assert not report.ok and any("entrypointTypo" in e for e in report.errors)
    try:
        _, created = kube.apply(obj)
        assert "entrypointTypo" not in created["spec"]
        assert _differences(obj, created) == [
            ".spec.entrypointTypo: dropped by the server (pruned: not in the CRD schema)"
        ]
    finally:
        kube.delete("RayJob", "unknown-field", propagation="Background")


NAME_REGEX = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"  # in the server's message for a name it refuses


def _bad_name(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    obj = copy.deepcopy(_example("RayCluster"))
    obj["metadata"]["name"] = "Bad_Name"
    return obj, _write(tmp_path, obj)


def test_a_refused_name_is_reported_verbatim_by_the_client(kube, tmp_path):
    obj, _ = _bad_name(tmp_path)
    with pytest.raises(KubeRayError) as info:
        kube.apply(obj)
    assert info.value.status == 422 and 'metadata.name: Invalid value: "Bad_Name"' in str(info.value)
    assert NAME_REGEX in str(info.value)


def test_the_cli_prints_server_messages_verbatim(llmopt, tmp_path):
    _, path = _bad_name(tmp_path)
    result = llmopt("apply", str(path))
    assert result.returncode == 1 and 'metadata.name: Invalid value: "Bad_Name"' in result.stderr
    assert NAME_REGEX in result.stderr
