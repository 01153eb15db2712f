"""The fine-tuning benchmark (`python -m jobs.benchmark train`): strategies, checkpointing, ZeRO stages, one
against two workers, and a plain torch loop as the reference; JSON and a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llmopt.config import load_config

# Shared by every case: tiny dense preset, packed sequences, fp32, one CPU (one thread) per worker.
COMMON = [
    "model.name_or_path=tiny-llama",
    "data.packing=true",
    "data.max_eval_samples=8",
    "training.lr=1e-3",
    "training.warmup_steps=0",
    "training.log_every_steps=5",
    "resources.cpus_per_worker=1",
    "lora.r=8",
    "lora.alpha=16",
]
SEQ = ["model.max_seq_len=512", "training.micro_batch_size=4"]


def train_cases(long_seq: int) -> list[dict[str, Any]]:
    """The `train` benchmark's cases: group, label, overrides, and whether it is the plain torch loop."""
    long = [f"model.max_seq_len={long_seq}", "training.micro_batch_size=4"]
    one = ["parallelism.num_workers=1", "parallelism.zero_stage=0"]
    cases = [
        ("method", "full fine-tune", [*SEQ, *one, "lora.enabled=false"], False),
        ("method", "LoRA", [*SEQ, *one], False),
        ("method", "QLoRA nf4", [*SEQ, *one, "quantization.mode=nf4"], False),
        ("method", "plain torch, full", [*SEQ, "lora.enabled=false"], True),
        ("method", "plain torch, LoRA", SEQ, True),
        ("checkpointing", "off", [*long, *one, "checkpointing.policy=none"], False),
        ("checkpointing", "uniform k=1", [*long, *one, "checkpointing.policy=uniform"], False),
        ("checkpointing", "memory budget", [*long, *one, "checkpointing.policy=memory_budget"], False),
        ("workers", "1 worker", [*SEQ, "parallelism.num_workers=1", "parallelism.zero_stage=2"], False),
        ("workers", "2 workers", [*SEQ, "parallelism.num_workers=2", "parallelism.zero_stage=2"], False),
    ]
    for stage in range(4):
        full2 = [*SEQ, "lora.enabled=false", "parallelism.num_workers=2", f"parallelism.zero_stage={stage}"]
        cases.append(("zero", f"ZeRO-{stage}", full2, False))
    return [{"group": g, "label": label, "overrides": o, "plain": p} for g, label, o, p in cases]


def _budget_gb(overrides: list[str]) -> float:
    """Half of the un-checkpointed saved activations of one micro-batch of this case's strategy.

    Measured in this process the way the worker's memory-budget plan measures (llmopt.train.prepare:
    the longest sequence, scaled by the micro-batch size).
    """
    import torch

    from llmopt.data import pad_batch
    from llmopt.train import prepare
    from llmopt.train._checkpointing import measure_layer_activations

    config = load_config(None, [*COMMON, *(o for o in overrides if not o.startswith("checkpointing."))])
    micro = config.training.micro_batch_size
    tokenizer, model, _, examples, _ = prepare(config, micro)
    longest = max(examples, key=lambda e: len(e["input_ids"]))
    with torch.enable_grad():
        per_layer, _inputs, outside = measure_layer_activations(
            model, pad_batch([longest], tokenizer.pad_token_id)
        )
    return 0.5 * micro * (sum(per_layer) + outside) / 2**30


def _run_case(case: dict[str, Any], steps: int, out: Path) -> dict[str, Any]:
    import ray

    from llmopt.train import finetune
    from llmopt.train._reference import plain_torch_train

    name = f"{case['group']}-{case['label']}".replace(" ", "_").replace(",", "").replace("=", "")
    overrides = [
        *COMMON,
        *case["overrides"],
        f"training.max_steps={steps}",
        f"name={name}",
        f"output_dir={out}",
    ]
    if "checkpointing.policy=memory_budget" in overrides:
        overrides.append(f"checkpointing.memory_budget_gb={_budget_gb(case['overrides']):.4f}")
    config = load_config(None, overrides)
    start = time.perf_counter()
    if case["plain"]:
        task = ray.remote(num_cpus=config.resources.cpus_per_worker, max_calls=1)(plain_torch_train)
        m = ray.get(task.remote(config, steps))
        final_loss, step_time = m["losses"][-1], m["step_time_s"]
    else:
        result = finetune(config, progress=False)
        if not result.ok:
            return {**case, "error": result.error}
        m = result.metrics
        final_loss = m["step_loss"]
        times = [r["step_time_s"] for r in result.history[1:]] or [m["step_time_s"]]
        step_time = statistics.median(times)
    return {
        **case,
        "tokens_per_s": m["throughput_tokens_per_s"],
        "step_time_s": step_time,
        "peak_memory_bytes": m["peak_memory_bytes"],
        "peak_memory_over_setup_bytes": m["peak_memory_over_setup_bytes"],
        "trainable_parameters": m["trainable_parameters"],
        "total_parameters": m["total_parameters"],
        "checkpointed_layers": m["checkpointed_layers"],
        "final_loss": final_loss,
        "wall_s": time.perf_counter() - start,
        "config": config.model_dump(mode="json"),
    }


def _find(results, group, label):
    return next(
        (r for r in results if r["group"] == group and r["label"] == label and "error" not in r), None
    )


def train_figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline training figures, from the measured cases (missing cases are skipped)."""
    figures: dict[str, Any] = {}
    lora = _find(results, "method", "LoRA") or _find(results, "workers", "1 worker")
    if lora:
        figures["lora_trainable_fraction"] = lora["trainable_parameters"] / lora["total_parameters"]
    off, on = _find(results, "checkpointing", "off"), _find(results, "checkpointing", "uniform k=1")
    if off and on:
        figures["checkpointing_peak_memory_reduction"] = (
            1 - on["peak_memory_bytes"] / off["peak_memory_bytes"]
        )
        figures["checkpointing_peak_memory_over_setup_reduction"] = 1 - (
            on["peak_memory_over_setup_bytes"] / max(1, off["peak_memory_over_setup_bytes"])
        )
        # Both cases train the same tokens per step, so the throughput ratio is the step-time ratio over
        # every step after the first (the reported windows' median is noisier).
        figures["checkpointing_step_time_ratio"] = off["tokens_per_s"] / on["tokens_per_s"]
    budget = _find(results, "checkpointing", "memory budget")
    if off and budget:
        figures["memory_budget_peak_memory_reduction"] = (
            1 - budget["peak_memory_bytes"] / off["peak_memory_bytes"]
        )
        figures["memory_budget_checkpointed_layers"] = budget["checkpointed_layers"]
    plain = _find(results, "method", "plain torch, LoRA")
    if lora and plain:
        figures["ray_deepspeed_1_worker_vs_plain_torch"] = lora["tokens_per_s"] / plain["tokens_per_s"]
    full, plain_full = (
        _find(results, "method", "full fine-tune"),
        _find(results, "method", "plain torch, full"),
    )
    if full and plain_full:
        figures["ray_deepspeed_1_worker_vs_plain_torch_full"] = (
            full["tokens_per_s"] / plain_full["tokens_per_s"]
        )
    one, two = _find(results, "workers", "1 worker"), _find(results, "workers", "2 workers")
    if one and two:
        figures["two_workers_speedup"] = two["tokens_per_s"] / one["tokens_per_s"]
    return figures


def plot_train(results: list[dict[str, Any]], path: Path) -> None:
    """Tokens/s and peak memory per case, one row of bars per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    groups = list(dict.fromkeys(r["group"] for r in ok))
    titles = {
        "method": "method (1 worker, seq 512)",
        "checkpointing": "checkpointing (LoRA, 1 worker, long sequences)",
        "workers": "workers (LoRA, ZeRO-2)",
        "zero": "ZeRO stage (full fine-tune, 2 workers)",
    }
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 2.6 * len(groups)), squeeze=False)
    for row, group in enumerate(groups):
        cases = [r for r in ok if r["group"] == group]
        labels = [r["label"] for r in cases]
        colors = ["tab:gray" if r["plain"] else "tab:blue" for r in cases]
        axes[row][0].barh(labels, [r["tokens_per_s"] for r in cases], color=colors)
        axes[row][0].set_title(f"{titles.get(group, group)}: tokens/s")
        axes[row][1].barh(labels, [r["peak_memory_bytes"] / 2**20 for r in cases], color=colors)
        axes[row][1].set_title(f"{titles.get(group, group)}: peak memory per worker, MiB")
        for ax in axes[row]:
            ax.grid(axis="x", alpha=0.3)
            ax.invert_yaxis()
    fig.suptitle("llmopt train benchmark (tiny-llama, fp32, 1 CPU thread per worker; grey: plain torch)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    from llmopt.cluster import init_ray

    init_ray()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = train_cases(args.long_seq)
    if args.quick:
        cases = [c for c in cases if c["label"] in ("LoRA", "plain torch, LoRA")]
    console = Console()
    results = []
    for case in cases:
        console.print(f"[bold]{case['group']}[/] / {case['label']} ...", highlight=False)
        try:
            results.append(_run_case(case, args.steps, out / "runs"))
        except Exception as exc:  # one broken case must not lose the others' measurements
            results.append({**case, "error": f"{type(exc).__name__}: {exc}"})
        last = results[-1]
        if "error" in last:
            console.print(f"  [red]failed:[/] {last['error'][:300]}", highlight=False)
        else:
            console.print(
                f"  {last['tokens_per_s']:.0f} tokens/s, peak {last['peak_memory_bytes'] / 2**20:.0f} MiB",
                highlight=False,
            )
    figures = train_figures(results)
    report = {
        "benchmark": "train",
        "machine": {
            "cpus": __import__("os").cpu_count(),
            "python": platform.python_version(),
            "torch": __import__("torch").__version__,
            "processor": platform.processor(),
        },
        "steps": args.steps,
        "long_seq": args.long_seq,
        "cases": results,
        "figures": figures,
    }
    (out / "train.json").write_text(json.dumps(report, indent=2))
    plot_train(results, out / "train.png")
    table = Table("group", "case", "tokens/s", "step s", "peak MiB", "over setup MiB", "trainable", "loss")
    for r in results:
        if "error" in r:
            table.add_row(r["group"], r["label"], "failed", "", "", "", "", "")
            continue
        table.add_row(
            r["group"],
            r["label"],
            f"{r['tokens_per_s']:.0f}",
            f"{r['step_time_s']:.2f}",
            f"{r['peak_memory_bytes'] / 2**20:.0f}",
            f"{r['peak_memory_over_setup_bytes'] / 2**20:.0f}",
            f"{r['trainable_parameters']:,}",
            f"{r['final_loss']:.3f}",
        )
    console.print(table)
    for key, value in figures.items():
        console.print(
            f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}", highlight=False
        )
    console.print(f"written: {out / 'train.json'}, {out / 'train.png'}", highlight=False)
    return report
