"""`llmopt kuberay ...`: render, validate, apply, watch and delete KubeRay resources.

Reached from `llmopt kuberay` at run time (`llmopt` never imports this package); also runnable as
`python -m kuberay.cli ...` from the repository root.

    llmopt kuberay render rayjob --config jobs/configs/tiny-llama-reverse.yaml training.lr=1e-3 -o job.yaml
    llmopt kuberay render rayservice --serve-config serve_apps/configs/llm.yaml --image REGISTRY/llmopt:0.1.0
    llmopt kuberay render raycluster --config jobs/configs/tiny-llama-reverse.yaml --max-workers 4
    llmopt kuberay examples [--check]          # kuberay/manifests/*.yaml
    llmopt kuberay validate FILE... [--crds DIR]
    llmopt kuberay apply FILE... [--dry-run]   # create, or merge-patch what exists
    llmopt kuberay status rayjob NAME [--json]
    llmopt kuberay wait rayjob NAME [--timeout 3600]
    llmopt kuberay delete rayservice NAME
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from kuberay._client import KubeRayClient, KubeRayError, kind_of
from kuberay._options import DEFAULT_IMAGE, KubeRayOptions
from kuberay._render import (
    MANIFEST_DIR,
    REGENERATE,
    load_manifests,
    raycluster_from_files,
    rayjob_from_files,
    rayservice_from_files,
    render_examples,
    to_yaml,
)
from llmopt.config import ConfigError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="KubeRay: RayJob / RayService / RayCluster manifests from run configs, applied and watched.",
)
console = Console()
err = Console(stderr=True)

Namespace = Annotated[str, typer.Option("--namespace", "-n", help="Kubernetes namespace.")]
Context = Annotated[str | None, typer.Option(help="kubeconfig context (default: the current one).")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _client(context: str | None) -> KubeRayClient:
    try:
        return KubeRayClient(context=context)
    except KubeRayError as exc:
        raise _fail(str(exc)) from None


@app.command("render")
def render(
    kind: Annotated[str, typer.Argument(help="rayjob, rayservice or raycluster.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Config overrides a.b=value.")] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Run config YAML (RayService, RayCluster: default config if unset)."
        ),
    ] = None,
    serve_config: Annotated[
        Path | None, typer.Option(help="RayService from this Serve config (serve_apps/configs/llm.yaml).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Resource name (default: the config's name).")] = None,
    namespace: Namespace = "default",
    image: Annotated[str, typer.Option(help="Image built from kuberay/Dockerfile.")] = DEFAULT_IMAGE,
    job: Annotated[str, typer.Option(help="RayJob entry point: finetune or tune.")] = "finetune",
    runs_claim: Annotated[
        str | None, typer.Option(help="ReadWriteMany PVC mounted at /home/ray/runs on every pod.")
    ] = None,
    auth: Annotated[bool, typer.Option(help="RayService: API keys from a Secret.")] = True,
    api_keys_secret: Annotated[
        str | None, typer.Option(help="RayService: Secret with key `api-keys` (default NAME-api-keys).")
    ] = None,
    throughput_optimized: Annotated[
        bool,
        typer.Option(help="RayService: Ray Serve's high-throughput mode (HAProxy, direct ingress, gRPC)."),
    ] = False,
    upgrade_strategy: Annotated[
        str,
        typer.Option(help="RayService upgrades: NewCluster, NewClusterWithIncrementalUpgrade or None."),
    ] = "NewCluster",
    gateway_class: Annotated[
        str | None, typer.Option(help="RayService incremental upgrades: the Gateway API GatewayClass.")
    ] = None,
    upgrade_step_percent: Annotated[
        int, typer.Option(help="RayService incremental upgrades: traffic moved per step, %.")
    ] = 10,
    upgrade_interval_s: Annotated[
        int, typer.Option(help="RayService incremental upgrades: seconds between steps.")
    ] = 60,
    min_workers: Annotated[int | None, typer.Option(help="RayCluster: fewest worker pods.")] = None,
    max_workers: Annotated[int | None, typer.Option(help="RayCluster: most worker pods.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the YAML here.")] = None,
) -> None:
    """Render a RayJob, RayService or RayCluster from a run config (or a Serve config)."""
    try:
        kind = kind_of(kind)
        options = KubeRayOptions(
            name=name,
            namespace=namespace,
            image=image,
            runs_claim=runs_claim,
            auth=auth,
            api_keys_secret=api_keys_secret,
            throughput_optimized=throughput_optimized,
            upgrade_strategy=upgrade_strategy,
            gateway_class=gateway_class,
            upgrade_step_percent=upgrade_step_percent,
            upgrade_interval_s=upgrade_interval_s,
            min_workers=min_workers,
            max_workers=max_workers,
        )
        overrides = list(overrides or [])
        if kind == "RayJob":
            if config_file is None:
                raise ValueError("a RayJob needs --config (a run config in this repository)")
            if job not in ("finetune", "tune"):
                raise ValueError(f"--job {job!r} must be 'finetune' or 'tune'")
            obj = rayjob_from_files(config_file, overrides, job=job, options=options)
            if not runs_claim:
                err.print(
                    "[yellow]warning:[/] no --runs-claim: run directories land on each pod's emptyDir, so "
                    "checkpoints written by worker pods are not where the driver (on the head) looks, and "
                    "everything goes with the cluster; pass a ReadWriteMany PVC with --runs-claim",
                    highlight=False,
                )
        elif kind == "RayService":
            obj = rayservice_from_files(config_file, overrides, serve_config=serve_config, options=options)
        else:
            obj = raycluster_from_files(config_file, overrides, options=options)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    text = to_yaml([obj])
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        err.print(escape(f"{kind} {obj['metadata']['name']} written to {output}"), highlight=False)
    else:
        sys.stdout.write(text)


@app.command("examples")
def examples(
    check: Annotated[bool, typer.Option(help="Only compare with the files; exit 1 when stale.")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder of the examples.")] = MANIFEST_DIR,
) -> None:
    """Regenerate the example manifests in kuberay/manifests/ from the shipped configs."""
    stale = []
    for filename, text in render_examples().items():
        path = out_dir / filename
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(filename)
        if not check:
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if check and stale:
        raise _fail(f"stale example manifest(s): {', '.join(stale)}; regenerate: {REGENERATE}")
    verb = "up to date" if not stale else "written: " + ", ".join(stale)
    console.print(escape(f"{out_dir}: {verb}"), highlight=False)


@app.command("validate")
def validate(
    files: Annotated[list[Path], typer.Argument(help="Manifest YAML files.")],
    crds: Annotated[
        Path | None, typer.Option(help="Folder of the KubeRay CRDs (default ../shared/kuberay-crds).")
    ] = None,
) -> None:
    """Validate manifests against the KubeRay CRDs: schema with defaults, unknown fields, CEL rules."""
    from kuberay._crd import CRDMissing, validate_manifest

    failed = 0
    for path in files:
        for obj in load_manifests(path):
            try:
                report = validate_manifest(obj, crds)
            except CRDMissing as exc:
                raise _fail(str(exc), 2) from None
            except ImportError as exc:
                raise _fail(f"{exc}; install the dev extra: pip install -e '.[dev]'", 2) from None
            failed += not report.ok
            mark = "[green]✓[/]" if report.ok else "[red]✗[/]"
            console.print(f"{mark} {escape(f'{path}: {report}')}", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command("apply")
def apply(
    files: Annotated[list[Path], typer.Argument(help="Manifest YAML files (rendered by `render`).")],
    namespace: Namespace = "default",
    dry_run: Annotated[bool, typer.Option(help="Server-side dry run: validated, not stored.")] = False,
    context: Context = None,
) -> None:
    """Create each resource, or merge-patch it when it exists (strict field validation)."""
    client = _client(context)
    for path in files:
        for obj in load_manifests(path):
            try:
                action, result = client.apply(obj, namespace=namespace, dry_run=dry_run)
            except KubeRayError as exc:
                raise _fail(str(exc)) from None
            suffix = " (server dry run)" if dry_run else ""
            meta = result.get("metadata") or obj["metadata"]
            ns = meta.get("namespace") or namespace
            console.print(escape(f"{obj['kind']} {ns}/{meta.get('name')} {action}{suffix}"), highlight=False)


@app.command("status")
def status(
    kind: Annotated[str, typer.Argument(help="rayjob, rayservice or raycluster.")],
    name: Annotated[str, typer.Argument(help="Resource name.")],
    namespace: Namespace = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole status as JSON.")] = False,
    context: Context = None,
) -> None:
    """Show a resource's status (exit 1 for a failed RayJob)."""
    client = _client(context)
    try:
        obj, current = client.status(kind, name, namespace)
    except (KubeRayError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        print(json.dumps(obj.get("status") or {}, indent=2))
    else:
        console.print(escape(f"{kind_of(kind)} {namespace}/{name}: {current.summary}"), highlight=False)
    if current.done and not current.ok:
        raise typer.Exit(1)


@app.command("wait")
def wait(
    kind: Annotated[str, typer.Argument(help="rayjob, rayservice or raycluster.")],
    name: Annotated[str, typer.Argument(help="Resource name.")],
    namespace: Namespace = "default",
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 3600.0,
    poll: Annotated[float, typer.Option(help="Seconds between reads.")] = 5.0,
    context: Context = None,
) -> None:
    """Wait for a RayJob to finish (exit 1 if it failed) or a RayService / RayCluster to be ready."""
    client = _client(context)

    def show(current) -> None:
        console.print(escape(f"{kind_of(kind)} {namespace}/{name}: {current.summary}"), highlight=False)

    try:
        final = client.wait(kind, name, namespace, timeout_s=timeout, poll_s=poll, on_change=show)
    except (KubeRayError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if not final.ok:
        raise typer.Exit(1)


@app.command("delete")
def delete(
    kind: Annotated[str, typer.Argument(help="rayjob, rayservice or raycluster.")],
    name: Annotated[str, typer.Argument(help="Resource name.")],
    namespace: Namespace = "default",
    context: Context = None,
) -> None:
    """Delete a resource (KubeRay removes its clusters, pods and services)."""
    client = _client(context)
    try:
        client.delete(kind, name, namespace)
    except (KubeRayError, ValueError) as exc:
        raise _fail(str(exc)) from None
    console.print(escape(f"{kind_of(kind)} {namespace}/{name} deleted"), highlight=False)


def main(args: list[str] | None = None, prog_name: str = "llmopt kuberay") -> None:
    """Run the command line (`llmopt kuberay` forwards its arguments here)."""
    app(args=args, prog_name=prog_name)


if __name__ == "__main__":
    main(prog_name="python -m kuberay.cli")
