"""A plain single-process PyTorch training loop: the reference Ray Train + DeepSpeed is measured against.

Same model, strategy, data order, optimizer, schedule and clipping as the worker loop, without Ray,
DeepSpeed or distributed collectives.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from llmopt.config import RunConfig
from llmopt.data import pad_batch
from llmopt.runtime import set_torch_threads
from llmopt.train._loop import lr_lambda, prepare
from llmopt.train._metrics import current_rss_bytes, peak_memory_bytes


def plain_torch_train(config: RunConfig, steps: int | None = None) -> dict[str, Any]:
    """Train in this process with a plain torch loop and return metrics like the Ray Train loop's.

    Args:
        config: The run config (fp32; one process, so parallelism settings are ignored).
        steps: Optimizer steps (default: training.max_steps).

    Returns:
        Losses per step, steady throughput (tokens/s from the second step on), mean step time,
        peak memory and trainable parameters.
    """
    threads = set_torch_threads(config.resources.cpus_per_worker)
    train = config.training
    steps = steps or train.max_steps or 10
    tokenizer, model, strategy, examples, plan = prepare(config, train.micro_batch_size)
    pad_id = tokenizer.pad_token_id
    sampler = DistributedSampler(
        examples, num_replicas=1, rank=0, shuffle=True, seed=train.seed, drop_last=True
    )
    loader = DataLoader(
        examples,
        batch_size=train.micro_batch_size,
        sampler=sampler,
        collate_fn=lambda b: pad_batch(b, pad_id),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(train.lr_scheduler, train.warmup_steps, steps)
    )
    model.train()
    setup_rss = current_rss_bytes()
    losses, step_times, tokens_after_first = [], [], 0
    batches = endless_batches(loader, sampler)
    for step in range(steps):
        start = time.perf_counter()
        step_loss, step_tokens = 0.0, 0
        for _ in range(train.gradient_accumulation_steps):
            batch = next(batches)
            loss = model(**batch).loss / train.gradient_accumulation_steps
            loss.backward()
            step_loss += loss.item()
            step_tokens += int(batch["attention_mask"].sum())
        if train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
        losses.append(step_loss)
        if step > 0:
            tokens_after_first += step_tokens
    steady = step_times[1:] or step_times
    return {
        "losses": losses,
        "throughput_tokens_per_s": tokens_after_first / sum(steady) if len(step_times) > 1 else 0.0,
        "step_time_s": sum(steady) / len(steady),
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_memory_over_setup_bytes": max(0, peak_memory_bytes() - setup_rss),
        "trainable_parameters": strategy.trainable_parameters,
        "total_parameters": strategy.total_parameters,
        "checkpointed_layers": len(plan.layers),
        "torch_threads": threads,
    }


def endless_batches(loader, sampler) -> Iterator[dict]:
    """The loader's batches epoch after epoch, reshuffled through ``sampler.set_epoch``."""
    epoch = 0
    while True:
        yield from loader
        epoch += 1
        sampler.set_epoch(epoch)
