"""``python -m jobs.benchmark peft``: every peft method on the shipped task, at the same token budget.

Each method is a real ``llmopt.train.finetune`` run (Ray Train + DeepSpeed, fresh workers) of the shipped
config (``jobs/configs/tiny-llama-reverse.yaml`` by default) with only ``lora.method`` changed, and with
gradient checkpointing off for all (prefix tuning cannot checkpoint), so every method sees the same steps,
micro-batches and learning rate: the same token budget. Reported per method: trainable parameters and their
share (the shipped config also trains the output head of its random-weight preset; the adapter's own
parameters are given apart), training tokens/s, peak memory, held-out loss and exact match, and the cost
model's predicted tokens/s (with this machine's cached calibration, when there is one) and trainable
parameters for the same config. Prints a table and writes
peft.json and peft.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

METHODS = ("lora", "dora", "ia3", "loha", "lokr", "prompt_tuning", "prefix_tuning")


def add_peft_parser(sub) -> None:
    """Register the `peft` subcommand on the benchmark's subparsers."""
    parser = sub.add_parser("peft", help="Every peft method on the shipped task at the same token budget.")
    parser.add_argument("--config", default="jobs/configs/tiny-llama-reverse.yaml", help="Run config YAML.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated lora.method values.")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps (default: the config's).")
    parser.add_argument("--override", action="append", default=[], help="Extra a.b=value config overrides.")
    parser.add_argument("--out", default="outputs/benchmark", help="Output directory.")
    parser.add_argument("--quick", action="store_true", help="lora and prompt_tuning, 6 steps each.")


def run_peft(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from rich.console import Console

    from llmopt.config import load_config
    from llmopt.train import finetune
    from llmopt.tune import CostModel, Hardware, load_calibration, model_shape

    console = Console()
    methods = ["lora", "prompt_tuning"] if args.quick else [m.strip() for m in args.methods.split(",")]
    steps = 6 if args.quick else args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["checkpointing.policy=none", f"output_dir={out / 'peft-runs'}", *args.override]
    if steps is not None:
        common += [f"training.max_steps={steps}", f"training.eval_every_steps={steps}"]
        common += ["training.warmup_steps=0"] if args.quick else []
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    rows: list[dict[str, Any]] = []
    hardware = Hardware.detect()
    try:
        for method in methods:
            config = load_config(args.config, [*common, f"lora.method={method}", f"name=peft-{method}"])
            shape = model_shape(config.model.name_or_path)
            # The machine's cached calibration when `llmopt recommend --calibrate` made one, else defaults.
            calibration = load_calibration(config.model.name_or_path, hardware)
            cost = CostModel(shape, hardware, calibration.coefficients if calibration else None)
            count = cost.lora(config, shape)
            predicted = cost.predict(config)
            began = time.perf_counter()
            result = finetune(config, progress=False)
            if not result.ok:
                raise RuntimeError(f"{method}: {result.error}")
            m = result.metrics
            rows.append(
                {
                    "method": method,
                    "trainable_parameters": m["trainable_parameters"],
                    "total_parameters": m["total_parameters"],
                    "trainable_fraction": m["trainable_fraction"],
                    "adapter_parameters": count.adapter_params,
                    "adapter_fraction": count.adapter_params / m["total_parameters"],
                    "predicted_trainable_parameters": count.trainable,
                    "tokens_per_s": m["throughput_tokens_per_s"],
                    "predicted_tokens_per_s": predicted.tokens_per_s,
                    "peak_memory_bytes": m["peak_memory_bytes"],
                    "eval_loss": m["eval_loss"],
                    "eval_exact_match": m["eval_exact_match"],
                    "final_train_loss": m["loss"],
                    "steps": m["step"],
                    "seconds": time.perf_counter() - began,
                    "run_dir": str(result.run_dir),
                }
            )
    finally:
        if started:
            ray.shutdown()
    report = {
        "benchmark": "peft",
        "config": args.config,
        "overrides": common,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "methods": rows,
    }
    (out / "peft.json").write_text(json.dumps(report, indent=2))
    _plot(rows, out / "peft.png")
    _print(console, rows)
    console.print(f"wrote {out / 'peft.json'} and {out / 'peft.png'}")
    return report


def _print(console, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="peft methods at the same token budget")
    for column in (
        "method", "trainable (share)", "adapter only", "tokens/s (predicted)", "peak MiB", "held-out loss",
        "exact match",
    ):  # fmt: skip
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["method"],
            f"{r['trainable_parameters']:,} ({r['trainable_fraction']:.2%})",
            f"{r['adapter_parameters']:,} ({r['adapter_fraction']:.3%})",
            f"{r['tokens_per_s']:,.0f} ({r['predicted_tokens_per_s']:,.0f})",
            f"{r['peak_memory_bytes'] / 2**20:,.0f}",
            f"{r['eval_loss']:.4f}",
            f"{r['eval_exact_match']:.1%}",
        )
    console.print(table)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (
        ("adapter parameters (share of the model, %)", [100 * r["adapter_fraction"] for r in rows]),
        ("training tokens/s (measured)", [r["tokens_per_s"] for r in rows]),
        ("held-out loss after the same tokens", [r["eval_loss"] for r in rows]),
    )
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.bar(names, values, color="#4C72B0")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=45)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.3g}", ha="center", va="bottom", fontsize=8)
    axes[1].scatter(
        names, [r["predicted_tokens_per_s"] for r in rows], color="#DD8452", zorder=3, label="predicted"
    )
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
