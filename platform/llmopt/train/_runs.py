"""Run directories: reading metrics back, the loss-curve plot, and listing runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's metric records, one per reported step.

    After a worker failure the steps since the last checkpoint are trained and reported again; the
    later record of a step wins, so the history reads like one uninterrupted run.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write the training loss (and held-out loss / exact match when present) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in history], label="train loss", color="tab:blue")
    # Records carry the latest evaluation forward; plot each evaluation once, at its own step.
    evals = [r for r in history if "eval_loss" in r and r.get("eval_step", r["step"]) == r["step"]]
    handles = list(ax.get_lines())
    if evals:
        steps = [r["step"] for r in evals]
        handles += ax.plot(
            steps, [r["eval_loss"] for r in evals], "o-", label="held-out loss", color="tab:orange"
        )
        em = ax.twinx()
        handles += em.plot(
            steps,
            [100 * r["eval_exact_match"] for r in evals],
            "s--",
            color="tab:green",
            label="held-out exact match (%)",
        )
        em.set_ylabel("exact match (%)")
        em.set_ylim(0, 100)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "fine-tuning")
    ax.legend(handles=handles, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def list_runs(output_dir: str | Path = "runs") -> list[dict[str, Any]]:
    """Summaries of the run directories under `output_dir`, newest first."""
    runs = []
    for run_dir in sorted(
        Path(output_dir).glob("*/config.yaml"), key=lambda p: p.stat().st_mtime, reverse=True
    ):
        runs.append(show_run(run_dir.parent))
    return runs


def show_run(run_dir: str | Path) -> dict[str, Any]:
    """One run's config name, model, status and final figures."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); see `llmopt runs list`")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary_path = run_dir / "summary.json"
    summary = (
        json.loads(summary_path.read_text()) if summary_path.is_file() else {"status": "running or killed"}
    )
    metrics = summary.get("metrics") or {}
    return {
        "run": run_dir.name,
        "path": str(run_dir),
        "model": config["model"]["name_or_path"],
        "method": "lora" if config["lora"]["enabled"] else "full",
        "status": summary.get("status"),
        "steps": metrics.get("step"),
        "loss": metrics.get("loss"),
        "eval_loss": metrics.get("eval_loss"),
        "eval_exact_match": metrics.get("eval_exact_match"),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "seconds": summary.get("seconds"),
        "artifacts": sorted(
            p.name for p in run_dir.iterdir() if p.name in {"adapter", "model", "merged", "loss.png"}
        ),
        "error": summary.get("error"),
    }
