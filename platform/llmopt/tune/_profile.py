"""Measure a few real training steps of one worker in this process.

`measure` runs the training code's own building blocks (`llmopt.train.prepare`: model, strategy, data,
checkpointing plan; `build_deepspeed_config` and `deepspeed.initialize`: the DeepSpeed engine at the
config's ZeRO stage, offload and precision; the worker loop's forward / backward / step) for a few
optimizer steps, and records step time, tokens/s and peak memory the way the worker reports them
(`peak_memory_bytes`: peak RSS on CPU, CUDA max allocated on GPU). On Linux the peak RSS is reset before
each probe (`/proc/self/clear_refs`), so several probes can run in one process; `llmopt.tune._calibrate`
fits the cost model to such measurements.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmopt.config import RunConfig


@dataclass
class Measurement:
    """One probe's measured figures (a single in-process worker)."""

    label: str
    overrides: list[str]
    peak_bytes: int
    base_bytes: int
    setup_bytes: int
    step_time_s: float
    tokens_per_s: float
    losses: list[float]
    checkpointed_layers: int
    trainable_parameters: int
    # The optimizer phase (`engine.step()` at the accumulation boundary) of a step, timed apart from
    # forward and backward, so that a fit sees compute and optimizer time separately.
    optimizer_time_s: float = 0.0
    # Forward + backward of a one-row, two-token batch: the strategy's fixed cost per micro-batch (kernel
    # dispatch, autograd, hooks of checkpointing and ZeRO), nearly free of compute.
    pass_floor_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only: give freed heap pages back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakRss:
    """Peak memory of this process from now on: resets the kernel's high-water mark where allowed,
    else samples the resident set every 2 ms."""

    def __init__(self, device):
        import torch

        self.device, self.cuda = device, torch.device(device).type == "cuda"
        self.sampled, self._stop, self._thread = 0, threading.Event(), None

    def __enter__(self) -> _PeakRss:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM and ru_maxrss (Linux >= 4.0)
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.wait(0.002):
            self.sampled = max(self.sampled, proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def peak(self) -> int:
        from llmopt.train import peak_memory_bytes

        if self._thread:
            return self.sampled
        return peak_memory_bytes(self.device)


_GROUP_ENV: dict[str, str] = {}


@contextlib.contextmanager
def _single_process_group():
    """A one-rank gloo process group for DeepSpeed, with its rank variables set while inside.

    The group is created once and kept for the life of the process: DeepSpeed caches its groups, so a
    destroyed and re-created default group breaks the next engine. The variables are restored on exit.
    """
    import torch.distributed as dist

    if dist.is_initialized() and not _GROUP_ENV:
        if dist.get_world_size() != 1:
            raise RuntimeError("llmopt.tune.measure runs one worker; call it outside a multi-rank group")
        yield
        return
    if not _GROUP_ENV:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        _GROUP_ENV.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        _GROUP_ENV.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    saved = {k: os.environ.get(k) for k in _GROUP_ENV}
    os.environ.update(_GROUP_ENV)
    try:
        if not dist.is_initialized():
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def measure(
    config: RunConfig, steps: int = 4, label: str = "", overrides: list[str] | None = None
) -> Measurement:
    """Train `steps` optimizer steps of one worker in this process and measure them.

    Args:
        config: The run config (run as one worker, whatever `parallelism.num_workers` says).
        steps: Optimizer steps; the first is a warm-up, step time is the median of the others.
        label: Name for reports.
        overrides: The overrides that made `config` (recorded only).

    Returns:
        The measurement. `base_bytes` is this process's memory before the probe built anything, so
        `peak_bytes - base_bytes` is the probe's own memory.
    """
    import deepspeed
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from llmopt.data import pad_batch
    from llmopt.runtime import set_torch_threads
    from llmopt.train import build_deepspeed_config, endless_batches, prepare, resolve_precision
    from llmopt.train._metrics import current_rss_bytes

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_extensions_dir()))
    config = config.model_copy(
        update={"parallelism": config.parallelism.model_copy(update={"num_workers": 1, "min_workers": None})}
    )
    set_torch_threads(config.resources.cpus_per_worker)
    use_gpu = torch.cuda.is_available() and config.resources.accelerator != "cpu"
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    precision = resolve_precision(config, use_gpu, use_gpu and torch.cuda.is_bf16_supported())
    train = config.training
    ds_config = build_deepspeed_config(config, 1, precision)
    micro, accumulation = train.micro_batch_size, train.gradient_accumulation_steps
    with _single_process_group():
        _release_memory()
        base = current_rss_bytes()
        with _PeakRss(device) as tracker:
            tokenizer, model, strategy, examples, plan = prepare(config, micro, device, precision)
            sampler = DistributedSampler(
                examples, num_replicas=1, rank=0, shuffle=True, seed=train.seed, drop_last=True
            )
            loader = DataLoader(
                examples,
                batch_size=micro,
                sampler=sampler,
                collate_fn=lambda b: pad_batch(b, tokenizer.pad_token_id),
            )
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(
                trainable, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay
            )
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
            setup = current_rss_bytes()
            engine.train()
            batches = endless_batches(loader, sampler)
            times, tokens, losses, optimizer_times = [], [], [], []
            sync = torch.cuda.synchronize if use_gpu else (lambda: None)
            for _ in range(steps):
                start, step_tokens, step_loss, in_optimizer = time.perf_counter(), 0, 0.0, 0.0
                for _ in range(accumulation):
                    batch = {k: v.to(device) for k, v in next(batches).items()}
                    outputs = engine(**batch)
                    engine.backward(outputs.loss)
                    sync()
                    before = time.perf_counter()
                    engine.step()
                    sync()
                    in_optimizer += time.perf_counter() - before
                    step_tokens += int(batch["attention_mask"].sum())
                    step_loss += outputs.loss.item() / accumulation
                times.append(time.perf_counter() - start)
                optimizer_times.append(in_optimizer)
                tokens.append(step_tokens)
                losses.append(step_loss)
            peak = tracker.peak()
            floor = _pass_floor(engine, batch, sync)
        with contextlib.suppress(Exception):
            engine.destroy()
        del engine, optimizer, model, trainable, loader, examples, batch, outputs
        _release_memory()
    steady = times[1:] or times
    return Measurement(
        label=label,
        overrides=list(overrides or []),
        peak_bytes=int(peak),
        base_bytes=int(base),
        setup_bytes=int(setup),
        step_time_s=statistics.median(steady),
        tokens_per_s=sum(tokens[1:] or tokens) / sum(steady),
        losses=losses,
        checkpointed_layers=len(plan.layers),
        trainable_parameters=strategy.trainable_parameters,
        optimizer_time_s=statistics.median(optimizer_times[1:] or optimizer_times),
        pass_floor_s=floor,
    )


def _pass_floor(engine, batch: dict, sync, passes: int = 6) -> float:
    """Median seconds of forward + backward on one row's first two tokens (every token a label)."""
    ids = batch["input_ids"][:1, :2]
    tiny = {"input_ids": ids, "attention_mask": batch["attention_mask"][:1, :2], "labels": ids.clone()}
    times = []
    for _ in range(passes + 1):
        start = time.perf_counter()
        engine.backward(engine(**tiny).loss)
        sync()
        times.append(time.perf_counter() - start)
        engine.step()  # untimed: keeps DeepSpeed's gradient buffers in the state a training step leaves
    return statistics.median(times[1:])


def _extensions_dir() -> Path:
    from llmopt.models import cache_dir

    return cache_dir() / "torch_extensions"  # where the training workers keep DeepSpeed's compiled ops
