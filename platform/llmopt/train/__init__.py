"""Fine-tuning on Ray Train with DeepSpeed workers: the worker loop, DeepSpeed config, checkpoints, runs."""

from llmopt.config import PrecisionError, resolve_precision
from llmopt.train._checkpointing import CheckpointingPlan, apply_checkpointing, plan_checkpointing
from llmopt.train._collectives import all_reduce_values
from llmopt.train._deepspeed import build_deepspeed_config
from llmopt.train._loop import lr_lambda, prepare, train_loop_per_worker
from llmopt.train._metrics import expert_load_metrics, expert_token_counts, peak_memory_bytes
from llmopt.train._prune import prune_to_directory
from llmopt.train._reference import endless_batches
from llmopt.train._runs import list_runs, plot_loss, plot_report, read_metrics, show_run
from llmopt.train._trainer import FinetuneResult, finetune, new_run_dir

__all__ = [
    "CheckpointingPlan",
    "FinetuneResult",
    "PrecisionError",
    "all_reduce_values",
    "apply_checkpointing",
    "build_deepspeed_config",
    "endless_batches",
    "expert_load_metrics",
    "expert_token_counts",
    "finetune",
    "list_runs",
    "lr_lambda",
    "new_run_dir",
    "peak_memory_bytes",
    "plan_checkpointing",
    "plot_loss",
    "plot_report",
    "prepare",
    "prune_to_directory",
    "read_metrics",
    "resolve_precision",
    "show_run",
    "train_loop_per_worker",
]
