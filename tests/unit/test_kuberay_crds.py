"""Validation tier: every generated manifest against the KubeRay CRDs in ../shared/kuberay-crds.

Schema defaults are applied first (as the API server does), unknown fields are rejected (strict
field validation), list-map keys are unique, and the CRDs' CEL rules that look only at the new object
are evaluated with cel-python; broken manifests must fail each of these. Skipped, saying why, when the
CRD folder is absent.
"""

import copy

import pytest
import yaml
from typer.testing import CliRunner

from kuberay import (
    MANIFEST_DIR,
    default_crd_dir,
    load_crd,
    load_manifests,
    render_examples,
    validate_manifest,
)
from kuberay._crd import CRD_FILES, Report, _cel_errors, apply_defaults, classify_rule

CRDS = default_crd_dir()
pytestmark = pytest.mark.skipif(
    not all((CRDS / name).is_file() for name in CRD_FILES.values()),
    reason=f"KubeRay CRDs not found in {CRDS} (../shared/kuberay-crds beside the repository): "
    "the CRD validation tier is skipped",
)
pytest.importorskip("celpy", reason="cel-python (the dev extra) evaluates the CRDs' CEL rules")


def _examples():
    return {name: yaml.safe_load(text) for name, text in render_examples().items()}


@pytest.fixture(scope="module")
def examples():
    return _examples()


@pytest.mark.parametrize("name", sorted(render_examples()))
def test_generated_manifests_are_valid(name, examples):
    report = validate_manifest(examples[name])
    assert report.ok, str(report)
    assert report.defaults_applied > 0  # the CRDs default fields we leave out (e.g. numOfHosts)
    # The checked-in copy is the same object (test_kuberay_builders checks the text).
    assert load_manifests(MANIFEST_DIR / name)[0] == examples[name]


def test_rule_counts_per_crd():
    """Which CEL rules run: every rule either runs on create, or is a transition rule (oldSelf)."""
    lines = []
    for kind in CRD_FILES:
        crd = load_crd(kind)
        counts = crd.rule_counts()
        lines.append(f"{kind}: {counts}")
        assert counts["total"] == counts["evaluated"] + counts["transition"] + counts["unsupported"]
        assert counts["evaluated"] >= 1, kind
        # No rule of these CRDs needs a Kubernetes CEL library function cel-python lacks; should one
        # appear, it is counted as skipped (never passed silently) and this assertion says so.
        unsupported = [r for r in crd.rules if r.status.startswith("unsupported")]
        assert not unsupported, f"{kind}: rules cel-python cannot evaluate: {unsupported}"
    print("\n".join(lines))


def test_rule_classification():
    assert classify_rule("self == oldSelf") == "transition"
    assert classify_rule("!has(oldSelf.x) || self.x == oldSelf.x") == "transition"
    assert classify_rule("has(self.a) || self.b.all(x, x > 0)") == "evaluated"
    assert classify_rule("self in ['isURL(', 'b']") == "evaluated"  # calls inside strings do not count
    assert classify_rule("isURL(self.url) && self.q.isQuantity()") == "unsupported: isQuantity, isURL"


def test_unsupported_rules_are_counted_as_skipped_not_passed():
    schema = {
        "type": "object",
        "properties": {"url": {"type": "string", "x-kubernetes-validations": [{"rule": "isURL(self)"}]}},
        "x-kubernetes-validations": [{"rule": "self.url.startsWith('https://')", "message": "https only"}],
    }
    report = Report("RayJob", "x")
    _cel_errors({"url": "http://a"}, schema, "", report)
    assert report.rules_evaluated == 1
    assert report.errors == [".: https only (rule: self.url.startsWith('https://'))"]
    assert report.rules_skipped == ["url: isURL(self) (unsupported: isURL)"]


def _rayjob(examples):
    return copy.deepcopy(examples["rayjob.finetune-lora.yaml"])


def _errors(obj):
    report = validate_manifest(obj)
    assert not report.ok, "expected a validation failure"
    return "\n".join(report.errors)


def test_unknown_fields_fail(examples):
    job = _rayjob(examples)
    job["spec"]["shutdownAfterJobFinish"] = True  # typo of shutdownAfterJobFinishes
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["template"]["spec"]["containers"][0]["resource"] = {}
    job["metadata"]["label"] = {}
    errors = _errors(job)
    assert 'spec.shutdownAfterJobFinish: unknown field "shutdownAfterJobFinish"' in errors
    assert 'containers[0].resource: unknown field "resource"' in errors
    assert 'metadata.label: unknown field "label"' in errors


def test_wrong_types_and_missing_required_fields_fail(examples):
    job = _rayjob(examples)
    job["spec"]["ttlSecondsAfterFinished"] = "300"
    job["spec"]["backoffLimit"] = 2**31  # beyond int32
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    del group["groupName"]
    group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "lots"
    errors = _errors(job)
    assert "spec.ttlSecondsAfterFinished: '300' is not of type 'integer'" in errors
    assert "spec.backoffLimit: 2147483648 is not a 'int32'" in errors
    assert "spec.rayClusterSpec.workerGroupSpecs[0]: 'groupName' is a required property" in errors
    assert "resources.limits.memory: 'lots' does not match" in errors


def test_cel_rule_violations_fail(examples):
    job = _rayjob(examples)
    job["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}  # onFailure missing
    job["spec"]["rayClusterSpec"]["managedBy"] = "someone-else"
    errors = _errors(job)
    assert "spec.deletionStrategy: deletionStrategy requires either BOTH onSuccess and onFailure" in errors
    assert "spec.rayClusterSpec.managedBy: the managedBy field value must be either" in errors

    service = copy.deepcopy(examples["rayservice.llm.yaml"])
    service["spec"]["managedBy"] = "kueue.x-k8s.io/multikueue"  # allowed value: passes
    report = validate_manifest(service)
    assert report.ok, str(report)
    assert report.rules_evaluated == 1
    assert report.rules_skipped == ["spec.managedBy: self == oldSelf (transition)"]


def test_defaults_are_applied_before_validation(examples):
    """A port without `protocol` is valid: the CRD defaults it to TCP, a key of the list map."""
    job = _rayjob(examples)
    container = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for port in container["ports"]:
        del port["protocol"]
    assert validate_manifest(job).ok

    schema = load_crd("RayJob").schema
    defaulted = copy.deepcopy(job)
    assert apply_defaults(defaulted, schema) > 0
    ports = defaulted["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {p["protocol"] for p in ports} == {"TCP"}
    # ... and duplicate list-map keys, visible only once defaulted, are caught.
    container["ports"].append({"name": "again", "containerPort": 6379, "protocol": "TCP"})
    assert "duplicate entry with containerPort=6379, protocol='TCP'" in _errors(job)


def test_nulls_of_non_nullable_fields_are_pruned_then_defaulted(examples):
    job = _rayjob(examples)
    job["spec"]["backoffLimit"] = None  # the API server drops it and applies the default (0)
    job["spec"]["suspend"] = None
    assert validate_manifest(job).ok


def test_kuberay_name_rules_and_replica_bounds(examples):
    service = copy.deepcopy(examples["rayservice.llm.yaml"])
    service["metadata"]["name"] = "x" * 48
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["minReplicas"], group["replicas"], group["maxReplicas"] = 3, 1, 2
    errors = _errors(service)
    assert "at most 47 characters for a RayService" in errors
    assert "minReplicas=3 exceeds maxReplicas=2" in errors
    assert "replicas=1 is outside [minReplicas=3, maxReplicas=2]" in errors
    cluster = copy.deepcopy(examples["raycluster.autoscaling.yaml"])
    cluster["apiVersion"] = "ray.io/v1alpha2"
    assert "apiVersion: 'ray.io/v1alpha2' is not 'ray.io/v1'" in _errors(cluster)


def test_cli_validate(tmp_path, examples):
    from kuberay.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["validate", *map(str, sorted(MANIFEST_DIR.glob("*.yaml")))])
    assert result.exit_code == 0, result.output
    assert result.output.count("✓") == 3
    broken = _rayjob(examples)
    broken["spec"]["entrypoint"] = ["python"]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and "spec.entrypoint: ['python'] is not of type 'string'" in result.output
    result = runner.invoke(app, ["validate", str(path), "--crds", str(tmp_path)])
    assert result.exit_code == 2 and "not found" in result.output


def test_a_canary_rayservice_with_incremental_upgrades_is_valid():
    """Split-route weights go in the ingress's user_config (KubeRay applies a changed serveConfigV2 to the
    running cluster); an image or cluster change rolls out through KubeRay's incremental upgrade."""
    from kuberay import KubeRayOptions, build_rayservice, llm_application
    from llmopt.config import load_config

    overrides = [
        "serving.adapters.v2=/home/ray/runs/v2",
        "serving.models.merged=/home/ray/runs/v3/merged",
        "serving.routes.assistant.arms.stable.model=tiny-llama",
        "serving.routes.assistant.arms.stable.weight=90",
        "serving.routes.assistant.arms.canary.model=v2",
        "serving.routes.assistant.arms.canary.weight=10",
    ]
    options = KubeRayOptions(
        auth=False,
        upgrade_strategy="NewClusterWithIncrementalUpgrade",
        gateway_class="istio",
        upgrade_step_percent=20,
    )
    service = build_rayservice(load_config(None, overrides), llm_application(None, overrides), options)
    assert validate_manifest(service).ok, validate_manifest(service).errors
    upgrade = service["spec"]["upgradeStrategy"]
    assert upgrade == {
        "type": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 20, "intervalSeconds": 60, "maxSurgePercent": 100,
        },
    }  # fmt: skip
    deployments = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    ingress = next(d for d in deployments if d["name"] == "LLMIngress")
    assert ingress["user_config"] == {"routes": {"assistant": {"stable": 90.0, "canary": 10.0}}}
    # The extra model's deployment is sized like the main one, and the worker group holds both.
    server, extra = (
        next(d for d in deployments if d["name"] == n) for n in ("LLMServer", "LLMServer-merged")
    )
    assert {k: v for k, v in extra.items() if k != "name"} == {k: v for k, v in server.items() if k != "name"}
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    replicas = server.get("num_replicas") or server["autoscaling_config"]["max_replicas"]
    assert group["maxReplicas"] == 2 * replicas
    with pytest.raises(ValueError, match="--gateway-class"):
        KubeRayOptions(upgrade_strategy="NewClusterWithIncrementalUpgrade")
