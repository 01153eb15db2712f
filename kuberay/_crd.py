"""Validate RayCluster / RayJob / RayService objects against the KubeRay CRDs, as the API server would.

The steps follow the API server's handling of a create request for a custom resource:

1. null values of non-nullable fields are dropped, then the schema's `default`s are filled in for
   absent fields, recursively (so a required field that has a default never fails falsely);
2. the object is validated against the version's openAPIV3Schema (types, required, enums, patterns,
   bounds, `int32`/`int64` ranges; `nullable`; `x-kubernetes-int-or-string`);
3. unknown fields are errors, as with `kubectl apply --validate=strict` (fieldValidation=Strict):
   every object schema without `x-kubernetes-preserve-unknown-fields` is closed; embedded resources
   also take apiVersion/kind/metadata; the top-level metadata, which the CRD leaves open, is checked
   against ObjectMeta's fields;
4. `x-kubernetes-list-type: map` keys and `set` items must be unique;
5. the CEL rules (`x-kubernetes-validations`) are evaluated with cel-python on each value that is
   present. Transition rules (those using `oldSelf`) only run on updates and are skipped here; rules
   calling a Kubernetes CEL library function cel-python lacks are skipped and counted, never passed
   silently (`CRD.rule_counts`);
6. KubeRay's own admission checks on names (DNS-1035 labels within 53 / 47 characters) and worker
   group replica bounds.

The CRDs are read from `../shared/kuberay-crds` beside the repository (`default_crd_dir`), never
copied into it. `jsonschema` and `cel-python` (module `celpy`) are imported only here.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kuberay._options import MAX_NAME_LENGTH as MAX_NAME

CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
OBJECT_META_FIELDS = {
    "name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences",
    "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
    "deletionGracePeriodSeconds", "managedFields", "selfLink",
}  # fmt: skip
EMBEDDED_FIELDS = {"apiVersion", "kind", "metadata"}
CEL_MACROS = {"has", "all", "exists", "exists_one", "filter", "map", "dyn"}
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def default_crd_dir(repo_root: Path | None = None) -> Path:
    """`<repo>/../shared/kuberay-crds`, where the project keeps the KubeRay CRDs."""
    repo_root = repo_root or Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "kuberay-crds"


class CRDMissing(FileNotFoundError):
    """The CRD folder or file is absent (the validation tier then skips, saying so)."""


@dataclass(frozen=True)
class Rule:
    """One CEL rule of a CRD, with the schema path it sits at and how it is treated here."""

    path: str
    rule: str
    message: str
    status: str  # "evaluated", "transition" (needs oldSelf) or "unsupported: fn, ..."


@dataclass
class Report:
    """The outcome of validating one object."""

    kind: str
    name: str
    errors: list[str] = field(default_factory=list)
    defaults_applied: int = 0
    rules_evaluated: int = 0  # CEL rule evaluations (a rule runs once per value present)
    rules_skipped: list[str] = field(default_factory=list)  # "path: rule (why)" for skipped evaluations

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        head = f"{self.kind} {self.name}: "
        if self.ok:
            return head + (
                f"valid ({self.defaults_applied} defaults applied, {self.rules_evaluated} CEL evaluations, "
                f"{len(self.rules_skipped)} skipped)"
            )
        return head + f"{len(self.errors)} error(s)\n" + "\n".join(f"  - {e}" for e in self.errors)


def _strip_strings(rule: str) -> str:
    return re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "''", rule)


def classify_rule(rule: str) -> str:
    """`evaluated`, `transition` (uses oldSelf: update-only) or `unsupported: <functions>`."""
    import celpy.evaluation

    code = _strip_strings(rule)
    if re.search(r"\boldSelf\b", code):
        return "transition"
    supported = {name for name in celpy.evaluation.base_functions if name[0].isalpha()} | CEL_MACROS
    called = set(re.findall(r"([A-Za-z_]\w*)\s*\(", code))
    missing = sorted(called - supported)
    return f"unsupported: {', '.join(missing)}" if missing else "evaluated"


def _walk_rules(schema: dict[str, Any], path: str, out: list[Rule]) -> None:
    for item in schema.get("x-kubernetes-validations") or []:
        out.append(Rule(path or ".", item["rule"], item.get("message", ""), classify_rule(item["rule"])))
    for name, sub in (schema.get("properties") or {}).items():
        _walk_rules(sub, f"{path}.{name}", out)
    if isinstance(schema.get("items"), dict):
        _walk_rules(schema["items"], f"{path}[]", out)
    if isinstance(schema.get("additionalProperties"), dict):
        _walk_rules(schema["additionalProperties"], f"{path}{{}}", out)


def _jsonschema_form(schema: Any) -> Any:
    """The schema with OpenAPI's `nullable: true` written as JSON Schema's `type: [t, "null"]`."""
    if isinstance(schema, list):
        return [_jsonschema_form(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _jsonschema_form(v) for k, v in schema.items()}
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


class CRD:
    """One CustomResourceDefinition: its served version's schema and CEL rules."""

    def __init__(self, data: dict[str, Any], version: str = "v1"):
        spec = data["spec"]
        self.kind: str = spec["names"]["kind"]
        self.group: str = spec["group"]
        self.version = version
        versions = {v["name"]: v for v in spec["versions"]}
        if version not in versions:
            raise ValueError(f"{self.kind} CRD has no version {version}; it has {', '.join(versions)}")
        self.schema: dict[str, Any] = versions[version]["schema"]["openAPIV3Schema"]
        self.rules: list[Rule] = []
        _walk_rules(self.schema, "", self.rules)
        self._validator = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def rule_counts(self) -> dict[str, int]:
        """Rules by treatment: evaluated (on present values), transition (skipped), unsupported (skipped)."""
        counts = {"total": len(self.rules), "evaluated": 0, "transition": 0, "unsupported": 0}
        for rule in self.rules:
            counts[rule.status.split(":")[0]] += 1
        return counts

    @property
    def validator(self):
        if self._validator is None:
            import jsonschema

            checker = jsonschema.FormatChecker()
            for name, (low, high) in INT_RANGES.items():
                checker.checks(name)(
                    lambda value, low=low, high=high: not isinstance(value, int) or low <= value <= high
                )
            self._validator = jsonschema.Draft4Validator(
                _jsonschema_form(self.schema), format_checker=checker
            )
        return self._validator


@functools.lru_cache(maxsize=8)
def _load_crd(path: str) -> CRD:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path) as handle:
        return CRD(yaml.load(handle, Loader=loader))


def load_crd(kind: str, crd_dir: Path | None = None) -> CRD:
    """The CRD of `kind` from `crd_dir` (default `default_crd_dir()`), parsed once per process."""
    if kind not in CRD_FILES:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(CRD_FILES)}")
    path = Path(crd_dir or default_crd_dir()) / CRD_FILES[kind]
    if not path.is_file():
        raise CRDMissing(
            f"KubeRay CRD {path} not found: the CRDs live in ../shared/kuberay-crds beside the repository "
            "(ray-project/kuberay ray-operator/config/crd/bases); pass --crds DIR"
        )
    return _load_crd(str(path.resolve()))


# --- 1. nulls and defaults -------------------------------------------------------------------------


def apply_defaults(value: Any, schema: dict[str, Any]) -> int:
    """Drop nulls of non-nullable fields and fill schema defaults in place; returns defaults applied."""
    applied = 0
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name, sub in props.items():
            if name in value and value[name] is None and not sub.get("nullable"):
                del value[name]  # the API server prunes such nulls (then defaults them)
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
                applied += 1
        extra = schema.get("additionalProperties")
        for name, item in list(value.items()):
            sub = props.get(name) if name in props else (extra if isinstance(extra, dict) else None)
            if sub is not None:
                applied += apply_defaults(item, sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            applied += apply_defaults(item, schema["items"])
    return applied


# --- 3 and 4. unknown fields and list uniqueness ---------------------------------------------------


def _structural_errors(value: Any, schema: dict[str, Any], path: str, errors: list[str]) -> None:
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        open_ = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
        allowed = set(props) | (EMBEDDED_FIELDS if schema.get("x-kubernetes-embedded-resource") else set())
        for name, item in value.items():
            where = f"{path}.{name}" if path else name
            if name in props:
                _structural_errors(item, props[name], where, errors)
            elif isinstance(extra, dict):
                _structural_errors(item, extra, where, errors)
            elif not open_ and name not in allowed:
                known = ", ".join(sorted(props)) or "none: the schema allows no fields here"
                errors.append(f'{where}: unknown field "{name}" (known fields: {known})')
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen: dict[tuple, int] = {}
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                missing = [k for k in keys if k not in item]
                if missing:
                    errors.append(f"{path}[{i}]: list-map key(s) {', '.join(missing)} missing")
                key = tuple(repr(item.get(k)) for k in keys)
                if key in seen:
                    shown = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
                    errors.append(f"{path}[{i}]: duplicate entry with {shown} (also at [{seen[key]}])")
                seen.setdefault(key, i)
        elif list_type == "set":
            reprs = [repr(v) for v in value]
            for i, text in enumerate(reprs):
                if text in reprs[:i]:
                    errors.append(f"{path}[{i}]: duplicate value {value[i]!r} in a set")
        for i, item in enumerate(value):
            _structural_errors(item, schema["items"], f"{path}[{i}]", errors)


def _metadata_errors(obj: dict[str, Any], kind: str) -> list[str]:
    """ObjectMeta's fields (the CRD schema leaves metadata open) and KubeRay's naming rule."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return ["metadata: required object with at least a name"]
    errors = [
        f'metadata.{k}: unknown field "{k}" (not an ObjectMeta field)'
        for k in metadata
        if k not in OBJECT_META_FIELDS
    ]
    name = metadata.get("name")
    if not name:
        errors.append("metadata.name: required")
    elif not isinstance(name, str) or not DNS_1035.match(name) or len(name) > MAX_NAME[kind]:
        errors.append(
            f"metadata.name: {name!r} must be a DNS-1035 label (lowercase letters, digits and '-', starting "
            f"with a letter) of at most {MAX_NAME[kind]} characters for a {kind} (KubeRay's limit)"
        )
    for key in ("labels", "annotations"):
        mapping = metadata.get(key)
        if mapping is None:
            continue
        if not isinstance(mapping, dict):
            errors.append(f"metadata.{key}: must be a map of strings, got {type(mapping).__name__}")
            continue
        errors += [
            f"metadata.{key}.{k}: value {v!r} must be a string"
            for k, v in mapping.items()
            if not isinstance(v, str)
        ]
    return errors


# --- 5. CEL rules ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_errors(value: Any, schema: dict[str, Any], path: str, report: Report) -> None:
    import celpy

    rules = schema.get("x-kubernetes-validations") or []
    if rules:
        activation = None
        for item in rules:
            rule, message = item["rule"], item.get("message") or f"failed rule: {item['rule']}"
            status = classify_rule(rule)
            if status != "evaluated":
                report.rules_skipped.append(f"{path or '.'}: {rule} ({status})")
                continue
            activation = activation or {"self": celpy.json_to_cel(value)}
            report.rules_evaluated += 1
            try:
                result = _program(rule).evaluate(activation)
            except Exception as exc:  # CELEvalError, or a parse error in the rule
                report.errors.append(
                    f"{path or '.'}: CEL rule {rule!r} could not be evaluated: {exc.args[0]}"
                )
                continue
            if isinstance(result, Exception):
                report.errors.append(f"{path or '.'}: CEL rule {rule!r} could not be evaluated: {result}")
            elif not bool(result):
                report.errors.append(f"{path or '.'}: {message} (rule: {rule})")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            sub = props.get(name) if name in props else (extra if isinstance(extra, dict) else None)
            if sub is not None:
                _cel_errors(item, sub, f"{path}.{name}" if path else name, report)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _cel_errors(item, schema["items"], f"{path}[{i}]", report)


# --- 6. KubeRay's admission checks ----------------------------------------------------------------


def _cluster_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    spec = obj.get("spec") or {}
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[obj["kind"]]


def _operator_errors(obj: dict[str, Any]) -> list[str]:
    cluster = _cluster_spec(obj)
    if not isinstance(cluster, dict):
        return []
    errors = []
    where = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}[
        obj["kind"]
    ]
    names = set()
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        if not isinstance(group, dict):
            continue
        at = f"{where}.workerGroupSpecs[{i}]"
        name = group.get("groupName")
        if name in names:
            errors.append(f"{at}.groupName: {name!r} is used by another worker group")
        names.add(name)
        low, high, replicas = group.get("minReplicas", 0), group.get("maxReplicas"), group.get("replicas")
        if isinstance(high, int) and isinstance(low, int) and low > high:
            errors.append(f"{at}: minReplicas={low} exceeds maxReplicas={high}")
        if (
            isinstance(replicas, int)
            and isinstance(high, int)
            and isinstance(low, int)
            and not low <= replicas <= high
        ):
            errors.append(f"{at}: replicas={replicas} is outside [minReplicas={low}, maxReplicas={high}]")
    return errors


def validate_manifest(obj: dict[str, Any], crd_dir: Path | None = None) -> Report:
    """Validate one object as the API server would on create (see the module docstring).

    Args:
        obj: A RayCluster, RayJob or RayService (not modified: defaults go into a copy).
        crd_dir: Folder holding the CRD YAMLs; default `default_crd_dir()`.

    Returns:
        A Report whose `errors` name each problem with its field path.

    Raises:
        CRDMissing: the CRD file is absent.
    """
    kind = obj.get("kind")
    name = str((obj.get("metadata") or {}).get("name", "?"))
    if kind not in CRD_FILES:
        return Report(str(kind), name, [f"kind: {kind!r} is not one of {', '.join(CRD_FILES)}"])
    crd = load_crd(kind, crd_dir)
    report = Report(kind, name)
    if obj.get("apiVersion") != crd.api_version:
        report.errors.append(f"apiVersion: {obj.get('apiVersion')!r} is not {crd.api_version!r}")
    obj = copy.deepcopy(obj)
    report.defaults_applied = apply_defaults(obj, crd.schema)
    for error in sorted(crd.validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        where = where.lstrip(".") or "."
        report.errors.append(f"{where}: {error.message}")
    _structural_errors({k: v for k, v in obj.items() if k != "metadata"}, crd.schema, "", report.errors)
    report.errors += _metadata_errors(obj, kind)
    _cel_errors(obj, crd.schema, "", report)
    report.errors += _operator_errors(obj)
    return report
