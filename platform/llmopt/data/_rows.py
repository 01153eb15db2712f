"""Loading prompt/response and chat rows from JSONL, built-in or local."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from llmopt.data._tasks import BUILTIN_DIR

RowFormat = Literal["auto", "prompt_response", "chat"]
_ROLES = {"system", "user", "assistant"}


class DatasetError(ValueError):
    """A dataset could not be found or a row is malformed (the message names file, line and fix)."""


def builtin_datasets() -> list[str]:
    """Names of the datasets shipped with llmopt."""
    return sorted({p.name.split(".")[0] for p in BUILTIN_DIR.glob("*.train.jsonl")})


def dataset_path(dataset: str, split: str) -> Path:
    """Resolve a dataset reference and split to a JSONL file.

    Args:
        dataset: A built-in name, a JSONL file (used for every split), or a directory with
            `<split>.jsonl` files.
        split: Split name, e.g. `train` or `test`.
    """
    if dataset in builtin_datasets():
        return BUILTIN_DIR / f"{dataset}.{split}.jsonl"
    path = Path(dataset).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / f"{split}.jsonl"
        if candidate.is_file():
            return candidate
        raise DatasetError(
            f"dataset directory {str(path)!r} has no {split}.jsonl; add it or point data.dataset to a file"
        )
    raise DatasetError(
        f"dataset {dataset!r} is neither a built-in ({', '.join(builtin_datasets())}) nor an existing "
        "JSONL file or directory; fix data.dataset"
    )


def _check_row(row: Any, fmt: RowFormat, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = "chat" if "messages" in row else "prompt_response"
    if fmt == "chat":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DatasetError(f"{where}: chat rows need a non-empty 'messages' list")
        for i, msg in enumerate(messages):
            if (
                not isinstance(msg, dict)
                or msg.get("role") not in _ROLES
                or not isinstance(msg.get("content"), str)
            ):
                raise DatasetError(
                    f"{where}: messages[{i}] must be {{'role': one of {sorted(_ROLES)}, "
                    f"'content': str}}, got {msg!r}"
                )
        if messages[-1]["role"] != "assistant":
            raise DatasetError(f"{where}: the last message must be the assistant's reply to train on")
        return {"messages": messages}
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DatasetError(
            f"{where}: prompt/response rows need string 'prompt' and 'response' fields, "
            f"got keys {sorted(row)}"
        )
    return {"prompt": prompt, "response": response}


def load_rows(
    dataset: str, split: str = "train", fmt: RowFormat = "auto", limit: int | None = None
) -> list[dict[str, Any]]:
    """Load and check the rows of a dataset split.

    Args:
        dataset: Built-in name, JSONL file or directory (see `dataset_path`).
        split: Split to read.
        fmt: Row format; `auto` detects chat rows by their `messages` key.
        limit: Keep at most this many rows (the first ones).

    Returns:
        Rows as `{"prompt", "response"}` or `{"messages"}` dicts.

    Raises:
        DatasetError: naming the file and line of the first malformed row.
    """
    path = dataset_path(dataset, split)
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: invalid JSON ({exc.msg})") from None
            rows.append(_check_row(raw, fmt, where))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows
