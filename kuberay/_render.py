"""From files to manifests: run configs and Serve configs in, YAML out, and the checked-in examples.

`render_examples()` is the single source of `kuberay/manifests/*.yaml`; a test re-renders them and
compares, so the files never go stale. Regenerate with `llmopt kuberay examples`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from kuberay._builders import build_raycluster, build_rayjob, build_rayservice, llm_application
from kuberay._options import LLM_APPS, KubeRayOptions, image_path
from llmopt.config import RunConfig, load_config, read_yaml

REPO = Path(__file__).resolve().parent.parent
MANIFEST_DIR = REPO / "kuberay" / "manifests"
REGENERATE = "llmopt kuberay examples   # from the repository root"
RUNS_CLAIM = "llmopt-runs"  # the examples' shared run-directory claim (created as the README shows)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, runtimeEnvYAML) as readable `|` blocks; no anchors/aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def to_yaml(objs: Sequence[dict[str, Any]], header: str = "") -> str:
    """Objects as one YAML stream (documents separated by `---`), after an optional comment header."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    body = yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, width=1000, explicit_start=len(objs) > 1)
    return comment + body


def load_manifests(path: str | Path) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML file."""
    with open(path) as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def rayjob_from_files(
    config_file: str | Path,
    overrides: Sequence[str] = (),
    *,
    job: str = "finetune",
    job_args: Sequence[str] = (),
    options: KubeRayOptions | None = None,
    repo_root: Path = REPO,
) -> dict[str, Any]:
    """A RayJob for a run config file of this repository (which the image holds)."""
    config = load_config(config_file, overrides)
    path = image_path(config_file, repo_root)
    return build_rayjob(
        config, config_path=path, overrides=overrides, job=job, job_args=job_args, options=options
    )


def rayservice_from_files(
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    serve_config: str | Path | None = None,
    options: KubeRayOptions | None = None,
    repo_root: Path = REPO,
) -> dict[str, Any]:
    """A RayService from a run config file, a Serve config (serve_apps/configs/llm.yaml), or neither.

    A Serve config must hold one `serve_apps.llm:app` application whose `args.config` is relative to
    the repository root (as the shipped one); its deployment options are kept, and `overrides` are
    appended to its `args.overrides`. With neither, the default run config is served (as `llmopt serve`
    without `--config` serves it): the application names no config file, so the pods build the same one.
    """
    if config_file is not None and serve_config is not None:
        raise ValueError("give a run config (--config) or a Serve config (--serve-config), not both")
    if serve_config is not None:
        data = read_yaml(serve_config)
        apps = data.get("applications") or []
        if len(apps) != 1 or apps[0].get("import_path") not in LLM_APPS:
            found = [a.get("import_path") for a in apps]
            raise ValueError(
                f"{serve_config}: expected one application importing {LLM_APPS[0]}, found {found}; "
                "give a run config with --config instead"
            )
        application = dict(apps[0])
        args = dict(application.get("args") or {})
        if not args.get("config"):
            raise ValueError(f"{serve_config}: the application has no args.config (a run config path)")
        source = Path(args["config"])
        source = source if source.is_absolute() else repo_root / source
        all_overrides = [*(args.get("overrides") or []), *overrides]
        config = load_config(source, all_overrides)
        args["config"] = image_path(source, repo_root)
        if all_overrides:
            args["overrides"] = all_overrides
        application["args"] = args
    else:
        config = load_config(config_file, overrides)
        path = None if config_file is None else image_path(config_file, repo_root)
        application = llm_application(path, overrides)
    return build_rayservice(config, application, options)


def raycluster_from_files(
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    options: KubeRayOptions | None = None,
) -> dict[str, Any]:
    """A standalone autoscaling RayCluster sized from a run config (defaults when none is given)."""
    config: RunConfig = load_config(config_file, overrides)
    return build_raycluster(config, options)


def render_examples(repo_root: Path = REPO) -> dict[str, str]:
    """The example manifests, file name -> YAML text, rendered from the shipped configs."""
    finetune_config = repo_root / "jobs" / "configs" / "tiny-llama-reverse.yaml"
    serve_config = repo_root / "serve_apps" / "configs" / "llm.yaml"
    examples = {
        "rayjob.finetune-lora.yaml": (
            "LoRA fine-tuning of jobs/configs/tiny-llama-reverse.yaml as a RayJob on its own cluster,\n"
            "deleted ttlSecondsAfterFinished after the job ends. Run directories and checkpoints go to\n"
            "the PersistentVolumeClaim llmopt-runs, shared by the driver and the workers (README).",
            rayjob_from_files(
                finetune_config,
                options=KubeRayOptions(name="finetune-lora", runs_claim=RUNS_CLAIM),
                repo_root=repo_root,
            ),
        ),
        "rayservice.llm.yaml": (
            "The Serve application of serve_apps/configs/llm.yaml as a RayService: autoscaled model\n"
            "replicas, one worker pod each; API keys from the Secret llm-api-keys (key `api-keys`).",
            rayservice_from_files(
                serve_config=serve_config, options=KubeRayOptions(name="llm"), repo_root=repo_root
            ),
        ),
        "raycluster.autoscaling.yaml": (
            "A standalone RayCluster for interactive `ray job submit`, workers sized like\n"
            "jobs/configs/tiny-llama-reverse.yaml's, autoscaling between 0 and 4 worker pods; run\n"
            "directories on the PersistentVolumeClaim llmopt-runs.",
            raycluster_from_files(
                finetune_config,
                options=KubeRayOptions(name="llmopt", min_workers=0, max_workers=4, runs_claim=RUNS_CLAIM),
            ),
        ),
    }
    out = {}
    for filename, (description, obj) in examples.items():
        header = f"{description}\nGenerated by kuberay/_render.py; do not edit. Regenerate: {REGENERATE}"
        out[filename] = to_yaml([obj], header)
    return out


def write_examples(out_dir: Path = MANIFEST_DIR, repo_root: Path = REPO) -> list[Path]:
    """Write `render_examples()` into `out_dir`; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in render_examples(repo_root).items():
        path = out_dir / filename
        path.write_text(text)
        written.append(path)
    return written
