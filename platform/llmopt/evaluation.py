"""Evaluate the model of a run config on its held-out split (used by `llmopt eval` and jobs.evaluate)."""

from __future__ import annotations

import time

import torch

from llmopt.config import RunConfig
from llmopt.data import EvalResult, evaluate, load_rows
from llmopt.models import load_model, load_tokenizer

__all__ = ["evaluate_config"]


def evaluate_config(
    config: RunConfig,
    split: str | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[EvalResult, float]:
    """Load the config's model and tokenizer and evaluate them on a split (default: the held-out one).

    Args:
        config: The run config.
        split: The split (default: `data.eval_split`).
        batch_size: Rows per forward and generate call.
        device: Where the model computes: fp32 on CPU, bf16 on a GPU that has it (else fp32).

    Returns:
        The result and the seconds the evaluation took (loading excluded).
    """
    from llmopt.devices import bf16_supported

    tokenizer = load_tokenizer(config.model)
    dtype = "bf16" if bf16_supported(device) else "fp32"
    model = load_model(config.model, dtype=dtype, device=device)
    rows = load_rows(
        config.data.dataset, split or config.data.eval_split, config.data.format, config.data.max_eval_samples
    )
    start = time.perf_counter()
    result = evaluate(
        model, tokenizer, rows, config.data.prompt_template, config.model.max_seq_len, batch_size
    )
    return result, time.perf_counter() - start
