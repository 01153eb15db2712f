"""The main pipeline on the embedded default (what `make demo` runs).

    python -m jobs.demo
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.demo

It builds the model zoo (tiny dense and MoE presets, cached by content hash), validates every shipped
config and template, evaluates the untrained tiny model on the held-out split as a Ray task, then
fine-tunes it with LoRA on two Ray Train + DeepSpeed workers (jobs/configs/tiny-llama-reverse.yaml)
and reports the held-out exact match before and after; finally it serves the base model with the new
adapter on Ray Serve (serve_apps.llm) and asks both over HTTP, concurrently, for held-out answers, all on
a local cluster started in-process (the strategy search has its own job, `jobs.tune`). A summary is
written to outputs/demo/summary.json; the run directory (adapter, metrics, loss curve) to runs/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmopt.config import ConfigError, load_config, templates, validate_config
from llmopt.evaluation import evaluate_on_ray
from llmopt.models import PRESETS, build_preset, model_info

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "jobs" / "configs" / "tiny-llama-reverse.yaml"


def shipped_configs() -> list[Path]:
    """Every run-config YAML shipped with the repository."""
    return sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def main() -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    console = Console()
    summary: dict = {"models": {}, "configs": {}}

    console.rule("1. Model zoo")
    table = Table("preset", "parameters", "fp32 weights", "build", "path")
    for preset in (p for p in PRESETS.values() if p.default_test):
        start = time.perf_counter()
        path = build_preset(preset.name)
        seconds = time.perf_counter() - start
        info = model_info(preset.name)
        summary["models"][preset.name] = {
            "path": str(path),
            "parameters": info.num_parameters,
            "build_s": seconds,
        }
        table.add_row(
            preset.name,
            f"{info.num_parameters:,}",
            f"{info.weight_bytes['fp32'] / 2**20:.1f} MiB",
            f"{seconds:.1f} s",
            str(path),
        )
    console.print(table)

    console.rule("2. Shipped configs and templates")
    failures = 0
    for path in shipped_configs():
        try:
            load_config(path)
            summary["configs"][path.name] = "valid"
        except ConfigError as exc:
            failures += 1
            summary["configs"][path.name] = str(exc)
    for name in templates():
        try:
            validate_config({"template": name})
            summary["configs"][f"template:{name}"] = "valid"
        except ConfigError as exc:
            failures += 1
            summary["configs"][f"template:{name}"] = str(exc)
    for name, status in summary["configs"].items():
        console.print(
            f"  {'✓' if status == 'valid' else '✗'} {name}" + ("" if status == "valid" else f"\n{status}")
        )
    if failures:
        raise SystemExit(f"{failures} shipped config(s) are invalid")

    console.rule("3. Untrained tiny model on the held-out split (Ray task, embedded local cluster)")
    config = load_config(DEMO_CONFIG)
    result = evaluate_on_ray(config)
    summary["baseline_eval"] = {k: v for k, v in result.items() if k != "samples"}
    console.print(
        f"  {config.model.name_or_path} on {config.data.dataset}/{config.data.eval_split}: exact match "
        f"[bold]{result['exact_match']:.1%}[/] ({result['num_correct']}/{result['num_examples']}), "
        f"response loss [bold]{result['loss']:.3f}[/] (uniform over the vocabulary would be ~6.93)"
    )
    for sample in result["samples"][:2]:
        console.print(
            f"  e.g. expected {sample['expected']!r}, got {sample['completion']!r}", highlight=False
        )

    console.rule("4. LoRA fine-tune on Ray Train + DeepSpeed (2 workers, ZeRO-2)")
    from llmopt.train import finetune

    run = finetune(config)
    if not run.ok:
        raise SystemExit(f"fine-tuning failed: {run.error} (run directory {run.run_dir})")
    m = run.metrics
    summary["finetune"] = {"run_dir": str(run.run_dir), "seconds": run.seconds, **m}
    console.print(
        f"  {m['step']} steps in {run.seconds:.0f} s, {m['throughput_tokens_per_s']:.0f} tokens/s, "
        f"{m['trainable_parameters']:,} of {m['total_parameters']:,} parameters trained\n"
        f"  held-out exact match [bold]{result['exact_match']:.1%} -> {m['eval_exact_match']:.1%}[/], "
        f"held-out loss {result['loss']:.3f} -> {m['eval_loss']:.3f}\n"
        f"  run directory: {run.run_dir} (adapter/, metrics.jsonl, loss.png); `llmopt runs list` shows it"
    )

    console.rule("5. Serve base + adapter on Ray Serve, ask over HTTP (OpenAI API, batched)")
    summary["serve"] = serve_and_ask(config, run.run_dir, console)

    out = REPO / "outputs" / "demo" / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    console.rule("Done")
    console.print(f"Summary written to {out.relative_to(REPO)}.", highlight=False)
    return summary


def serve_and_ask(config, run_dir: Path, console: Console, samples: int = 16) -> dict:
    """Deploy serve_apps.llm with the run's adapter; answer held-out prompts with base and adapter."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from ray import serve

    from llmopt.data import load_rows, normalize_answer, render
    from llmopt.models import load_tokenizer
    from llmopt.processes import run_bounded
    from serve_apps.llm import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tokenizer = load_tokenizer(config.model)
    rows = load_rows(config.data.dataset, config.data.eval_split, limit=samples)
    prompts = [render(row, tokenizer, config.data.prompt_template) for row in rows]
    overrides = [f"serving.adapters.reverse={run_dir}", "serving.batching.max_batch_size=16"]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        quiet = {
            "log_level": "WARNING",
            "enable_access_log": False,
        }  # keep request logs out of the demo output
        serve.run(
            app({"config": str(DEMO_CONFIG), "overrides": overrides}),
            name="llm",
            route_prefix="/",
            logging_config=quiet,
        )
        url = f"http://127.0.0.1:{port}"

        def ask(job: tuple[str, str]) -> str:
            prompt, model = job
            body = {"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            response.raise_for_status()
            return response.json()["choices"][0]["text"]

        base, tuned = config.model.name_or_path, f"{config.model.name_or_path}:reverse"
        jobs = [(p, m) for p, _ in prompts for m in (base, tuned)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        stats = httpx.get(f"{url}/api/v1/stats", timeout=30).json()
    finally:
        # Bounded: after a stop signal to the whole process group, Serve's controller no longer answers.
        run_bounded(serve.shutdown, 10)
    expected = [normalize_answer(r) for _, r in prompts]
    base_answers, tuned_answers = answers[0::2], answers[1::2]
    result = {
        "url_was": url,
        "samples": len(prompts),
        "base_exact_match": sum(normalize_answer(a) == e for a, e in zip(base_answers, expected, strict=True))
        / len(prompts),
        "adapter_exact_match": sum(
            normalize_answer(a) == e for a, e in zip(tuned_answers, expected, strict=True)
        )
        / len(prompts),
        "max_batch_size_seen": stats["batch_size"]["max"],
    }
    console.print(
        f"  {len(jobs)} concurrent requests to {url}/v1/completions (model={base!r} and {tuned!r});"
        f" up to {result['max_batch_size_seen']} decoded together\n"
        f"  exact match over HTTP: base [bold]{result['base_exact_match']:.0%}[/], "
        f"with the adapter [bold]{result['adapter_exact_match']:.0%}[/]\n"
        f"  e.g. {prompts[0][0].strip()!r} -> {tuned_answers[0].strip()!r} (expected {prompts[0][1]!r})",
        highlight=False,
    )
    console.print(
        "  serve it yourself: llmopt serve --config jobs/configs/tiny-llama-reverse.yaml "
        f"serving.adapters.reverse={run_dir}",
        highlight=False,
    )
    return result


if __name__ == "__main__":
    from llmopt.processes import ray_session

    # Ctrl-C or SIGTERM at any step ends the demo within seconds, its cluster and server with it.
    with ray_session("llmopt demo"):
        main()
