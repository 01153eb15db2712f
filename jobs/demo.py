"""The main pipeline on the embedded default (what `make demo` runs).

    python -m jobs.demo
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.demo

It builds the model zoo (tiny dense and MoE presets, cached by content hash), validates every shipped
config and template, evaluates the untrained tiny model on the held-out split as a Ray task, then
fine-tunes it with LoRA on two Ray Train + DeepSpeed workers (jobs/configs/tiny-llama-reverse.yaml)
and reports the held-out exact match before and after, all on a local cluster started in-process.
The strategy search and serving join this pipeline as they land. A summary is written to
outputs/demo/summary.json; the run directory (adapter, metrics, loss curve) to runs/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jobs.evaluate import evaluate_on_ray
from llmopt.config import ConfigError, load_config, templates, validate_config
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

    out = REPO / "outputs" / "demo" / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    console.rule("Done")
    console.print(f"Summary written to {out.relative_to(REPO)}.", highlight=False)
    return summary


if __name__ == "__main__":
    main()
