"""Prompt templating, tokenization with prompt-label masking, padding and packing."""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


def render(row: dict[str, Any], tokenizer, prompt_template: str) -> tuple[str, str]:
    """Return (prompt text, response text) of a row.

    Prompt/response rows go through `prompt_template` (its `{prompt}` replaced); chat rows through the
    tokenizer's chat template with every message but the last, plus the generation prompt.
    """
    if "messages" in row:
        prompt = tokenizer.apply_chat_template(
            row["messages"][:-1], tokenize=False, add_generation_prompt=True
        )
        return prompt, row["messages"][-1]["content"]
    # str.replace rather than str.format: templates may contain other braces (JSON, code).
    return prompt_template.replace("{prompt}", row["prompt"]), row["response"]


def encode_prompt(prompt_text: str, tokenizer) -> list[int]:
    """Token ids of a rendered prompt, with BOS prepended unless the template already has it."""
    ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if bos is not None and not (tokenizer.bos_token and prompt_text.startswith(tokenizer.bos_token)):
        ids = [bos, *ids]
    return ids


def encode_example(
    row: dict[str, Any], tokenizer, prompt_template: str, max_length: int, mask_prompt: bool = True
) -> dict[str, list[int]]:
    """Tokenize one row for causal-LM training.

    The prompt and the response (followed by EOS) are tokenized separately, so the boundary is exact;
    with `mask_prompt` the prompt positions get label -100 and only the response is learned. Sequences
    longer than `max_length` are cut at the end.

    Returns:
        `input_ids`, `labels` and `attention_mask` lists of equal length.
    """
    prompt_text, response = render(row, tokenizer, prompt_template)
    prompt_ids = encode_prompt(prompt_text, tokenizer)
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if mask_prompt else list(prompt_ids)
    labels = (prompt_labels + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def pad_batch(
    examples: list[dict[str, list[int]]], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad encoded examples to the longest one and stack them into tensors.

    Padding positions get attention 0 and label -100. Examples that carry `position_ids` (packed
    blocks) keep them; padding there continues from 0.
    """
    longest = max(len(ex["input_ids"]) for ex in examples)
    fills = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}
    batch: dict[str, list[list[int]]] = {key: [] for key in examples[0] if key in fills}
    for ex in examples:
        missing = longest - len(ex["input_ids"])
        for key in batch:
            pad = [fills[key]] * missing
            batch[key].append(pad + ex[key] if padding_side == "left" else ex[key] + pad)
    return {key: torch.tensor(values, dtype=torch.long) for key, values in batch.items()}


def pack_examples(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedily pack encoded examples into blocks of at most `max_length` tokens.

    Each block carries `position_ids` that restart at 0 for every example, so positions match
    unpacked training. Attention is not blocked between examples of one block (as in the common
    constant-length packing); use `data.packing=false` where that matters. Examples longer than a
    block are cut.
    """
    blocks: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "attention_mask": [], "position_ids": []}
    for ex in examples:
        n = min(len(ex["input_ids"]), max_length)
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            blocks.append(current)
            current = {key: [] for key in current}
        current["input_ids"] += ex["input_ids"][:n]
        current["labels"] += ex["labels"][:n]
        current["attention_mask"] += [1] * n
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        blocks.append(current)
    return blocks
