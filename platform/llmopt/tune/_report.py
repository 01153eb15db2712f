"""A strategy search's outputs: the trial table (CSV, JSON), the Pareto plot, the summary, best.yaml."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.config import RunConfig, dump_config, format_bytes

COLUMNS = [
    "trial_id",
    "strategy",
    "status",
    "feasible",
    "reason",
    "score",
    "tokens_per_s",
    "peak_memory_bytes",
    "eval_loss",
    "eval_exact_match",
    "loss",
    "steps",
    "seconds",
    "predicted_tokens_per_s",
    "predicted_peak_bytes",
]


@dataclass
class SearchResult:
    """What a search found.

    Attributes:
        rows: One record per trial (see `run_trial`), plus `trial_id`.
        best: The best feasible trial's record (None when none was feasible).
        best_config: Its strategy as a ready-to-run config (the base run's length and resources).
        baseline: The rule-based template's record, measured in the same run.
        counts: sampled / pruned / infeasible / ok / error / stopped, and the grid's pruning counts.
        out_dir: Where the outputs were written.
        experiment_path: Tune's experiment directory (`Tuner.restore` it with `--resume`).
        seconds: Wall time of the search (baseline included).
    """

    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config: RunConfig | None
    baseline: dict[str, Any] | None
    counts: dict[str, int]
    out_dir: Path
    experiment_path: Path
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    seeds: list[dict[str, Any]] = field(default_factory=list)
    loss_ceiling: float | None = None
    cost_model: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        """Best tokens/s over the baseline's (None without both)."""
        if not self.best or not self.baseline or not self.baseline.get("tokens_per_s"):
            return None
        return float(self.best["tokens_per_s"]) / float(self.baseline["tokens_per_s"])


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def write_table(rows: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """Write `trials.csv` (fixed columns first, then every `param/*`) and `trials.json`."""
    params = sorted({k for r in rows for k in r if k.startswith("param/")})
    columns = COLUMNS + params
    csv_path, json_path = out_dir / "trials.csv", out_dir / "trials.json"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in columns})
    json_path.write_text(json.dumps(rows, indent=2, default=str))
    return csv_path, json_path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (memory, tokens/s) points no other point beats on both (less memory, more tokens/s)."""
    front, best = [], -math.inf
    for memory, speed in sorted(points, key=lambda p: (p[0], -p[1])):
        if speed > best:
            front.append((memory, speed))
            best = speed
    return front


def plot_pareto(
    rows: list[dict[str, Any]],
    path: Path,
    baseline: dict[str, Any] | None = None,
    best: dict[str, Any] | None = None,
    budget_bytes: int | None = None,
    title: str = "strategy search",
) -> Path:
    """Tokens/s against peak memory per trial, coloured by held-out loss; infeasible trials as grey
    crosses, the baseline as a star, the chosen strategy circled, the memory budget as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    fig, ax = plt.subplots(figsize=(8, 5.5))
    measured = [r for r in rows if _number(r.get("tokens_per_s")) and _number(r.get("peak_memory_bytes"))]
    good = [r for r in measured if r.get("feasible") and _number(r.get("eval_loss")) is not None]
    bad = [r for r in measured if r not in good]
    losses = [float(r["eval_loss"]) for r in measured if _number(r.get("eval_loss")) is not None]
    if baseline and _number(baseline.get("eval_loss")) is not None:
        losses.append(float(baseline["eval_loss"]))
    vmin, vmax = (min(losses), max(losses)) if losses else (0.0, 1.0)
    if vmin == vmax:
        vmax = vmin + 1e-6

    def by_loss(points: list[dict], **style):
        """Trials at (peak MiB, tokens/s), coloured by held-out loss on the shared scale."""
        return ax.scatter(
            [r["peak_memory_bytes"] / mib for r in points],
            [r["tokens_per_s"] for r in points],
            c=[float(r["eval_loss"]) for r in points],
            cmap="viridis_r",
            vmin=vmin,
            vmax=vmax,
            zorder=3,
            **style,
        )

    scatter = None
    if good:
        scatter = by_loss(good, s=60, edgecolors="black", linewidths=0.5, label="feasible trial")
        front = pareto_front([(r["peak_memory_bytes"] / mib, r["tokens_per_s"]) for r in good])
        ax.step(
            [m for m, _ in front],
            [s for _, s in front],
            where="post",
            color="tab:blue",
            alpha=0.5,
            label="Pareto front (feasible)",
            zorder=2,
        )
    scored = [r for r in bad if _number(r.get("eval_loss")) is not None]
    if scored:  # measured to the end but infeasible (e.g. over the loss ceiling): still coloured by loss
        scatter = by_loss(scored, marker="X", s=70, label="infeasible (loss ceiling)")
    unscored = [r for r in bad if r not in scored]
    if unscored:
        ax.scatter(
            [r["peak_memory_bytes"] / mib for r in unscored],
            [r["tokens_per_s"] for r in unscored],
            marker="x",
            color="grey",
            s=50,
            label="stopped (memory, time, ASHA)",
            zorder=3,
        )
    if baseline and _number(baseline.get("tokens_per_s")) and _number(baseline.get("peak_memory_bytes")):
        color = float(baseline["eval_loss"]) if _number(baseline.get("eval_loss")) is not None else vmin
        ax.scatter(
            [baseline["peak_memory_bytes"] / mib],
            [baseline["tokens_per_s"]],
            marker="*",
            s=320,
            c=[color],
            cmap="viridis_r",
            vmin=vmin,
            vmax=vmax,
            edgecolors="red",
            linewidths=1.2,
            label="rule-based template (baseline)",
            zorder=4,
        )
    if best and _number(best.get("tokens_per_s")):
        ax.scatter(
            [best["peak_memory_bytes"] / mib],
            [best["tokens_per_s"]],
            s=260,
            facecolors="none",
            edgecolors="red",
            linewidths=1.8,
            label="search best",
            zorder=5,
        )
    if budget_bytes:
        ax.axvline(
            budget_bytes / mib,
            color="red",
            linestyle="--",
            alpha=0.6,
            label=f"memory budget {format_bytes(budget_bytes)}",
        )
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, label="held-out loss (lower is better)")
    ax.set_xlabel("peak memory per worker (MiB)")
    ax.set_ylabel("training tokens/s")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def prediction_errors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The cost model's errors on the trials that ran: mean and max |predicted - measured| / measured of
    tokens/s and peak memory, and how many trials each is over."""
    out: dict[str, Any] = {}
    for name, predicted_key, measured_key in (
        ("tokens_per_s", "predicted_tokens_per_s", "tokens_per_s"),
        ("peak_memory", "predicted_peak_bytes", "peak_memory_bytes"),
    ):
        errors = [
            abs(p - m) / m
            for p, m in ((_number(r.get(predicted_key)), _number(r.get(measured_key))) for r in rows)
            if p is not None and m
        ]
        out[name] = {
            "mean_abs_error": sum(errors) / len(errors) if errors else None,
            "max_abs_error": max(errors) if errors else None,
            "trials": len(errors),
        }
    return out


def summary_data(result: SearchResult) -> dict[str, Any]:
    """The search's summary: best, baseline, their ratio and loss comparison, counts, settings."""
    best, base = result.best, result.baseline
    comparison: dict[str, Any] = {"speedup_tokens_per_s": result.speedup}
    if (
        best
        and base
        and _number(best.get("eval_loss")) is not None
        and _number(base.get("eval_loss")) is not None
    ):
        comparison["eval_loss_best"] = best["eval_loss"]
        comparison["eval_loss_baseline"] = base["eval_loss"]
        comparison["eval_loss_best_le_baseline"] = float(best["eval_loss"]) <= float(base["eval_loss"])
    return {
        "best": best,
        "baseline": base,
        "comparison": comparison,
        "cost_model": {**result.cost_model, "trial_errors": prediction_errors(result.rows)},
        "counts": result.counts,
        "loss_ceiling": result.loss_ceiling,
        "seeds": result.seeds,
        "settings": result.settings,
        "experiment_path": str(result.experiment_path),
        "seconds": result.seconds,
        "best_config": "best.yaml" if result.best_config is not None else None,
    }


def write_outputs(result: SearchResult) -> dict[str, Path]:
    """Write best.yaml (when a strategy was feasible), trials.csv, trials.json, pareto.png, summary.json."""
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = list(result.rows) + ([result.baseline] if result.baseline else [])
    csv_path, json_path = write_table(rows, out)
    paths = {"trials.csv": csv_path, "trials.json": json_path}
    paths["pareto.png"] = plot_pareto(
        result.rows,
        out / "pareto.png",
        baseline=result.baseline,
        best=result.best,
        budget_bytes=result.settings.get("memory_budget_bytes"),
        title=f"{result.settings.get('name', 'search')}: tokens/s vs peak memory",
    )
    if result.best_config is not None:
        dump_config(result.best_config, out / "best.yaml")
        paths["best.yaml"] = out / "best.yaml"
    (out / "summary.json").write_text(json.dumps(summary_data(result), indent=2, default=str))
    paths["summary.json"] = out / "summary.json"
    return paths


def results_table(result: SearchResult):
    """A rich Table of the trials, best first, with the baseline at the end."""
    from rich.table import Table

    table = Table(
        "trial",
        "strategy",
        "status",
        "tokens/s",
        "peak",
        "held-out loss",
        "s",
        "note",
        title=f"strategy search: {result.counts.get('sampled', 0)} trials",
    )
    order = sorted(result.rows, key=lambda r: -(r.get("score") or -1e18))
    for row in order + ([result.baseline] if result.baseline else []):
        mark = " *" if result.best is not None and row is result.best else ""
        tps, peak, loss = (_number(row.get(k)) for k in ("tokens_per_s", "peak_memory_bytes", "eval_loss"))
        table.add_row(
            str(row.get("trial_id")) + mark,
            str(row.get("strategy", "")),
            str(row.get("status")),
            f"{tps:,.0f}" if tps else "-",
            format_bytes(peak) if peak else "-",
            f"{loss:.4f}" if loss is not None else "-",
            f"{_number(row.get('seconds')) or 0:.0f}",
            str(row.get("reason") or "")[:60],
        )
    return table
