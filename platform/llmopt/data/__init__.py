"""Datasets shipped in the repo, JSONL loading, tokenization with label masking, and evaluation."""

from llmopt.data._evaluate import (
    EvalResult,
    evaluate,
    generate_greedy,
    normalize_answer,
    response_loss,
    response_loss_sum,
)
from llmopt.data._rows import DatasetError, builtin_datasets, dataset_path, load_rows
from llmopt.data._tasks import BUILTIN_DIR, TASKS, generate_task, write_jsonl, write_task
from llmopt.data._tokenize import (
    IGNORE_INDEX,
    encode_example,
    encode_prompt,
    pack_examples,
    pad_batch,
    render,
)

__all__ = [
    "BUILTIN_DIR",
    "IGNORE_INDEX",
    "TASKS",
    "DatasetError",
    "EvalResult",
    "builtin_datasets",
    "dataset_path",
    "encode_example",
    "encode_prompt",
    "evaluate",
    "generate_greedy",
    "generate_task",
    "load_rows",
    "normalize_answer",
    "pack_examples",
    "pad_batch",
    "render",
    "response_loss",
    "response_loss_sum",
    "write_jsonl",
    "write_task",
]
