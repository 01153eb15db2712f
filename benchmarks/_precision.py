"""Out-of-server measurements of ``python -m jobs.benchmark serve``: the decode ceiling and precisions.

Memory bandwidth with the replica's thread count and the weight bytes one decode step reads give the
ceiling of batch-1 decoding (every weight is read once per token).

Serving precision: each case loads the model exactly as a replica does (``llmopt.serve.load_serving_model``:
fp32, bf16, or int8 through torch dynamic quantization on CPU / bitsandbytes on GPU), decodes with the
replica's engine at batch 1 and batch 8 (one torch thread, as a 1-CPU replica) and computes the held-out
response loss on the shipped ``reverse`` test split, so the table shows what each format costs in quality
for what it gains in speed. Runs in a fresh Ray task per case so each case's memory and thread settings are
its own.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import ray

from llmopt.config import load_config

HUGE_PAGE_RATES = (
    "sum_huge_pages_bytes_per_s",
    "gemv_huge_pages_bytes_per_s",
    "native_gemv_huge_pages_bytes_per_s",
)


def _best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_bandwidth(threads: int, megabytes: int, repeats: int = 5) -> dict[str, Any]:
    """Memory bandwidth with `threads` torch threads, best of `repeats`, in bytes/s.

    `copy` counts bytes read plus written by `dst.copy_(src)`; `sum`, `gemv` and `native_gemv` read the
    buffer once (a reduction, and a matrix-vector product over it as a matrix, what batch-1 decoding does
    per weight: torch's, and the native kernel's of `serving.decode_kernel`, None where it cannot build).
    The `*_huge_pages_*` rates read the same bytes from a buffer on 2 MiB pages (where the served weights
    are with the native kernel; None where transparent huge pages are off); the ceiling takes the highest.
    """
    import torch

    from llmopt.serve.native._kernels import (
        huge_page_empty,
        huge_pages_available,
        load_kernels,
        transparent_huge_pages,
    )

    torch.set_num_threads(threads)
    n = megabytes * 2**20 // 4
    cols = 4096
    src = torch.rand(n // cols, cols)
    dst = torch.empty_like(src)
    vec = torch.rand(cols)
    nbytes = src.numel() * 4

    best = functools.partial(_best_time, repeats=repeats)

    kernels, _ = load_kernels()
    gemv = kernels.gemv if kernels else None
    if kernels:  # the native GEMV splits large matrices over torch's threads, as in a replica
        kernels.follow_torch_threads()
    out = torch.empty(src.shape[0])

    def rates(matrix, suffix: str) -> dict[str, float | None]:
        args = (matrix.data_ptr(), vec.data_ptr(), None, out.data_ptr(), matrix.shape[0], cols)
        return {
            f"sum{suffix}_bytes_per_s": nbytes / best(lambda: matrix.sum()),
            f"gemv{suffix}_bytes_per_s": nbytes / best(lambda: torch.mv(matrix, vec)),
            f"native_gemv{suffix}_bytes_per_s": gemv and nbytes / best(lambda: gemv(*args)),
        }

    copy_rate = 2 * nbytes / best(functools.partial(dst.copy_, src))
    del dst
    result = {"threads": threads, "buffer_bytes": nbytes, "copy_bytes_per_s": copy_rate, **rates(src, "")}
    if huge_pages_available():
        on_huge_pages = huge_page_empty(src.numel()).view_as(src).copy_(src)
        del src
        result.update(rates(on_huge_pages, "_huge_pages"))
    else:
        result.update(dict.fromkeys(HUGE_PAGE_RATES, None))
    result["transparent_huge_pages"] = transparent_huge_pages()
    return result


def measure_matmul_ceiling(
    preset: str, threads: int, batch: int, prompt_tokens: int, output_tokens: int, repeats: int = 30
) -> dict[str, Any]:
    """Output tokens/s of `batch` concurrent requests if a replica ran nothing but the matrix products.

    Times, with `threads` torch threads and warm weights (best of `repeats`), the preset's products as a
    serving replica computes them (fp32, the native kernels where they build): one decode step of a full
    batch on `batch` rows (the lean step's fused q|k|v and gate|up products, where it runs), and one request's
    prefill on `prompt_tokens` rows (every projection; the output head on the last row only, as the engine
    computes it). A request costs its prefill and `output_tokens - 1` rows of decode steps, so the ceiling is
    ``output_tokens / (prefill + (output_tokens - 1) * step / batch)``: what continuous batching could reach
    with no attention, norms, sampling, Python or HTTP at all (the bound of figure (a), as the bandwidth
    ceiling is (b)'s).
    """
    import torch

    from llmopt.models import load_model
    from llmopt.serve.native._kernels import use_native_decode
    from llmopt.serve.native._lean_step import LlamaDecodeStep, unsupported_reason

    torch.set_num_threads(threads)
    model = load_model(preset).eval()
    _, kernel = use_native_decode(model)
    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    gen = torch.Generator().manual_seed(0)
    lean = LlamaDecodeStep(model) if unsupported_reason(model) is None else None

    def rows_of(weight: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.randn(rows, weight.shape[1], generator=gen)

    def prefill():
        inputs = [rows_of(m.weight, prompt_tokens) for m in layers]
        last = rows_of(head.weight, 1)

        def run() -> None:
            for m, x in zip(layers, inputs, strict=True):
                m(x)
            head(last)

        return run

    def decode_step():
        if lean is None:
            products = [(m.weight, m.bias) for m in layers]
        else:  # what the lean step multiplies: fused q|k|v, o, fused gate|up, down per layer
            products = []
            for fused, layer in zip(lean._fused, model.model.layers, strict=True):
                attn, mlp = layer.self_attn, layer.mlp
                products += [(fused.qkv, fused.qkv_bias), (attn.o_proj.weight, attn.o_proj.bias)]
                products += [(fused.gate_up, fused.gate_up_bias), (mlp.down_proj.weight, mlp.down_proj.bias)]
        products.append((head.weight, head.bias))
        inputs = [rows_of(w, batch) for w, _ in products]
        multiply = lean._linear if lean is not None else torch.nn.functional.linear

        def run() -> None:
            for (w, b), x in zip(products, inputs, strict=True):
                multiply(x, w, b)

        return run

    best = functools.partial(_best_time, repeats=repeats)

    with torch.no_grad():
        step_s = best(decode_step())
        prefill_s = best(prefill())
    params = sum(m.weight.numel() for m in layers)
    flops = 2 * (batch * (params + head.weight.numel()) + prompt_tokens * params + head.weight.numel())
    per_request_s = prefill_s + (output_tokens - 1) * step_s / batch
    return {
        "preset": preset,
        "threads": threads,
        "batch": batch,
        "kernel": kernel if lean is not None else f"torch ({kernel})",
        "decode_step_s": step_s,
        "prefill_s": prefill_s,
        "flops_per_s": flops / (step_s + prefill_s),
        "ceiling_tokens_per_s": output_tokens / per_request_s,
    }


def weight_bytes_per_token(preset: str) -> dict[str, Any]:
    """fp32 weight bytes one batch-1 decode step reads: every parameter except the input embedding
    table (a lookup reads one row), unless it is tied to the output head (which reads all of it)."""
    from llmopt.models import load_config_only, model_info

    info = model_info(preset)
    tied = bool(getattr(load_config_only(preset), "tie_word_embeddings", False))
    params = info.num_parameters - (0 if tied else info.embedding_parameters)
    return {
        "preset": preset,
        "num_parameters": info.num_parameters,
        "embedding_parameters": info.embedding_parameters,
        "tie_word_embeddings": tied,
        "bytes_per_token": 4 * params,
    }


# ------------------------------------------------------------------------------------------ deployments


def _decode_tokens_per_s(engine_cls, model, tokenizer, batch: int, prompt_len: int, new_tokens: int) -> float:
    from llmopt.serve import GenerationRequest, SamplingParams

    prompt = list(range(10, 10 + prompt_len))
    engine = engine_cls(model, tokenizer, max_batch_size=batch)
    for i in range(batch):
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        engine.add(GenerationRequest(f"r{i}", prompt, params))
    engine.step()  # prefill (and the first token) is not decode
    start, tokens = time.perf_counter(), 0
    while engine.has_work():
        tokens += len(engine.step())
    return tokens / (time.perf_counter() - start)


@ray.remote(num_cpus=1)
def _precision_case(overrides: list[str], rows: int, new_tokens: int, lean: bool = True) -> dict[str, Any]:
    import torch

    from llmopt.data import load_rows, response_loss
    from llmopt.models import load_tokenizer
    from llmopt.serve import GenerationEngine, load_serving_model

    torch.set_num_threads(1)
    config = load_config(None, overrides)
    tokenizer = load_tokenizer(config.model)
    start = time.perf_counter()
    model = load_serving_model(config)
    load_s = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    quantized = torch.ao.nn.quantized.dynamic.Linear
    for module in model.modules():  # dynamic-quantized Linear layers keep int8 weights outside parameters()
        if isinstance(module, quantized):
            bias = module.bias()
            weight_bytes += module.weight().int_repr().numel() + (bias.numel() * 4 if bias is not None else 0)
    held_out = load_rows(config.data.dataset, config.data.eval_split, limit=rows)
    with torch.no_grad():
        loss = response_loss(
            model, tokenizer, held_out, config.data.prompt_template, config.model.max_seq_len
        )
        engine_cls = functools.partial(GenerationEngine, lean_decode=lean)
        speed = {
            f"decode_tokens_per_s_batch{b}": _decode_tokens_per_s(
                engine_cls, model, tokenizer, b, 32, new_tokens
            )
            for b in (1, 8)
        }
    return {
        "load_s": load_s,
        "weight_bytes": weight_bytes,
        "heldout_loss": loss,
        "decode_kernel": model.decode_kernel,
        "decode_path": engine_cls(model, tokenizer).decode_path,
        **speed,
    }


def precision_cases(presets: list[str], quick: bool) -> list[dict[str, Any]]:
    """fp32 / int8 / bf16 on each preset, each case in a fresh single-CPU Ray task.

    bf16 runs on the tiny preset only: its matrix products are ~300x slower than fp32 on these CPUs.

    Args:
        presets: Model presets (or paths) to measure.
        quick: Fewer held-out rows and decode steps (a smoke run).

    Returns:
        One row per (preset, format): ``preset``, ``format``, ``load_s``, ``weight_bytes``, ``heldout_loss``,
        ``decode_kernel``, ``decode_path`` and ``decode_tokens_per_s_batch1`` / ``_batch8``. Needs Ray
        initialised.
    """
    rows, new_tokens = (16, 8) if quick else (64, 32)
    results = []
    for preset in presets:
        # (label, precision, quantization, decode kernel, lean step): fp32 three times, to show the gains of
        # serving.decode_kernel and of the engine's lean Llama decode step.
        formats = [
            ("fp32", "fp32", "none", "auto", True),
            ("fp32, transformers forward", "fp32", "none", "auto", False),
            ("fp32, torch GEMV", "fp32", "none", "torch", True),
            ("int8", "fp32", "int8", "auto", True),
        ]
        if preset == "tiny-llama":
            formats.append(("bf16", "bf16", "none", "auto", True))
        for label, precision, quant, kernel, lean in formats:
            overrides = [
                f"model.name_or_path={preset}",
                "model.max_seq_len=128",
                f"serving.precision={precision}",
                f"serving.quantization={quant}",
                f"serving.decode_kernel={kernel}",
            ]
            measured = ray.get(_precision_case.remote(overrides, rows, new_tokens, lean))
            results.append({"preset": preset, "format": label, **measured})
    return results


def _loss_change(row: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    """Held-out loss minus the same preset's fp32 loss."""
    ref = next((r for r in rows if r["preset"] == row["preset"] and r["format"] == "fp32"), None)
    return None if ref is None else row["heldout_loss"] - ref["heldout_loss"]


def precision_table(rows: list[dict[str, Any]]):
    """A rich table: format, weight MB, decode tokens/s at batch 1 and 8, held-out loss and its change."""
    from rich.table import Table

    table = Table(
        "preset", "format", "weights MB", "decode tok/s b1", "decode tok/s b8", "held-out loss", "vs fp32",
        title="serving precision (engine decode, 1 thread)",
    )  # fmt: skip
    for r in rows:
        change = _loss_change(r, rows)
        table.add_row(
            r["preset"], r["format"], f"{r['weight_bytes'] / 1e6:.1f}",
            f"{r['decode_tokens_per_s_batch1']:.1f}", f"{r['decode_tokens_per_s_batch8']:.1f}",
            f"{r['heldout_loss']:.4f}", "-" if change is None else f"{change:+.4f}",
        )  # fmt: skip
    return table


def plot_precision(ax, rows: list[dict[str, Any]]) -> None:
    """Decode tokens/s at batch 1 and 8 per (preset, format) on a log axis, held-out loss under each."""
    if not rows:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
        return
    xs = range(len(rows))
    for offset, batch in ((-0.2, 1), (0.2, 8)):
        values = [r[f"decode_tokens_per_s_batch{batch}"] for r in rows]
        ax.bar([x + offset for x in xs], values, width=0.4, label=f"batch {batch}")
    ax.set_yscale("log")
    labels = []
    for r in rows:
        change = _loss_change(r, rows)
        delta = "" if change is None or r["format"] == "fp32" else f" ({change:+.3f})"
        labels.append(f"{r['preset']}\n{r['format']}\nloss {r['heldout_loss']:.3f}{delta}")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_title("serving precision: engine decode tokens/s (held-out loss below)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
