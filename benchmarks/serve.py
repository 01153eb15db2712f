"""The `serve` benchmark: drive serve_apps.llm on loopback with a bounded load generator.

Every case deploys the application afresh (one replica, fp32 on CPU) with its own config overrides, warms
it up, then measures it with the client in ``benchmarks/_load.py``: load points of streamed
``/v1/completions`` requests with at most C in flight (prompts of an exact token count, fixed output length
through ``ignore_eos``, temperature 0), or two-turn sessions on the seed API. Per point: requests/s and
output tokens/s over the point's wall time, TTFT and latency p50/p99, each request's decode rate, the
replica's mean batch size (``/api/v1/stats``), and the same over time in windows of a few seconds
(``timeline``, plotted in serve_timeline.png).

Outside the server (in Ray tasks, ``benchmarks/_precision.py``): the machine's memory bandwidth with the
replica's thread count (the ceiling of batch-1 decoding, which reads every weight once per token), the
time of the tiny preset's matrix products alone at the top concurrency (the ceiling of batched throughput)
and the serving precisions (fp32 / int8 / bf16: engine decode tokens/s at batch 1 and 8, held-out loss).

Any failed case, request or precision run fails the benchmark (after serve.json and the PNGs are written).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks._load import (
    BASE,
    TINY,
    Plan,
    fmt_ms,
    fmt_s,
    make_cases,
    make_plan,
    run_case,
)
from benchmarks._precision import HUGE_PAGE_RATES

TARGETS = {"batching_speedup": 6.0, "bandwidth_fraction": 0.7, "session_ttft_speedup": 8.0}
REPO = Path(__file__).resolve().parent.parent


def _read_rates_text(bw: dict[str, Any], pages: str) -> str:
    """sum, torch gemv and native gemv read rates (``pages``: "" or "_huge_pages"), in GB/s."""
    gb = {k: (bw.get(f"{k}{pages}_bytes_per_s") or 0) / 1e9 for k in ("sum", "gemv", "native_gemv")}
    native = f", native gemv {gb['native_gemv']:.1f}" if gb["native_gemv"] else ""
    return f"sum {gb['sum']:.1f}, torch gemv {gb['gemv']:.1f}{native} GB/s"


def _bandwidth_text(bw: dict[str, Any]) -> str:
    copy = (bw.get("copy_bytes_per_s") or 0) / 1e9
    text = f"copy {copy:.1f} GB/s (read + write), {_read_rates_text(bw, '')} (read)"
    if bw.get("sum_huge_pages_bytes_per_s"):
        text += f"; on 2 MiB pages: {_read_rates_text(bw, '_huge_pages')}"
    return text


def _best_rate(sources: list[dict[str, Any]], kind: str) -> float:
    """The highest `kind` rate (gemv, native_gemv) over the measurements and both page sizes."""
    return max(b.get(f"{kind}{pages}_bytes_per_s") or 0.0 for b in sources for pages in ("", "_huge_pages"))


def read_bandwidth(bw: dict[str, Any]) -> float:
    """The highest read-only rate measured (sum, torch's GEMV, the native GEMV, on 4 KiB and on 2 MiB pages):
    the ceiling's bandwidth."""
    rates = ("sum_bytes_per_s", "gemv_bytes_per_s", "native_gemv_bytes_per_s", *HUGE_PAGE_RATES)
    return max(bw.get(k) or 0.0 for k in rates)


def _matmul_text(m: dict[str, Any]) -> str:
    step, prefill = m["decode_step_s"] * 1e3, m["prefill_s"] * 1e3
    ceiling = m["ceiling_tokens_per_s"]
    return (
        f"{m['preset']}, {m['threads']} thread(s): decode step of {m['batch']} rows {step:.2f} ms, "
        f"prefill {prefill:.2f} ms, {m['flops_per_s'] / 1e9:.0f} GFLOP/s; "
        f"ceiling {ceiling:.0f} output tokens/s at concurrency {m['batch']}"
    )


def _session_text(s: dict[str, Any]) -> str:
    return (
        f"follow-up TTFT p50 {fmt_ms(s['turn2_ttft_p50_s'])}, prompt/cached tokens "
        f"{s['turn2_prompt_tokens']}/{s['turn2_cached_tokens']}, turn-1 latency p50 "
        f"{fmt_s(s['turn1_latency_p50_s'])}"
    )


# ---------------------------------------------------------------------------------------------- figures


def _point(results, group, label, concurrency=None):
    """A load point without errors: the given concurrency's, or the case's highest."""
    for r in results:
        if r["group"] == group and r["label"] == label and "error" not in r and r["points"]:
            ok = [p for p in r["points"] if not p["errors"] and p["output_tokens_per_s"] > 0]
            if concurrency is None and ok:
                return max(ok, key=lambda p: p["concurrency"])
            return next((p for p in ok if p["concurrency"] == concurrency), None)
    return None


def _figure(value, target, applies, **detail) -> dict[str, Any]:
    passed = None if value is None or not applies else bool(value >= target)
    return {"value": value, "target": target, "target_applies": applies, "passed": passed, **detail}


def serve_figures(results, bandwidth, weights, plan: Plan, matmul=None) -> dict[str, Any]:
    """The three headline serving figures, each with its target and whether the run met it.

    (a) compares batched output tokens/s with two unbatched baselines: batching off at concurrency 1 (the
    sequential baseline the target refers to, ``ratio``: pass/fail) and batching off at the same
    concurrency (server-side sequential, saturated: ``ratio_vs_saturated_unbatched``). With ``matmul``
    (:func:`measure_matmul_ceiling` at that concurrency) it also gives the matrix products' ceiling, the
    share of it reached and the ratio the ceiling itself would give (``matmul_ceiling_ratio``).
    """
    figures: dict[str, Any] = {}
    base = _point(results, "batching", "none", 1)
    for label in ("continuous", "static"):
        top = _point(results, "batching", label)
        if not (base and top):
            continue
        c, tokens_per_s = top["concurrency"], top["output_tokens_per_s"]
        saturated = _point(results, "batching", "none", c) if c > 1 else None
        saturated_tokens_per_s = saturated["output_tokens_per_s"] if saturated else None
        ratio = tokens_per_s / base["output_tokens_per_s"]
        ceiling = matmul["ceiling_tokens_per_s"] if matmul and matmul["batch"] == c else None
        figures["batching_speedup" if label == "continuous" else "static_batching_speedup"] = _figure(
            ratio,
            TARGETS["batching_speedup"],
            label == "continuous" and c == 32,
            preset=TINY,
            concurrency=c,
            tokens_per_s=tokens_per_s,
            ratio=ratio,
            baseline="batching off, concurrency 1",
            baseline_tokens_per_s=base["output_tokens_per_s"],
            ratio_vs_saturated_unbatched=saturated_tokens_per_s and tokens_per_s / saturated_tokens_per_s,
            saturated_baseline=f"batching off, concurrency {c}",
            saturated_baseline_tokens_per_s=saturated_tokens_per_s,
            matmul_ceiling_tokens_per_s=ceiling,
            fraction_of_matmul_ceiling=ceiling and tokens_per_s / ceiling,
            matmul_ceiling_ratio=ceiling and ceiling / base["output_tokens_per_s"],
        )
    group = "base-100m" if plan.include_base else "batching"
    batch1 = _point(results, group, "continuous", 1) or _point(results, group, "none", 1)
    if batch1 and bandwidth and batch1["decode_tokens_per_s_p50"]:
        preset = BASE if group == "base-100m" else TINY
        per_token = weights[preset]["bytes_per_token"]
        adjacent = batch1.get("bandwidth_adjacent") or []
        # The higher of the measurements right before and after the point (the start-of-run one otherwise).
        sources = adjacent or [bandwidth]
        read_bw = max(map(read_bandwidth, sources))
        ceiling = read_bw / per_token
        figures["bandwidth_fraction"] = _figure(
            batch1["decode_tokens_per_s_p50"] / ceiling,
            TARGETS["bandwidth_fraction"],
            preset == BASE,
            preset=preset,
            decode_tokens_per_s=batch1["decode_tokens_per_s_p50"],
            ceiling_tokens_per_s=ceiling,
            gemv_ceiling_tokens_per_s=_best_rate(sources, "gemv") / per_token,
            native_gemv_ceiling_tokens_per_s=_best_rate(sources, "native_gemv") / per_token,
            weight_bytes_per_token=per_token,
            bandwidth_bytes_per_s=read_bw,
            bandwidth_used="max(sum, torch gemv, native gemv; 4 KiB and 2 MiB pages): read-only bandwidth, "
            + ("the higher of right before and after the point" if adjacent else "at the start of the run"),
            start_of_run_bandwidth_bytes_per_s=read_bandwidth(bandwidth),
        )
    sessions = {r["label"]: r.get("session") for r in results if r["kind"] == "session"}
    reuse, recompute = sessions.get("session reuse"), sessions.get("recompute")
    if reuse and recompute and reuse["turn2_ttft_p50_s"] and recompute["turn2_ttft_p50_s"]:
        figures["session_ttft_speedup"] = _figure(
            recompute["turn2_ttft_p50_s"] / reuse["turn2_ttft_p50_s"],
            TARGETS["session_ttft_speedup"],
            plan.session_history >= 2000,
            history_tokens=plan.session_history,
            reuse_ttft_s=reuse["turn2_ttft_p50_s"],
            recompute_ttft_s=recompute["turn2_ttft_p50_s"],
            reuse_cached_tokens=reuse["turn2_cached_tokens"],
        )
    return figures


def plot_serve(report: dict[str, Any], path: Path) -> None:
    """Tokens/s, TTFT and p99 latency vs concurrency; session TTFT; decode vs bandwidth ceiling; precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks._precision import plot_precision

    loads = [r for r in report["cases"] if r["kind"] == "load" and r["points"]]
    fig = plt.figure(figsize=(16, 12.5))
    grid = fig.add_gridspec(3, 3)
    panels = [
        ("output_tokens_per_s", "output tokens/s"),
        ("ttft_p50_s", "TTFT p50, s"),
        ("latency_p99_s", "latency p99, s"),
    ]
    fig_a = report["figures"].get("batching_speedup")
    for col, (key, title) in enumerate(panels):
        for row, preset in enumerate((TINY, BASE)):
            if row == 1 and col > 0:
                continue
            ax = fig.add_subplot(grid[row, col])
            for r in (r for r in loads if r["preset"] == preset):
                pts = [p for p in r["points"] if p.get(key) is not None]
                ax.plot([p["concurrency"] for p in pts], [p[key] for p in pts], "o-", label=r["label"])
            if row == 0 and col == 0 and fig_a and fig_a.get("matmul_ceiling_tokens_per_s"):
                ax.axhline(fig_a["matmul_ceiling_tokens_per_s"], color="gray", ls="--", lw=1,
                           label=f"matrix products alone, C={fig_a['concurrency']}")  # fmt: skip
                ax.axhline(fig_a["target"] * fig_a["baseline_tokens_per_s"], color="tab:red", ls=":",
                           lw=1, label=f"{fig_a['target']:g}x batching off at C=1")  # fmt: skip
            ax.set_xscale("log", base=2)
            ticks = sorted(
                {p["concurrency"] for r in loads if r["preset"] == preset for p in r["points"]}
            ) or [1]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("concurrency")
            ax.set_title(f"{preset}: {title}")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    sessions = [r for r in report["cases"] if r["kind"] == "session" and r.get("session")]
    ax = fig.add_subplot(grid[1, 1])
    if sessions:
        ax.bar(
            [r["label"] for r in sessions], [1000 * (r["session"]["turn2_ttft_p50_s"] or 0) for r in sessions]
        )
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    ax.set_title(f"follow-up turn TTFT p50, ms ({report['settings']['session_history']}-token history)")
    ax = fig.add_subplot(grid[1, 2])
    fig_b = report["figures"].get("bandwidth_fraction")
    if fig_b:
        bars = {
            "measured decode": fig_b["decode_tokens_per_s"],
            "ceiling (read bw)": fig_b["ceiling_tokens_per_s"],
            "torch GEMV rate": fig_b["gemv_ceiling_tokens_per_s"],
        }
        if fig_b.get("native_gemv_ceiling_tokens_per_s"):
            bars["native GEMV rate"] = fig_b["native_gemv_ceiling_tokens_per_s"]
        ax.bar(list(bars), list(bars.values()), color=["tab:blue", "tab:gray", "silver", "lightsteelblue"])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{fig_b['preset']} batch-1 decode tokens/s ({fig_b['value']:.0%} of ceiling)")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    plot_precision(fig.add_subplot(grid[2, :]), report["precision"])
    settings = report["settings"]
    fig.suptitle(
        f"llmopt serve benchmark (fp32 CPU, {settings['replica_cpus']} CPU per replica, "
        f"prompt {settings['prompt_tokens']} / output {settings['output_tokens']} tokens)\n"
        f"HTTP path: {report['transport']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _timeline_series(points: list[dict[str, Any]], key: str, scale: float = 1.0):
    """Per load point: window midpoints (on the case's clock, points end to end) and ``key``'s values."""
    offset, series = 0.0, []
    for p in points:
        windows = [w for w in p["timeline"]["windows"] if w.get(key) is not None]
        series.append(
            (
                [offset + (w["start_s"] + w["end_s"]) / 2 for w in windows],
                [scale * w[key] for w in windows],
            )
        )
        offset += p["timeline"]["windows"][-1]["end_s"]
    return series


def plot_serve_timeline(report: dict[str, Any], path: Path) -> None:
    """TTFT and latency p50/p99 and output tokens/s over time, one row per load case.

    serve.png gives each load point one number; this shows how the point got there (a queue building up,
    a stall, a slow first window). A case's points (one per concurrency) run one after another and are laid
    end to end on its time axis, each marked with its concurrency.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [
        r for r in report["cases"]
        if r["kind"] == "load" and r["points"] and all(p.get("timeline") for p in r["points"])
    ]  # fmt: skip
    rows = max(1, len(loads))
    fig, axes = plt.subplots(rows, 3, figsize=(16, 1.2 + 3.1 * rows), squeeze=False)
    if not loads:
        for ax in axes[0]:
            ax.text(0.5, 0.5, "no load point measured", ha="center", transform=ax.transAxes)
    panels = [
        ("TTFT", "ms", 1000.0, "ttft"),
        ("latency", "s", 1.0, "latency"),
    ]
    for row, r in zip(axes, loads, strict=False):
        points = r["points"]
        for ax, (name, unit, scale, prefix) in zip(row, panels, strict=False):
            for q, style in (("p50", "o-"), ("p99", "s--")):
                color = "tab:blue" if q == "p50" else "tab:red"
                for i, (x, y) in enumerate(_timeline_series(points, f"{prefix}_{q}_s", scale)):
                    ax.plot(x, y, style, color=color, ms=3, lw=1.2, label=f"{name} {q}" if i == 0 else None)
            ax.set_ylabel(f"{name} ({unit})")
            ax.set_title(f"{r['preset']} / {r['label']}: {name}")
        ax = row[2]
        for x, y in _timeline_series(points, "output_tokens_per_s"):
            ax.plot(x, y, "o-", color="tab:green", ms=3, lw=1.2)
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{r['preset']} / {r['label']}: output tokens/s")
        for ax in row:
            ax.set_ylim(0, max(ax.get_ylim()[1], 1e-9) * 1.3)  # headroom for the legend and the C= labels
            offset = 0.0
            for p in points:
                ax.axvline(offset, color="gray", lw=0.8, ls=":")
                ax.annotate(
                    f"C={p['concurrency']}", (offset, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -3), textcoords="offset points", va="top", fontsize=8, color="dimgray",
                )  # fmt: skip
                offset += p["timeline"]["windows"][-1]["end_s"]
            ax.set_xlim(0, offset)
            ax.set_xlabel("time since the case's first load point (s)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="best")
    sizes = sorted({p["timeline"]["window_s"] for r in loads for p in r["points"]})
    settings = report["settings"]
    fig.suptitle(
        f"llmopt serve benchmark over time (prompt {settings['prompt_tokens']} / output "
        f"{settings['output_tokens']} tokens): per window of {', '.join(f'{w:g}' for w in sizes) or '-'} s, "
        "TTFT at each request's first token, latency at its end\n"
        "one row per load case; its load points (concurrency C) ran one after another and are laid end to end"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- driver


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE_PROXY = "Serve's Python proxy -> ingress -> LLM replica"
SERVE_HAPROXY = "HAProxy -> ingress (direct ingress, gRPC to the LLM replica): Serve's high-throughput mode"


def _serve_transport(throughput_optimized: bool) -> str:
    """The HTTP path the benchmark measures; with ``throughput_optimized``, turn Serve's mode on first.

    Raises:
        ValueError: ``throughput_optimized`` on a cluster that is joined (its mode was set when it started).
    """
    import ray

    from llmopt.cluster import use_serve_throughput_mode

    if not throughput_optimized:
        return SERVE_HAPROXY if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else SERVE_PROXY
    use_serve_throughput_mode(joined=ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS")))
    return SERVE_HAPROXY


def _start_ray() -> bool:
    """Join the running cluster (ray job submit, a test's session) or start a local one; True if started."""
    import ray

    from llmopt.cluster import init_ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if not os.environ.get("RAY_ADDRESS"):
        # The replicas import serve_apps from the repository, which is not an installed package.
        kwargs["runtime_env"] = {
            "working_dir": str(REPO),
            "excludes": [".venv", ".venv-vllm", ".git", "outputs", "runs", ".cache"],
        }
    init_ray(**kwargs)
    return True


def _failures(report: dict[str, Any]) -> list[str]:
    """Every failed case, load point with failed requests, and precision error of a report."""
    failed = []
    for r in report["cases"]:
        where = f"{r['group']} / {r['label']}"
        if "error" in r:
            failed.append(f"{where}: {r['error']}")
        for p in r["points"]:
            if p["errors"]:
                failed.append(
                    f"{where}, c={p['concurrency']}: {p['errors']} failed requests, first: {p['first_error']}"
                )
    if report.get("precision_error"):
        failed.append(f"precision: {report['precision_error']}")
    return failed


def run_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Run the `serve` benchmark; write serve.json, serve.png and serve_timeline.png under ``args.out``, and
    print the results.

    Raises:
        RuntimeError: Some case, request or precision run failed (named in the message; the files are
            written first).
    """
    import json
    import platform

    transport = _serve_transport(args.throughput_optimized)  # before ray.serve's import reads the mode
    import ray
    from ray import serve
    from rich.console import Console

    from benchmarks._precision import (
        measure_bandwidth,
        measure_matmul_ceiling,
        precision_cases,
        weight_bytes_per_token,
    )
    from llmopt.config import load_config
    from llmopt.models import build_preset, load_tokenizer
    from llmopt.runtime import threads_for_cpus

    console = Console(width=None if sys.stdout.isatty() else 160)  # logs keep whole table rows
    log = lambda msg: console.print(msg, highlight=False)  # noqa: E731
    plan = make_plan(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = make_cases(plan)
    presets = list(dict.fromkeys(c["preset"] for c in cases))
    for preset in presets:
        log(f"model {preset}: building once if needed ...")
        build_preset(preset)
    tokenizer = load_tokenizer(load_config(None, [f"model.name_or_path={TINY}"]).model)
    weights = {p: weight_bytes_per_token(p) for p in presets}
    started = _start_ray()
    results, precision, precision_error = [], [], None
    try:
        threads = threads_for_cpus(plan.replica_cpus)  # as the replica's set_torch_threads
        log(f"memory bandwidth, {threads} thread(s), {plan.bandwidth_mb} MiB buffers ...")
        task = ray.remote(num_cpus=plan.replica_cpus, max_calls=1)(measure_bandwidth)
        bandwidth = ray.get(task.remote(threads, plan.bandwidth_mb))
        log("  " + _bandwidth_text(bandwidth))
        top = max(plan.tiny_concurrency)
        log(f"matrix products alone: {TINY}, batch {top}, {threads} thread(s) ...")
        task = ray.remote(num_cpus=plan.replica_cpus, max_calls=1)(measure_matmul_ceiling)
        matmul = ray.get(task.remote(TINY, threads, top, plan.prompt_tokens, plan.output_tokens))
        log("  " + _matmul_text(matmul))
        # Around the batch-1 point, while the replica holds its CPU but idles: a zero-CPU task.
        adjacent_task = ray.remote(num_cpus=0, max_calls=1)(measure_bandwidth)

        def probe() -> dict[str, Any]:
            measured = ray.get(adjacent_task.remote(threads, plan.bandwidth_mb))
            log("  memory bandwidth next to this point: " + _bandwidth_text(measured))
            return measured

        port = args.port or _free_port()
        url = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for case in cases:
                log(f"[bold]{case['group']}[/] / {case['label']} ({case['preset']}) ...")
                try:
                    results.append(run_case(case, plan, url, tokenizer, log, probe))
                except Exception as exc:  # one broken case must not lose the others' measurements
                    results.append({**case, "points": [], "error": f"{type(exc).__name__}: {exc}"})
                    log(f"  [red]failed:[/] {results[-1]['error'][:300]}")
                if results[-1].get("session"):
                    log("  " + _session_text(results[-1]["session"]))
        finally:
            serve.shutdown()
        log(f"serving precision: fp32 / int8 (/ bf16 on {TINY}) on {', '.join(presets)} ...")
        try:
            precision = precision_cases(presets, plan.quick)
        except Exception as exc:  # keep the serving measurements; the failure is raised below
            precision_error = f"{type(exc).__name__}: {exc}"
    finally:
        if started:
            ray.shutdown()
    report = {
        "benchmark": "serve",
        "quick": plan.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_1m_at_end": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch": __import__("torch").__version__,
            "processor": platform.processor(),
        },
        "settings": asdict(plan),
        "transport": transport,
        "bandwidth": bandwidth,
        "matmul_ceiling": matmul,
        "weights": weights,
        "cases": results,
        "precision": precision,
        "precision_error": precision_error,
        "figures": serve_figures(results, bandwidth, weights, plan, matmul),
    }
    (out / "serve.json").write_text(json.dumps(report, indent=2))
    plot_serve(report, out / "serve.png")
    plot_serve_timeline(report, out / "serve_timeline.png")
    print_report(report, console)
    log(f"written: {out / 'serve.json'}, {out / 'serve.png'}, {out / 'serve_timeline.png'}")
    failed = _failures(report)
    if failed:
        raise RuntimeError(f"the serve benchmark had {len(failed)} failure(s):\n  " + "\n  ".join(failed))
    return report


def print_report(report: dict[str, Any], console) -> None:
    """Load points as a table, then sessions, bandwidth, the precision table and the figures."""
    from rich.table import Table

    from benchmarks._precision import precision_table

    console.print(f"HTTP path: {report['transport']}", highlight=False)
    table = Table(
        "preset", "case", "C", "n", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "lat p50", "lat p99",
        "decode tok/s/req", "batch mean", "load 1m",
    )  # fmt: skip
    for r in (r for r in report["cases"] if r["kind"] == "load"):
        if "error" in r:
            table.add_row(r["preset"], r["label"], "", "", r["error"][:40])
        for p in r["points"]:
            mean = p["batch_size_mean"]
            table.add_row(
                r["preset"], r["label"], str(p["concurrency"]),
                f"{p['requests'] - p['errors']}/{p['requests']}",
                f"{p['requests_per_s']:.2f}", f"{p['output_tokens_per_s']:.0f}",
                fmt_ms(p["ttft_p50_s"]), fmt_ms(p["ttft_p99_s"]),
                fmt_s(p["latency_p50_s"]), fmt_s(p["latency_p99_s"]),
                "-" if p["decode_tokens_per_s_p50"] is None else f"{p['decode_tokens_per_s_p50']:.1f}",
                "-" if mean is None else f"{mean:.1f}", "{:.1f}/{:.1f}".format(*p["loadavg_1m"]),
            )  # fmt: skip
    console.print(table)
    for r in (r for r in report["cases"] if r["kind"] == "session"):
        text = _session_text(r["session"]) if r.get("session") else f"failed: {r.get('error')}"
        console.print(f"session, {r['label']}: {text}", highlight=False)
    bw = report["bandwidth"]
    console.print(f"memory bandwidth ({bw['threads']} thread(s)): {_bandwidth_text(bw)}", highlight=False)
    if report.get("matmul_ceiling"):
        console.print(f"matrix products alone: {_matmul_text(report['matmul_ceiling'])}", highlight=False)
    if report["precision"]:
        console.print(precision_table(report["precision"]))
    names = {
        "batching_speedup": "(a) output tokens/s, continuous batching vs sequential (batching off, C=1)",
        "static_batching_speedup": "    output tokens/s, static batching vs sequential (batching off, C=1)",
        "bandwidth_fraction": "(b) batch-1 decode tokens/s / bandwidth ceiling",
        "session_ttft_speedup": "(c) follow-up TTFT, recompute / session reuse, x",
    }
    verdict = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[dim]n/a (conditions differ)[/]"}
    for key, f in report["figures"].items():
        detail = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in f.items()
            if k not in ("value", "target", "target_applies", "passed")
        )
        line = f"{names.get(key, key)}: {f['value']:.3f} (target >= {f['target']}) {verdict[f['passed']]}"
        if f.get("ratio_vs_saturated_unbatched") is not None:
            line += (
                f"\n    vs batching off at C={f['concurrency']} (server-side sequential, saturated): "
                f"{f['ratio_vs_saturated_unbatched']:.3f} x"
            )
        if f.get("matmul_ceiling_tokens_per_s"):
            line += (
                f"\n    matrix products alone at C={f['concurrency']}: "
                f"{f['matmul_ceiling_tokens_per_s']:.0f} tokens/s, {f['fraction_of_matmul_ceiling']:.0%} "
                f"of it reached; that ceiling is {f['matmul_ceiling_ratio']:.2f} x the baseline"
            )
        console.print(f"{line}\n    {detail}", highlight=False)
    for failure in _failures(report):
        console.print(f"[red]failed[/] {failure}", highlight=False)


def add_serve_parser(sub) -> None:
    """Register the `serve` subcommand on the benchmark's subparsers."""
    serve = sub.add_parser(
        "serve",
        help="Serving: batching off/static/continuous, KV cache off/on, session reuse off/on, precisions.",
    )
    serve.add_argument("--quick", action="store_true", help="Smoke run: tiny preset, c=1 and 4, short.")
    serve.add_argument("--prompt-tokens", type=int, default=64, help="Prompt length of the load points.")
    serve.add_argument("--output-tokens", type=int, default=64, help="Output length of the load points.")
    serve.add_argument("--session-history", type=int, default=2000, help="Tokens of the session history.")
    serve.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs (= torch threads) of the replica."
    )
    serve.add_argument("--no-base", action="store_true", help="Skip the ~100M preset (load and precision).")
    serve.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (default: a free one).")
    serve.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="Start the local cluster in Ray Serve's high-throughput mode (HAProxy, direct ingress, gRPC).",
    )
    serve.add_argument("--out", default="outputs/benchmark", help="Output directory.")
