"""The Ray Train worker loop: a DeepSpeed engine over a Hugging Face model with the run's strategy.

Every worker builds the model, applies the strategy (QLoRA loading, MoE upcycling and router loss,
LoRA, gradient checkpointing), trains on its own shard (a DistributedSampler), reports metrics
through `ray.train.report`, and checkpoints DeepSpeed state (model, optimizer, scheduler, data
position, checkpointing plan) so a restarted worker group resumes where the last checkpoint left off.

Memory pressure does not have to end a run: when a worker's peak goes over `monitor.memory_ceiling` of
its budget, every rank switches to a denser gradient-checkpointing plan at the next checkpoint boundary
(`training.checkpoint_every_steps`; a run without checkpoints decides at every logged step), and the
record of that step says so (`checkpointing_switch`). Deciding at boundaries keeps each saved checkpoint
and the steps before it on one plan, and the plan travels in the checkpoint, so a restored run does not
fall back to the plan that ran out of room.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from llmopt.config import RunConfig, resolve_precision
from llmopt.data import encode_example, evaluate, load_rows, pack_examples, pad_batch
from llmopt.devices import bf16_supported, describe_device
from llmopt.models import apply_strategy, load_for_training, load_tokenizer
from llmopt.runtime import set_torch_threads
from llmopt.train._checkpointing import (
    AdaptiveCheckpointing,
    CheckpointingPlan,
    apply_checkpointing,
    memory_budget_bytes,
    plan_checkpointing,
)
from llmopt.train._collectives import all_reduce_values
from llmopt.train._deepspeed import build_deepspeed_config
from llmopt.train._metrics import (
    PeakMemoryWindow,
    current_memory_bytes,
    expert_load_metrics,
    expert_token_counts,
)

STATE_TAG = "state"


class _ResumableSampler(Sampler[int]):
    """The DistributedSampler's order for an epoch, minus the micro-batches already consumed."""

    def __init__(self, base: DistributedSampler, micro_batch: int):
        self.base, self.micro_batch, self.skip = base, micro_batch, 0

    def set_position(self, epoch: int, skip_micro_batches: int) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip_micro_batches

    def __iter__(self):
        return iter(list(self.base)[self.skip * self.micro_batch :])

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip * self.micro_batch)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak learning rate at each optimizer step: linear warm-up, then decay."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def report_interval_s() -> float:
    """How often metrics go to Ray Train: its controller's poll interval.

    Every `ray.train.report` (v2) makes the ranks meet at a barrier and holds a one-entry result queue
    until the controller's next poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default). Reporting every
    step therefore stalls training: measured here, 0.09 s LoRA steps of the tiny preset took 0.47 s each.
    Every log step still goes to the run's metrics sink (metrics.jsonl, the dashboard, the Tune trial).
    """
    return float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))


def _distributed_eval(
    engine, tokenizer, config: RunConfig, rows, rank: int, world: int, device: torch.device
) -> dict[str, float]:
    """Each rank evaluates its shard; exact match and loss are combined over all ranks."""
    shard = rows[rank::world]
    per_rank = math.ceil(len(rows) / world)
    num_real = len(shard)
    shard = shard + [rows[0]] * (per_rank - len(shard))  # equal forward passes on every rank
    synced = config.parallelism.zero_stage == 3 and world > 1
    model_config = engine.module.config
    # Router logits are for the training loss only; during cached generation transformers 5.23
    # computes the auxiliary loss with a full-length mask against one step's logits and fails.
    router_logits, model_config.output_router_logits = (
        getattr(model_config, "output_router_logits", False),
        False,
    )
    try:
        result = evaluate(
            engine.module,
            tokenizer,
            shard,
            config.data.prompt_template,
            config.model.max_seq_len,
            batch_size=32,
            num_real=num_real,
            synced_gpus=synced,
        )
    finally:
        model_config.output_router_logits = router_logits
    correct, count, loss_sum, tokens = all_reduce_values(
        [result.num_correct, result.num_examples, result.loss * result.loss_tokens, result.loss_tokens],
        device,
    )
    return {"eval_exact_match": correct / max(count, 1), "eval_loss": loss_sum / max(tokens, 1)}


def _save_final(engine, tokenizer, config: RunConfig, out: Path, rank: int, lora: bool) -> None:
    """Write the adapter (LoRA) or the full model, plus the tokenizer, from rank 0.

    Under ZeRO-3 the parameters are gathered first (a collective every rank joins).
    """
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    gather = config.parallelism.zero_stage == 3
    context = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if gather else nullcontext()
    with context:
        if rank != 0:
            return
        target = out / ("adapter" if lora else "model")
        module.save_pretrained(target)
        tokenizer.save_pretrained(target)
        if lora and config.training.save_merged:
            import copy

            merged = copy.deepcopy(module).merge_and_unload()
            merged.save_pretrained(out / "merged")
            tokenizer.save_pretrained(out / "merged")


def prepare(config: RunConfig, micro_batch: int, device: torch.device | str = "cpu", precision: str = "fp32"):
    """Model, strategy, encoded training data and checkpointing, as every training loop needs them.

    `precision` is the dtype the model will train in (QLoRA stores its 4-bit weights in it).

    Returns:
        (tokenizer, model, StrategyReport, encoded examples, CheckpointingPlan).
    """
    torch.manual_seed(config.training.seed)
    tokenizer = load_tokenizer(config.model)
    model, strategy = apply_strategy(
        load_for_training(config, "fp32", device, training_dtype=precision), config
    )
    data = config.data
    rows = load_rows(data.dataset, data.train_split, data.format, data.max_train_samples)
    examples = [
        encode_example(r, tokenizer, data.prompt_template, config.model.max_seq_len, data.mask_prompt)
        for r in rows
    ]
    if data.packing:
        examples = pack_examples(examples, config.model.max_seq_len)
    # The memory-budget policy measures the longest sequence and scales by the micro-batch size.
    longest = max(examples, key=lambda e: len(e["input_ids"]))
    plan = plan_checkpointing(
        model, config.checkpointing, pad_batch([longest], tokenizer.pad_token_id), batch_scale=micro_batch
    )
    apply_checkpointing(model, plan)
    return tokenizer, model, strategy, examples, plan


def _saved_world_size(checkpoint) -> int | None:
    """Workers that wrote a checkpoint (from its ZeRO optimizer shards; None without them)."""
    with checkpoint.as_directory() as directory:
        shards = list((Path(directory) / STATE_TAG).glob("*optim_states.pt"))
    return len(shards) or None


def _quiet_ray_reports() -> None:
    """Ray Train logs every report at INFO from every rank; our progress bar and sink cover that."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: keep its logging as it is
        pass


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; `loop_config` holds the run config (as JSON data) and a metrics sink."""
    import deepspeed
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    _quiet_ray_reports()
    config = RunConfig.model_validate(loop_config["config"])
    sink = loop_config.get("sink")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = set_torch_threads(config.resources.cpus_per_worker)
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    if use_gpu:
        torch.cuda.set_device(device)  # nccl and bitsandbytes use the current device
    precision = resolve_precision(config, use_gpu, bf16_supported(device))
    train = config.training

    ds_config = build_deepspeed_config(config, world, precision)
    micro = ds_config["train_micro_batch_size_per_gpu"]
    accumulation = ds_config["gradient_accumulation_steps"]
    tokenizer, model, strategy, examples, plan = prepare(config, micro, device, precision)
    pad_id = tokenizer.pad_token_id

    base_sampler = DistributedSampler(
        examples, num_replicas=world, rank=rank, shuffle=True, seed=train.seed, drop_last=True
    )
    sampler = _ResumableSampler(base_sampler, micro)
    loader = DataLoader(
        examples, batch_size=micro, sampler=sampler, collate_fn=lambda b: pad_batch(b, pad_id)
    )
    micro_per_epoch = len(base_sampler) // micro
    if micro_per_epoch < accumulation:
        raise ValueError(
            f"each worker gets {len(base_sampler)} rows, fewer than one optimizer step needs "
            f"({micro} x {accumulation}); use fewer workers, a smaller micro-batch or more data"
        )
    steps_per_epoch = micro_per_epoch // accumulation
    total_steps = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(train.lr_scheduler, train.warmup_steps, total_steps)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )

    step, epoch, micro_in_epoch = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        saved_world = _saved_world_size(checkpoint)
        if saved_world not in (None, world) and config.parallelism.zero_stage > 0:
            raise RuntimeError(
                f"the last checkpoint was written by {saved_world} workers and {world} are running: ZeRO-"
                f"{config.parallelism.zero_stage} partitions optimizer state per worker, so it cannot be "
                "resumed at another size; use parallelism.zero_stage=0 for elastic runs, or a fixed "
                "worker count (parallelism.min_workers unset)"
            )
        with checkpoint.as_directory() as directory:
            _, client_state = engine.load_checkpoint(directory, tag=STATE_TAG)
        step, epoch, micro_in_epoch = (
            client_state["step"],
            client_state["epoch"],
            client_state["micro_in_epoch"],
        )
        if client_state.get("checkpointing_plan"):  # the plan those steps ran with, perhaps a denser one
            plan = CheckpointingPlan(**client_state["checkpointing_plan"])
            apply_checkpointing(engine.module, plan)
    resumed_from = step
    eval_rows = load_rows(
        config.data.dataset, config.data.eval_split, config.data.format, config.data.max_eval_samples
    )
    setup_bytes = current_memory_bytes(device)
    adaptive = AdaptiveCheckpointing(
        engine.module,
        plan,
        memory_budget_bytes(config.resources, device),
        config.monitor.memory_ceiling,
        # transformers drops the cache in checkpointed layers, and prefix tuning's virtual tokens live in it.
        enabled=config.monitor.adaptive_checkpointing
        and not (config.lora.enabled and config.lora.method == "prefix_tuning"),
        rank=rank,
    )
    # Peaks are taken per window between two checkpointing decisions; past a ceiling a window ends with the
    # heap trimmed, so that the next one measures what its steps need rather than what the allocator kept.
    memory = PeakMemoryWindow(device, pressure_bytes=adaptive.ceiling_bytes)
    static = {
        "device": describe_device(device),
        "trainable_parameters": strategy.trainable_parameters,
        "total_parameters": strategy.total_parameters,
        "trainable_fraction": strategy.trainable_fraction,
        "peft_method": strategy.peft_method or "full",
        "world_size": world,
        "node_id": ray.get_runtime_context().get_node_id(),  # rank 0's: where a search trial ran
        "torch_threads": threads,
        "precision": precision,
        "memory_ceiling_bytes": adaptive.ceiling_bytes,
    }
    top_k = getattr(engine.module.config, "num_experts_per_tok", 0) if config.moe.mode != "none" else 0

    interval = report_interval_s()
    last_train_report = -math.inf

    def report(
        metrics: dict[str, Any],
        with_checkpoint: bool = False,
        final_dir: Path | None = None,
        to_train: bool = True,
    ) -> None:
        nonlocal last_train_report
        if rank == 0 and sink is not None:
            sink.log.remote(metrics)
        if not (to_train or with_checkpoint):
            return
        last_train_report = time.perf_counter()
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        local = Path(tempfile.mkdtemp(prefix="llmopt-ckpt-"))
        try:
            state = {
                "step": step,
                "epoch": epoch,
                "micro_in_epoch": micro_in_epoch,
                "world_size": world,
                "checkpointing_plan": adaptive.plan.to_dict(),
            }
            engine.save_checkpoint(str(local), tag=STATE_TAG, client_state=state)
            if final_dir is not None and rank == 0:
                shutil.copytree(final_dir, local, dirs_exist_ok=True)
            ray.train.report(
                metrics, checkpoint=Checkpoint.from_directory(local), checkpoint_dir_name=f"step-{step:06d}"
            )
        finally:
            shutil.rmtree(local, ignore_errors=True)

    engine.train()
    window = {"loss": 0.0, "aux": 0.0, "micro": 0, "tokens": 0, "start": time.perf_counter()}
    # Steady throughput: every token and second after the first optimizer step, reports included.
    steady = {"tokens": 0, "step_tokens": 0, "start": 0.0, "steps": 0, "step_loss": 0.0}
    expert_counts: torch.Tensor | None = None
    last_eval: dict[str, float] = {}
    metrics: dict[str, Any] = {"step": step, "checkpointed_layers": len(adaptive.plan.layers), **static}
    while step < total_steps:
        sampler.set_position(epoch, micro_in_epoch)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = engine(**batch)
            engine.backward(outputs.loss)
            engine.step()
            micro_in_epoch += 1
            window["micro"] += 1
            window["loss"] += outputs.loss.item()
            steady["step_loss"] += outputs.loss.item()
            window["tokens"] += int(batch["attention_mask"].sum())
            steady["step_tokens"] += int(batch["attention_mask"].sum())
            if getattr(outputs, "aux_loss", None) is not None:
                window["aux"] += float(outputs.aux_loss)
            if top_k and getattr(outputs, "router_logits", None):
                counts = expert_token_counts(outputs.router_logits, top_k, batch["attention_mask"])
                expert_counts = counts if expert_counts is None else expert_counts + counts
            if window["micro"] % accumulation:
                continue
            step += 1
            if steady["steps"] == 0:
                steady["start"] = time.perf_counter()
            else:
                steady["tokens"] += steady["step_tokens"]
            steady["steps"] += 1
            steady["step_tokens"] = 0
            last_step_loss, steady["step_loss"] = steady["step_loss"] / accumulation, 0.0
            epoch_done = micro_in_epoch >= steps_per_epoch * accumulation
            if epoch_done:
                epoch, micro_in_epoch = epoch + 1, 0
            # Evaluations and checkpoints follow their own schedules, whatever log_every_steps is.
            do_eval = step < total_steps and (
                epoch_done or bool(train.eval_every_steps and step % train.eval_every_steps == 0)
            )
            wants_checkpoint = step < total_steps and bool(
                train.checkpoint_every_steps and step % train.checkpoint_every_steps == 0
            )
            if step % train.log_every_steps == 0 or step == total_steps or do_eval or wants_checkpoint:
                elapsed = time.perf_counter() - window["start"]
                # `due` is summed over the ranks so that all of them call ray.train.report (a barrier)
                # at the same steps.
                due = float(time.perf_counter() - last_train_report >= interval)
                # Each rank's peak in its own slot: the sum hands every rank all of them, hence the same max.
                peaks = [0.0] * world
                peaks[rank] = float(memory.measure())
                loss_sum, aux_sum, tokens, micro_count, step_loss_sum, due, *peaks = all_reduce_values(
                    [
                        window["loss"],
                        window["aux"],
                        window["tokens"],
                        window["micro"],
                        last_step_loss,
                        due,
                        *peaks,
                    ],
                    device,
                )
                window_peak = int(max(peaks))
                metrics = {
                    "step": step,
                    "total_steps": total_steps,
                    "epoch": epoch,
                    "loss": loss_sum / micro_count,  # mean over the steps since the last report
                    "step_loss": step_loss_sum / world,  # this step alone
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens / elapsed,
                    "step_time_s": elapsed / (window["micro"] / accumulation),
                    "peak_memory_bytes": memory.lifetime,  # this rank, whole process (the window resets)
                    "peak_memory_over_setup_bytes": max(0, memory.lifetime - setup_bytes),
                    # The largest peak of any rank since the last checkpointing decision.
                    "window_peak_memory_bytes": window_peak,
                    "checkpointed_layers": len(adaptive.plan.layers),  # the plan these steps ran with
                    "resumed_from_step": resumed_from,
                    **static,
                }
                if top_k:
                    metrics["router_aux_loss"] = aux_sum / micro_count
                    if expert_counts is not None:
                        summed = torch.tensor(all_reduce_values(expert_counts.tolist(), device))
                        metrics.update(expert_load_metrics(summed))
                    expert_counts = None
                if do_eval:
                    last_eval = {
                        **_distributed_eval(engine, tokenizer, config, eval_rows, rank, world, device),
                        "eval_step": step,
                    }
                    engine.train()
                # Without a checkpoint schedule every logged step is a boundary; no step follows the last.
                boundary = step < total_steps and (wants_checkpoint or not train.checkpoint_every_steps)
                if boundary:
                    switch = adaptive.decide(window_peak)  # the same inputs on every rank: the same outcome
                    if switch is not None:
                        metrics["checkpointing_switch"] = switch
                    memory.restart()
                elif do_eval:
                    memory.exclude()  # evaluation memory is no step's; checkpointing would not lower it
                metrics.update(last_eval)
                if step < total_steps:
                    report(metrics, with_checkpoint=wants_checkpoint, to_train=due > 0 or do_eval)
                window = {"loss": 0.0, "aux": 0.0, "micro": 0, "tokens": 0, "start": time.perf_counter()}
            if step >= total_steps or epoch_done:
                break

    # Final evaluation, artifacts, and a checkpointed report (so Result.metrics is set).
    if steady["steps"] > 1:
        (steady_tokens,) = all_reduce_values([steady["tokens"]], device)
        metrics["throughput_tokens_per_s"] = steady_tokens / (time.perf_counter() - steady["start"])
    metrics.update(
        _distributed_eval(engine, tokenizer, config, eval_rows, rank, world, device), eval_step=step
    )
    metrics["final"] = True
    final_dir = Path(tempfile.mkdtemp(prefix="llmopt-final-"))
    try:
        _save_final(engine, tokenizer, config, final_dir, rank, config.lora.enabled)
        report(metrics, with_checkpoint=True, final_dir=final_dir)
    finally:
        shutil.rmtree(final_dir, ignore_errors=True)
