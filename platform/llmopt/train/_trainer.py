"""The driver side of fine-tuning: a Ray Train TorchTrainer sized from the config, and the run directory.

A run directory holds the resolved config, the generated DeepSpeed config, every reported metric
(metrics.jsonl), a summary, the loss curve (loss.png), the adapter (or full model, and a merged model
on request), and Ray Train's storage with its checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from llmopt.config import (
    ConfigError,
    ConfigIssue,
    PrecisionError,
    RunConfig,
    backend_errors,
    dump_config,
    resolve_precision,
)
from llmopt.train._deepspeed import build_deepspeed_config
from llmopt.train._loop import train_loop_per_worker
from llmopt.train._metrics import MetricsSink
from llmopt.train._runs import plot_loss, read_metrics

# ray.train.report blocks ~2 s per call at the default health-check interval; 0.2 s removes that.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@dataclass
class FinetuneResult:
    """Outcome of a fine-tuning run."""

    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _extensions_dir() -> str:
    from llmopt.models import cache_dir

    # DeepSpeed compiles C++ ops (the CPU shm comm op) on first use: cache them across runs and CI.
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(cache_dir() / "torch_extensions")


def new_run_dir(config: RunConfig) -> Path:
    """A fresh directory `<output_dir>/<name>-<timestamp>` for a run."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.output_dir).expanduser().resolve() / f"{config.name}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir


def _progress(sink, total: int | None, stop: threading.Event) -> None:
    """Show a progress bar in the job log from the sink's latest record."""
    import ray
    from tqdm import tqdm

    bar = tqdm(total=total, desc="fine-tune", unit="step", mininterval=2.0, dynamic_ncols=True)
    shown = 0
    while not stop.wait(1.0):
        latest = ray.get(sink.latest.remote())
        if not latest:
            continue
        bar.update(max(0, latest["step"] - shown))  # a replay after a failure moves no step twice
        shown = max(shown, latest["step"])
        postfix = {"loss": f"{latest['loss']:.4f}", "tok/s": f"{latest['tokens_per_s']:.0f}"}
        if "eval_exact_match" in latest:
            postfix["eval_em"] = f"{latest['eval_exact_match']:.1%}"
        bar.set_postfix(postfix)
    bar.close()


def _fit(trainer: Any) -> Any:
    """`trainer.fit()`, run in a thread when called from the main thread, which waits for it.

    From the main thread, Ray Train's `fit` installs a SIGINT handler of its own (a graceful abort that
    needs three Ctrl-Cs to force) in place of the command's (`llmopt.processes.StopGuard`, which bounds the
    exit and leaves no process behind). From another thread it installs none, as under Ray Tune; the
    main thread then stays free to take the signal.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def finetune(config: RunConfig, run_dir: Path | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune on Ray Train with DeepSpeed workers, as the config says.

    Args:
        config: The run config.
        run_dir: Where outputs go; default: a new `<output_dir>/<name>-<timestamp>`.
        progress: Show a progress bar in the log.

    Returns:
        The result; `error` is set when the run failed after its retries.

    Raises:
        ConfigError: the backend cannot run this config (e.g. tensor parallelism).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from llmopt.cluster import check_resources, gpus_have_bf16, init_ray, node_resources

    problems = backend_errors(config)
    if problems:
        raise ConfigError([ConfigIssue("parallelism", p) for p in problems])
    init_ray()
    # Before any worker starts: Ray would wait forever for GPUs or CPUs that no node has.
    nodes = node_resources()
    check_resources(config, "training", nodes)
    par, res = config.parallelism, config.resources
    use_gpu = res.gpus > 0
    try:
        precision = resolve_precision(config, use_gpu, gpus_have_bf16(nodes))
    except PrecisionError as exc:
        raise ConfigError([ConfigIssue("precision", str(exc))]) from None
    run_dir = Path(run_dir) if run_dir else new_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    (run_dir / "deepspeed.json").write_text(
        json.dumps(build_deepspeed_config(config, par.num_workers, precision), indent=2)
    )

    sink_actor = ray.remote(num_cpus=0)(MetricsSink).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        )
    )
    sink = sink_actor.remote(str(run_dir / "metrics.jsonl"))
    resources = {"CPU": res.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = res.gpus
    if res.memory_gb_per_worker:
        resources["memory"] = int(res.memory_gb_per_worker * 2**30)
    workers = (par.min_workers, par.num_workers) if par.min_workers else par.num_workers
    order = "max" if config.training.checkpoint_metric == "eval_exact_match" else "min"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "sink": sink},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=par.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(
            name="train",
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=par.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.training.keep_checkpoints,
                checkpoint_score_attribute=config.training.checkpoint_metric,
                checkpoint_score_order=order,
            ),
            worker_runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": _extensions_dir()}},
        ),
    )
    stop = threading.Event()
    watcher = None
    if progress:
        total = config.training.max_steps  # None (epochs): a bar without a known end
        watcher = threading.Thread(target=_progress, args=(sink, total, stop), daemon=True)
        watcher.start()
    start = time.perf_counter()
    try:
        result = _fit(trainer)
        error = None
    except Exception as exc:  # TrainingFailedError and friends: keep the run directory and say why
        result, error = None, f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:  # a stop signal: the run directory says so, the caller ends the cluster
        summary = {
            "status": "interrupted",
            "error": "stopped by a signal",
            "seconds": time.perf_counter() - start,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        stop.set()  # the bar's thread is a daemon: no wait for it on a stop
        raise
    stop.set()
    if watcher:
        watcher.join(timeout=5)
    seconds = time.perf_counter() - start
    if result is not None and result.error is not None:
        error = f"{type(result.error).__name__}: {result.error}"
    metrics = dict(result.metrics or {}) if result is not None else {}
    if result is not None and result.checkpoint is not None:
        with result.checkpoint.as_directory() as directory:
            for name in ("adapter", "model", "merged"):
                if (Path(directory) / name).is_dir():
                    shutil.copytree(Path(directory) / name, run_dir / name, dirs_exist_ok=True)
    ray.get(sink.history.remote())  # every record is on disk once the actor answered
    ray.kill(sink)
    history = read_metrics(run_dir)
    if history:
        plot_loss(history, run_dir / "loss.png", title=config.name)
    summary = {
        "status": "failed" if error else "finished",
        "error": error,
        "seconds": seconds,
        "metrics": metrics,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return FinetuneResult(run_dir, metrics, history, error, seconds)
