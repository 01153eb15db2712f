"""``python -m jobs.benchmark compress``: the seed's compression comparison, measured on one task model.

The task model is a LoRA fine-tune of the shipped config (``jobs/configs/tiny-llama-reverse.yaml``; or
``--run`` a finished LoRA run), merged into its base: **lora-merged**. Every other variant compresses that
model, so held-out quality compares like with like; **original** is the base preset before fine-tuning (its
size and speed are the uncompressed ones, its quality the untrained one):

- **int8-dynamic**: torch's dynamic quantization (int8 weights, activations quantized per batch);
- **nf4**: bitsandbytes 4-bit NF4 weights (its CPU backend here, CUDA kernels on a GPU);
- **pruned50**: 50% unstructured magnitude pruning of the decoder's linear layers (`llmopt prune`);
- **pruned50-recovered**: the same, then `--recover-steps` LoRA steps on the task data, merged, re-masked.

Measured per variant, in this process, one after another: weight bytes on disk and in memory, held-out exact
match and loss (the config's test split), prefill latency p50/p95/p99 at each input length (one sequence,
`--repeats` times), decode latency per token p50/p95/p99 (one sequence, `--decode-tokens` steps with the KV
cache after a 128-token prompt, `--repeats` times) and the tokens/s both give. Writes compress.json and
compress.png (a table and the plots).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

LENGTHS = (64, 128, 256, 512, 1024)


def add_compress_parser(sub) -> None:
    """Register the `compress` subcommand on the benchmark's subparsers."""
    parser = sub.add_parser(
        "compress", help="Original, int8, nf4, pruned (with and without recovery), merged."
    )
    parser.add_argument("--config", default="jobs/configs/tiny-llama-reverse.yaml", help="Run config YAML.")
    parser.add_argument("--run", default=None, help="A finished LoRA run to start from (default: train one).")
    parser.add_argument("--recover-steps", type=int, default=60, help="LoRA recovery steps after pruning.")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="Prefill input lengths.")
    parser.add_argument("--repeats", type=int, default=10, help="Timed repeats per length.")
    parser.add_argument("--decode-tokens", type=int, default=32, help="Decode steps per timed repeat.")
    parser.add_argument("--eval-samples", type=int, default=200, help="Held-out rows.")
    parser.add_argument("--out", default="outputs/benchmark", help="Output directory.")
    parser.add_argument("--quick", action="store_true", help="Few steps, lengths 64 and 128, 16 rows.")


def run_compress(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch
    from rich.console import Console

    from llmopt.config import load_config
    from llmopt.models import load_tokenizer, merge_adapter
    from llmopt.train import finetune, prune_to_directory

    console = Console()
    if args.quick:
        args.lengths, args.repeats, args.decode_tokens, args.eval_samples = "64,128", 3, 8, 16
        args.recover_steps = min(args.recover_steps, 4)
    lengths = [int(x) for x in str(args.lengths).split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = (
        ["training.max_steps=6", "training.eval_every_steps=6", "training.warmup_steps=0"]
        if args.quick
        else []
    )
    config = load_config(args.config, [f"output_dir={out / 'compress-runs'}", *extra])
    tokenizer = load_tokenizer(config.model)
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="llmopt-compress-", dir=out))
    try:
        if args.run:
            run_dir = Path(args.run)
        else:
            console.print("training the task model (LoRA on the shipped task) ...")
            result = finetune(config, progress=False)
            if not result.ok:
                raise SystemExit(f"the task model's fine-tune failed: {result.error}")
            run_dir = result.run_dir
        merged = run_dir / "merged" if (run_dir / "merged" / "config.json").is_file() else None
        merged = merged or merge_adapter(run_dir, work / "lora-merged")
        task = config.model_copy(
            update={"model": config.model.model_copy(update={"name_or_path": str(merged)})}
        )
        console.print("pruning the task model, with and without recovery ...")
        pruned, _ = prune_to_directory(task, 0.5, output=work / "pruned50")
        recovered, recovery = prune_to_directory(
            task.model_copy(update={"name": f"{config.name}-compress"}),
            0.5,
            output=work / "pruned50-recovered",
            recover_steps=args.recover_steps,
        )
    finally:
        if started:
            ray.shutdown()
    variants = {
        "original": (config.model.name_or_path, "fp32"),
        "lora-merged": (str(merged), "fp32"),
        "int8-dynamic": (str(merged), "int8"),
        "nf4": (str(merged), "nf4"),
        "pruned50": (str(pruned), "fp32"),
        "pruned50-recovered": (str(recovered), "fp32"),
    }
    rows = []
    torch.manual_seed(0)
    for name, (path, mode) in variants.items():
        console.print(f"measuring {name} ...")
        rows.append(
            {
                "variant": name,
                "path": path,
                "mode": mode,
                **_measure(config, path, mode, tokenizer, lengths, args, work),
            }
        )
    report = {
        "benchmark": "compress",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "task_run": str(run_dir),
        "recovery": recovery["recovery"],
        "variants": rows,
    }
    (out / "compress.json").write_text(json.dumps(report, indent=2))
    _print(console, rows, lengths)
    _plot(rows, lengths, out / "compress.png")
    console.print(f"wrote {out / 'compress.json'} and {out / 'compress.png'}")
    return report


def _load(path: str, mode: str):
    """A variant's model: fp32, torch's dynamic int8, or bitsandbytes nf4 (from the same directory)."""
    import warnings

    import torch

    from llmopt.models import load_model

    if mode == "fp32":
        return load_model(path).eval()
    if mode == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's eager API is deprecated for torchao (no CPU wheel)
            return torch.ao.quantization.quantize_dynamic(
                load_model(path).eval(), {torch.nn.Linear}, dtype=torch.qint8
            )
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = load_model(path, quantization_config=quant, device_map={"": "cpu"}).eval()
    for module in model.modules():  # as llmopt.serve loads it: the plain CPU kernel serves every shape
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _memory_bytes(model) -> int:
    """Bytes of the weights as held: parameters and buffers at their storage dtype, int8 packed weights."""
    import torch

    total, seen = 0, set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
            state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: its absmax and code too
            if state is not None:
                total += sum(
                    t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None
                )
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += weight.numel() * weight.element_size() + (bias.numel() * 4 if bias is not None else 0)
            total += weight.q_per_channel_scales().numel() * 12 if weight.qscheme() in (
                torch.per_channel_affine, torch.per_channel_symmetric) else 12  # fmt: skip
    return total


def _disk_bytes(model, path: str, mode: str, work: Path) -> int:
    """Weight bytes on disk: the directory's weight files (fp32), or the variant saved the way it loads."""
    import torch

    if mode == "int8":
        target = work / "int8.pt"
        torch.save(model.state_dict(), target)
        return target.stat().st_size
    if mode == "nf4":
        target = work / "nf4"
        model.save_pretrained(target)
        return sum(f.stat().st_size for f in target.glob("*.safetensors"))
    from llmopt.models import resolve_model_path

    folder = Path(resolve_model_path(path))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) or sum(
        f.stat().st_size for f in folder.glob("*.bin")
    )


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * pick(0.95),
        "p99_ms": 1000 * pick(0.99),
    }


def _measure(config, path: str, mode: str, tokenizer, lengths: list[int], args, work: Path) -> dict[str, Any]:
    import torch
    from transformers import DynamicCache

    from llmopt.data import load_rows
    from llmopt.data._evaluate import evaluate

    model = _load(path, mode)
    data = config.data
    rows = load_rows(data.dataset, data.eval_split, data.format, args.eval_samples)
    quality = evaluate(model, tokenizer, rows, data.prompt_template, config.model.max_seq_len, batch_size=32)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefill = {}
    with torch.no_grad():
        for length in lengths:
            ids = torch.randint(5, vocab, (1, length), generator=generator)
            model(input_ids=ids[:, :8], use_cache=False)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(input_ids=ids, use_cache=True, past_key_values=DynamicCache())
                times.append(time.perf_counter() - start)
            point = _percentiles(times)
            prefill[str(length)] = {**point, "tokens_per_s": length / (point["p50_ms"] / 1000)}
        steps = []
        prompt = torch.randint(5, vocab, (1, 128), generator=generator)
        for _ in range(args.repeats):
            cache = DynamicCache()
            out = model(input_ids=prompt, use_cache=True, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
            for _ in range(args.decode_tokens):
                start = time.perf_counter()
                out = model(input_ids=token, use_cache=True, past_key_values=cache)
                steps.append(time.perf_counter() - start)
                token = out.logits[:, -1:].argmax(-1)
    decode = _percentiles(steps)
    decode["tokens_per_s"] = len(steps) / sum(steps)
    result = {
        "disk_bytes": _disk_bytes(model, path, mode, work),
        "memory_bytes": _memory_bytes(model),
        "eval_exact_match": quality.exact_match,
        "eval_loss": quality.loss,
        "prefill": prefill,
        "decode": decode,
    }
    del model
    return result


def _print(console, rows: list[dict[str, Any]], lengths: list[int]) -> None:
    from rich.table import Table

    table = Table(title="compression on the shipped task (one sequence at a time)")
    prefills = [f"prefill {n} p50/p99 ms" for n in lengths]
    columns = [
        "variant",
        "disk MiB",
        "memory MiB",
        "exact match",
        "loss",
        *prefills,
        "decode p50/p99 ms",
        "decode tok/s",
    ]
    for column in columns:
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["variant"],
            f"{r['disk_bytes'] / 2**20:.2f}",
            f"{r['memory_bytes'] / 2**20:.2f}",
            f"{r['eval_exact_match']:.1%}",
            f"{r['eval_loss']:.3f}",
            *(f"{r['prefill'][str(n)]['p50_ms']:.1f}/{r['prefill'][str(n)]['p99_ms']:.1f}" for n in lengths),
            f"{r['decode']['p50_ms']:.2f}/{r['decode']['p99_ms']:.2f}",
            f"{r['decode']['tokens_per_s']:.0f}",
        )
    console.print(table)


def _plot(rows: list[dict[str, Any]], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig = plt.figure(figsize=(15, 9))
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.2])
    table_ax = fig.add_subplot(grid[0, :])
    table_ax.axis("off")
    cells = [
        [r["variant"], f"{r['disk_bytes'] / 2**20:.2f}", f"{r['memory_bytes'] / 2**20:.2f}",
         f"{r['eval_exact_match']:.1%}", f"{r['eval_loss']:.3f}",
         f"{r['prefill'][str(lengths[-1])]['p50_ms']:.1f}", f"{r['decode']['p50_ms']:.2f}",
         f"{r['decode']['tokens_per_s']:.0f}"]
        for r in rows
    ]  # fmt: skip
    header = ["variant", "disk MiB", "memory MiB", "exact match", "held-out loss",
              f"prefill {lengths[-1]} p50 ms", "decode p50 ms", "decode tok/s"]  # fmt: skip
    table = table_ax.table(cellText=cells, colLabels=header, loc="center")
    table.scale(1, 1.5)
    ax = fig.add_subplot(grid[1, 0])
    ax.bar(names, [r["memory_bytes"] / 2**20 for r in rows], color="#4C72B0", label="memory")
    ax.bar(names, [r["disk_bytes"] / 2**20 for r in rows], color="none", edgecolor="black", label="disk")
    ax.set_title("weights, MiB")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=45)
    ax = fig.add_subplot(grid[1, 1])
    for r in rows:
        ax.plot(lengths, [r["prefill"][str(n)]["p50_ms"] for n in lengths], "o-", label=r["variant"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("input tokens")
    ax.set_title("prefill latency p50, ms")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, 2])
    ax.bar(names, [r["decode"]["tokens_per_s"] for r in rows], color="#55A868")
    ax.set_title("decode tokens/s (one sequence)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
