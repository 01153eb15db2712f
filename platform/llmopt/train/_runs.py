"""Run directories: reading metrics back, the loss-curve and report plots, and listing runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

_ARROW = " \u2192 "


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


def _pyplot():
    """matplotlib's pyplot on the Agg backend: run directories are plotted on headless workers and CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of the records holding a finite number under ``key`` (others are skipped, so a
    figure missing from some records, e.g. before the first evaluation, leaves a gap rather than an error)."""
    rows = [(r["step"], r[key]) for r in history if _number(r.get(key))]
    return [s for s, _ in rows], [v for _, v in rows]


def _loss_panel(ax, history: list[dict[str, Any]]) -> None:
    """Train loss, and each held-out evaluation (loss, exact match on a right-hand axis) at its own step."""
    handles = ax.plot(*_series(history, "loss"), label="train loss", color="tab:blue")
    # Records carry the latest evaluation forward; plot each evaluation once, at its own step.
    evals = [r for r in history if _number(r.get("eval_loss")) and r.get("eval_step", r["step"]) == r["step"]]
    if evals:
        steps = [r["step"] for r in evals]
        handles += ax.plot(
            steps, [r["eval_loss"] for r in evals], "o-", label="held-out loss", color="tab:orange"
        )
        matches = [
            (r["step"], 100 * r["eval_exact_match"]) for r in evals if _number(r.get("eval_exact_match"))
        ]
        if matches:
            em = ax.twinx()
            handles += em.plot(
                [s for s, _ in matches],
                [m for _, m in matches],
                "s--",
                color="tab:green",
                label="held-out exact match (%)",
            )
            em.set_ylabel("exact match (%)")
            em.set_ylim(0, 100)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(handles=handles, loc="center right", fontsize=8)
    ax.grid(alpha=0.3)


def plot_loss(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write the training loss (and held-out loss / exact match when present) as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    _loss_panel(ax, history)
    ax.set_title(title or "fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _switches(history: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """The steps at which training changed its checkpointing plan, each with its ``checkpointing_switch``.

    A record may repeat the last switch (as records carry the last evaluation forward): an identical switch
    in consecutive records is one switch, at its first record.
    """
    found, previous = [], None
    for r in history:
        switch = r.get("checkpointing_switch")
        if isinstance(switch, dict) and switch != previous:
            found.append((int(switch.get("step", r["step"])), switch))
        previous = switch
    return found


def _memory_unit(values: list[float]) -> tuple[float, str]:
    """GiB for figures of a GiB or more, MiB below: a tiny model's peak reads as 600 MiB, not 0.59 GiB."""
    return (2**30, "GiB") if max(values, default=0) >= 2**30 else (2**20, "MiB")


def _switch_label(switch: dict[str, Any]) -> str:
    """``checkpointing 0 -> 2 layers`` and the peak that crossed the ceiling; the recorded reason (a whole
    sentence, too long for a chart) only when the figures are missing."""
    from llmopt.config import format_bytes

    text = f"checkpointing {switch.get('from_layers', '?')}{_ARROW}{switch.get('to_layers', '?')} layers"
    peak, ceiling = switch.get("peak_memory_bytes"), switch.get("ceiling_bytes")
    if _number(peak) and _number(ceiling):
        return f"{text}\npeak {format_bytes(peak)} > ceiling {format_bytes(ceiling)}"
    reason = str(switch.get("reason") or "")
    return f"{text}\n{reason[:60]}{'...' if len(reason) > 60 else ''}" if reason else text


def _memory_panel(ax, history: list[dict[str, Any]]) -> None:
    """Peak memory per step, the memory ceiling, and where (and why) checkpointing switched plans.

    Two peaks where records have both: ``peak_memory_bytes`` (rank 0's process over its life) and
    ``window_peak_memory_bytes`` (the largest of any rank since the last checkpointing decision: what the
    ceiling is checked against). The ceiling is the records' ``memory_ceiling_bytes`` (else a switch's
    ``ceiling_bytes``); one far above the peaks (the default budget is the machine's memory) would flatten
    them into the axis, so it is then named in the legend instead of drawn.
    """
    from llmopt.config import format_bytes

    steps, peaks = _series(history, "peak_memory_bytes")
    window_steps, window_peaks = _series(history, "window_peak_memory_bytes")
    ceil_steps, ceilings = _series(history, "memory_ceiling_bytes")
    switches = _switches(history)
    if not ceilings:
        ceil_steps = [step for step, s in switches if _number(s.get("ceiling_bytes"))]
        ceilings = [s["ceiling_bytes"] for _, s in switches if _number(s.get("ceiling_bytes"))]
    measured = (
        peaks
        + window_peaks
        + [s["peak_memory_bytes"] for _, s in switches if _number(s.get("peak_memory_bytes"))]
    )
    ax.set_title("peak memory per worker")
    ax.set_xlabel("optimizer step")
    if not measured:
        ax.text(0.5, 0.5, "no memory recorded", ha="center", transform=ax.transAxes)
        return
    drawn_ceiling = bool(ceilings) and max(ceilings) <= 3 * max(measured)
    scale, unit = _memory_unit(measured + (ceilings if drawn_ceiling else []))
    handles = ax.plot(
        steps, [p / scale for p in peaks], ".-", color="tab:purple", label="peak memory (rank 0, whole run)"
    )
    if window_peaks:
        handles += ax.plot(
            window_steps, [p / scale for p in window_peaks], ".--", color="tab:pink",
            label="peak since last checkpointing decision (all ranks)",
        )  # fmt: skip
    if drawn_ceiling and len(set(ceilings)) == 1:
        handles.append(
            ax.axhline(ceilings[0] / scale, color="tab:red", ls="--", lw=1.2, label="memory ceiling")
        )
    elif drawn_ceiling:
        handles += ax.step(
            ceil_steps, [c / scale for c in ceilings], where="post", color="tab:red", ls="--", lw=1.2,
            label="memory ceiling",
        )  # fmt: skip
    elif ceilings:  # an invisible line that carries the legend entry
        handles += ax.plot(
            [], [], color="tab:red", ls="--", lw=1.2,
            label=f"memory ceiling {format_bytes(max(ceilings))}: far above, not drawn",
        )  # fmt: skip
    for i, (step, switch) in enumerate(switches):
        line = ax.axvline(step, color="tab:brown", ls=":", lw=1.5, label="checkpointing switch")
        if i == 0:
            handles.append(line)
        # Three heights in turn, so that the labels of switches a few steps apart do not overprint.
        ax.annotate(
            _switch_label(switch), (step, 0.98 - 0.11 * (i % 3)), xycoords=("data", "axes fraction"),
            xytext=(4, 0), textcoords="offset points", va="top", fontsize=7, color="tab:brown",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
        )  # fmt: skip
        if _number(switch.get("peak_memory_bytes")):
            ax.plot([step], [switch["peak_memory_bytes"] / scale], "x", color="tab:brown", ms=8, mew=2)
    # The plan's size in the title: its changes are the switches' labels, a second axis would only crowd.
    layers = _series(history, "checkpointed_layers")[1]
    plans = [n for i, n in enumerate(layers) if i == 0 or n != layers[i - 1]]
    if plans:
        ax.set_title(f"peak memory per worker (checkpointed layers: {_ARROW.join(map(str, plans))})")
    ax.set_ylabel(f"memory ({unit})")
    top = max(measured + (ceilings if drawn_ceiling else [])) / scale
    ax.set_ylim(0, top * (1.45 if switches else 1.25))  # room above for the switches' labels
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def _throughput_panel(ax, history: list[dict[str, Any]]) -> None:
    """Tokens/s of each logged interval, and the steady rate of the whole run when the final record has it."""
    steps, rates = _series(history, "tokens_per_s")
    if not rates:
        ax.text(0.5, 0.5, "no throughput recorded", ha="center", transform=ax.transAxes)
    else:
        ax.plot(steps, rates, ".-", color="tab:cyan", label="tokens/s since the previous record")
        steady = [r["throughput_tokens_per_s"] for r in history if _number(r.get("throughput_tokens_per_s"))]
        if steady:
            ax.axhline(
                steady[-1],
                color="gray",
                ls="--",
                lw=1,
                label=f"whole run after step 1, evaluations included: {steady[-1]:.0f}",
            )
        ax.set_ylim(bottom=0, top=max(rates + steady) * 1.2)
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens/s (all workers)")
    ax.set_title("training throughput")
    ax.grid(alpha=0.3)


def _lr_panel(ax, history: list[dict[str, Any]]) -> None:
    steps, lrs = _series(history, "lr")
    if lrs:
        ax.plot(steps, lrs, ".-", color="tab:olive")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        ax.text(0.5, 0.5, "learning rate not recorded", ha="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate schedule")
    ax.grid(alpha=0.3)


def plot_report(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write a run's report as one PNG: loss, throughput, memory and learning rate over optimizer steps.

    A person judging a run wants to see at a glance whether the loss went down, whether throughput held
    steady, and how close memory came to its ceiling (and whether training had to switch to denser gradient
    checkpointing to stay under it); reading the same from metrics.jsonl takes a while. Figures missing from
    the records (no evaluation, no ceiling, a run before those fields existed) leave their part out.

    Args:
        history: The run's records, as :func:`read_metrics` returns them (one per step, ascending).
        path: Where to write the PNG.
        title: The figure's title (the run's name and model, say).

    Returns:
        ``path``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    _loss_panel(axes[0, 0], history)
    axes[0, 0].set_title("loss and held-out exact match")
    _throughput_panel(axes[0, 1], history)
    _memory_panel(axes[1, 0], history)
    _lr_panel(axes[1, 1], history)
    steps = [r["step"] for r in history]
    span = f"steps {min(steps)}-{max(steps)}, {len(history)} records" if steps else "no records"
    fig.suptitle(f"{title or 'fine-tuning run'} ({span})")
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
            p.name
            for p in run_dir.iterdir()
            if p.name in {"adapter", "model", "merged", "loss.png", "report.png"}
        ),
        "error": summary.get("error"),
    }
