"""Serving precision cases of ``python -m jobs.benchmark serve``: speed and quality per weight format.

Each case loads the model exactly as a replica does (``llmopt.serve.load_serving_model``: fp32, bf16, or
int8 through torch dynamic quantization on CPU / bitsandbytes on GPU), decodes with the replica's engine at
batch 1 and batch 8 (one torch thread, as a 1-CPU replica) and computes the held-out response loss on the
shipped ``reverse`` test split, so the table shows what each format costs in quality for what it gains in
speed. Runs in a fresh Ray task per case so each case's memory and thread settings are its own.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from llmopt.config import load_config


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
def _precision_case(overrides: list[str], rows: int, new_tokens: int) -> dict[str, Any]:
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
        speed = {
            f"decode_tokens_per_s_batch{b}": _decode_tokens_per_s(
                GenerationEngine, model, tokenizer, b, 32, new_tokens
            )
            for b in (1, 8)
        }
    return {"load_s": load_s, "weight_bytes": weight_bytes, "heldout_loss": loss, **speed}


def precision_cases(presets: list[str], quick: bool) -> list[dict[str, Any]]:
    """fp32 / int8 / bf16 on each preset; bf16 only where it finishes in reasonable time on CPU."""
    rows, new_tokens = (16, 8) if quick else (64, 32)
    results = []
    for preset in presets:
        formats = [("fp32", "none"), ("int8", "int8")]
        if preset == "tiny-llama":
            formats.append(("bf16", "none"))  # ~300x slower matmuls on these CPUs: tiny preset only
        for label, quant in formats:
            precision = "fp32" if label in ("fp32", "int8") else label
            overrides = [
                f"model.name_or_path={preset}",
                "model.max_seq_len=128",
                f"serving.precision={precision}",
                f"serving.quantization={quant}",
            ]
            measured = ray.get(_precision_case.remote(overrides, rows, new_tokens))
            results.append({"preset": preset, "format": label, **measured})
    return results
