"""Held-out evaluation: exact match of greedy completions and the response-token loss."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from llmopt.data._tokenize import encode_example, encode_prompt, pad_batch, render


@dataclass
class EvalResult:
    """Evaluation figures of one model on one split (or on one shard of it)."""

    exact_match: float
    loss: float
    num_examples: int
    num_correct: int
    samples: list[dict[str, str]]
    loss_tokens: int = 0  # response tokens behind `loss`, to combine the results of several shards

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize_answer(text: str) -> str:
    """The comparison form of an answer: surrounding whitespace removed."""
    return text.strip()


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def response_loss_sum(
    model,
    tokenizer,
    rows,
    prompt_template: str,
    max_length: int,
    batch_size: int = 16,
    num_real: int | None = None,
) -> tuple[float, int]:
    """Summed cross-entropy over response tokens (prompt tokens masked) and the token count.

    Rows past `num_real` are computed (so every rank runs the same forward passes, as ZeRO-3 needs)
    but not counted.
    """
    num_real = len(rows) if num_real is None else num_real
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        encoded = [encode_example(r, tokenizer, prompt_template, max_length) for r in chunk]
        batch = {k: v.to(device) for k, v in pad_batch(encoded, _pad_id(tokenizer)).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        # Prompt tuning returns logits for its virtual tokens first; the sequence's own are the last ones.
        logits = logits[:, -batch["input_ids"].shape[1] :]
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:].clone()
        shift_labels[max(0, num_real - start) :] = -100  # rows that only pad an uneven shard
        losses = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="sum"
        )
        total += losses.item()
        count += int((shift_labels != -100).sum())
    return total, count


def response_loss(
    model, tokenizer, rows, prompt_template: str, max_length: int, batch_size: int = 16
) -> float:
    """Mean cross-entropy per response token (prompt tokens masked), over all rows."""
    total, count = response_loss_sum(model, tokenizer, rows, prompt_template, max_length, batch_size)
    return total / max(count, 1)


@torch.no_grad()
def generate_greedy(
    model, tokenizer, prompts: list[str], max_new_tokens: int, **generate_kwargs
) -> list[str]:
    """Greedy completions of rendered prompts, batched with left padding.

    `generate_kwargs` go to `model.generate` (e.g. `synced_gpus=True` under ZeRO-3).
    """
    if _prompt_learning(model):
        return _greedy_recomputed(model, tokenizer, prompts, max_new_tokens)
    encoded = [
        {"input_ids": ids, "attention_mask": [1] * len(ids)}
        for ids in (encode_prompt(p, tokenizer) for p in prompts)
    ]
    batch = pad_batch(encoded, _pad_id(tokenizer), padding_side="left")
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=_pad_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        **generate_kwargs,
    )
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _greedy_recomputed(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of a prompt or prefix tuning model by whole forward passes, one per new token.

    peft 0.21's `generate` for prompt learning disagrees with its own forward under transformers 5 (the
    cached steps, and for prefix tuning the first token, differ from recomputing the sequence), so the
    held-out exact match would not measure the trained model. Rows are right-padded so that every row's
    tokens follow the virtual tokens at the positions peft trains them at (it ignores `position_ids`), and
    every call runs `max_new_tokens` forwards (ranks under ZeRO-3 must run the same number).
    """
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    device = next(model.parameters()).device
    rows = [encode_prompt(p, tokenizer) for p in prompts]
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for _ in range(max_new_tokens):
        seqs = [r + n for r, n in zip(rows, new, strict=True)]
        batch = pad_batch([{"input_ids": s, "attention_mask": [1] * len(s)} for s in seqs], pad)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        offset = logits.shape[1] - batch["input_ids"].shape[1]  # prompt tuning's virtual positions first
        for i, seq in enumerate(seqs):
            if not done[i]:
                token = int(logits[i, offset + len(seq) - 1].argmax())
                new[i].append(token)
                done[i] = token == eos
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def evaluate(
    model,
    tokenizer,
    rows: list[dict[str, Any]],
    prompt_template: str,
    max_length: int,
    batch_size: int = 32,
    num_samples: int = 5,
    num_real: int | None = None,
    **generate_kwargs,
) -> EvalResult:
    """Exact match and response loss of `model` on `rows`.

    Args:
        model: A causal LM (any device); put in eval mode here and restored after.
        tokenizer: Its tokenizer.
        rows: Prompt/response or chat rows.
        prompt_template: Template for prompt/response rows.
        max_length: Longest sequence in tokens.
        batch_size: Rows per forward / generate call.
        num_samples: Completions kept in the result for a human to read.
        num_real: Count only the first `num_real` rows (the rest pad an uneven distributed shard).
        **generate_kwargs: Passed to `model.generate`.

    Returns:
        The evaluation result.
    """
    was_training = model.training
    model.eval()
    try:
        num_real = len(rows) if num_real is None else num_real
        rendered = [render(r, tokenizer, prompt_template) for r in rows]
        longest_answer = max(len(tokenizer.encode(resp, add_special_tokens=False)) for _, resp in rendered)
        correct, samples = 0, []
        for start in range(0, len(rendered), batch_size):
            chunk = rendered[start : start + batch_size]
            prompts = [p for p, _ in chunk]
            completions = generate_greedy(model, tokenizer, prompts, longest_answer + 2, **generate_kwargs)
            for index, ((prompt, expected), got) in enumerate(zip(chunk, completions, strict=True), start):
                if index >= num_real:
                    break
                correct += normalize_answer(got) == normalize_answer(expected)
                if len(samples) < num_samples:
                    samples.append({"prompt": prompt, "expected": expected, "completion": got})
        total, tokens = response_loss_sum(
            model, tokenizer, rows, prompt_template, max_length, batch_size, num_real
        )
    finally:
        model.train(was_training)
    return EvalResult(correct / max(num_real, 1), total / max(tokens, 1), num_real, correct, samples, tokens)
