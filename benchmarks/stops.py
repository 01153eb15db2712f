"""``python -m jobs.benchmark stops``: how each way of stopping a command ends it.

Each case starts a command (`llmopt serve`, `llmopt serve --throughput-optimized`, `llmopt finetune`,
`llmopt tune`, the demo) in a session of its own, as a terminal or a supervisor would, waits until it is
doing its work, then stops it one way: SIGINT or SIGTERM to the command alone or to its whole process
group, the same signal twice, or its embedded cluster's raylet killed underneath it. Reported per case: the
exit status, the seconds from the signal to the exit, the processes of the session still running 5 s
later, the ports it listened on that are still held, and which of its named listeners (HTTP, HAProxy's
stats and metrics, the dashboard) were open beyond loopback. Prints a table and writes stops.json and
stops.png.

    python -m jobs.benchmark stops                 # every case (~10 min on 2 cores)
    python -m jobs.benchmark stops --case serve-term-group --case finetune-int

The e2e test tests/e2e/test_stops.py runs the same cases and asserts everything but the seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
CONFIG = "jobs/configs/tiny-llama-reverse.yaml"
SERVE_READY = "Press Ctrl-C to stop."
# The limit the issue sets for any stop; shown as a line on the chart, never asserted by a test.
EXIT_LIMIT_S = 15.0
LEFT_AFTER_S = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Case:
    """One command and one way of stopping it."""

    name: str
    command: str  # serve, serve-haproxy, finetune, tune, demo
    how: str  # process, group, raylet
    signum: int = signal.SIGTERM
    twice: bool = False
    expect_rc: tuple[int, ...] = (0,)
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # listeners to check: name -> port


# A signal to the whole process group reaches Ray's raylet too. The command's Ray core worker (C++) ends
# the process itself, with status 1, when it then loses its connection to the raylet's object store, which
# can come before the command's own stop is through: 1 is an expected status there. Nothing is left
# either way: the command's reaper process stops what remains (llmopt.processes.start_reaper).
CASES = {
    "serve-int": ("serve", "process", signal.SIGINT, False, (0,)),
    "serve-term-group": ("serve", "group", signal.SIGTERM, False, (0, 1)),
    "haproxy-term": ("serve-haproxy", "process", signal.SIGTERM, False, (0,)),
    "haproxy-term-group": ("serve-haproxy", "group", signal.SIGTERM, False, (0, 1)),
    "haproxy-term-group-twice": ("serve-haproxy", "group", signal.SIGTERM, True, (143, 1)),
    "haproxy-raylet-killed": ("serve-haproxy", "raylet", signal.SIGKILL, False, (1,)),
    "finetune-int": ("finetune", "process", signal.SIGINT, False, (130,)),
    "finetune-term-group": ("finetune", "group", signal.SIGTERM, False, (143, 1)),
    "tune-int-group": ("tune", "group", signal.SIGINT, False, (130, 1)),
    "demo-term": ("demo", "process", signal.SIGTERM, False, (143,)),
}


def make_case(name: str) -> Case:
    command, how, signum, twice, rc = CASES[name]
    case = Case(name, command, how, signum, twice, rc)
    if command.startswith("serve"):
        case.ports["http"] = free_port()
    if command == "serve-haproxy":
        case.ports["haproxy-stats"] = free_port()
        case.ports["haproxy-metrics"] = free_port()
        case.env = {
            "RAY_SERVE_HAPROXY_STATS_PORT": str(case.ports["haproxy-stats"]),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(case.ports["haproxy-metrics"]),
        }
    return case


def _argv(case: Case, workdir: Path) -> tuple[list[str], str]:
    """The command line and the output that shows it is at work (then the stop is sent)."""
    bin_dir = Path(sys.executable).parent
    llmopt = str(bin_dir / "llmopt")
    if case.command.startswith("serve"):
        argv = [llmopt, "serve", "--config", CONFIG, "--port", str(case.ports["http"])]
        if case.command == "serve-haproxy":
            argv.append("--throughput-optimized")
        return argv, SERVE_READY
    if case.command == "finetune":
        overrides = ["training.max_steps=400", f"output_dir={workdir}", "parallelism.num_workers=1"]
        return [llmopt, "finetune", "--config", CONFIG, *overrides], "fine-tune:"
    if case.command == "tune":
        argv = [llmopt, "tune", "--config", CONFIG, "--num-samples", "2", "--out", str(workdir / "tune")]
        return [*argv, "--trial-tokens", "400000", "--no-baseline"], "Trial status"
    return [sys.executable, "-m", "jobs.demo"], "4. LoRA fine-tune"


def _session(sid: int) -> list[psutil.Process]:
    """Live processes of the session `sid` (zombies are gone as far as resources go)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.name()}({proc.pid}): {' '.join(proc.cmdline())[:100]}"
    except psutil.Error:
        return f"({proc.pid})"


def _listeners(pids: set[int]) -> list[tuple[str, int, int]]:
    try:
        conns = psutil.net_connections("inet")
    except (psutil.Error, OSError):
        return []
    return [
        (c.laddr.ip, c.laddr.port, c.pid) for c in conns if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


def _held(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0")):
        with socket.socket(family) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return True
    return False


def run_case(case: Case, workdir: Path, ready_timeout_s: float = 600, exit_timeout_s: float = 90) -> dict:
    """Start the case's command, stop it its way, and report how it ended (see the module docstring)."""
    argv, ready = _argv(case, workdir)
    log_path = workdir / f"{case.name}.log"
    env = {**os.environ, **case.env, "PYTHONPATH": str(REPO)}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a session and process group of its own, as a supervisor starts it
            # SIGINT at its default, as in a terminal, even where this run ignores it (a background job).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    sid = proc.pid
    result: dict[str, Any] = {"case": case.name, "command": " ".join(argv[1:])}
    try:
        deadline = time.monotonic() + ready_timeout_s
        while ready not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                result.update(error="exited or stalled before it was at work", rc=proc.poll())
                return result
            time.sleep(0.5)
        time.sleep(2.0 if case.command.startswith("serve") else 5.0)  # at work, not at its first step
        tree = {p.pid for p in _session(sid)} | {sid}
        listening = _listeners(tree)
        result["listeners"] = sorted({f"{ip}:{port}" for ip, port, _ in listening})
        named = set(case.ports.values())
        result["named_beyond_loopback"] = sorted(
            f"{ip}:{port}" for ip, port, _ in listening if port in named and ip not in ("127.0.0.1", "::1")
        )
        start = time.monotonic()
        if case.how == "raylet":
            for child in _session(sid):
                with contextlib.suppress(psutil.Error):
                    if child.name() == "raylet":
                        child.kill()
        else:
            send = os.killpg if case.how == "group" else os.kill
            send(sid, case.signum)
            if case.twice:
                time.sleep(0.5)
                with contextlib.suppress(ProcessLookupError):
                    send(sid, case.signum)
        try:
            result["rc"] = proc.wait(timeout=exit_timeout_s)
            result["exit_s"] = round(time.monotonic() - start, 2)
        except subprocess.TimeoutExpired:
            result.update(rc=None, exit_s=None, error=f"still running {exit_timeout_s:g} s after the stop")
        # When Ray ended the command itself, its reaper stops what remains just after it: left behind is
        # what still runs 5 s later.
        deadline = time.monotonic() + LEFT_AFTER_S
        while (left := _session(sid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if result["exit_s"] is not None and not left:
            result["session_empty_s"] = round(time.monotonic() - start - result["exit_s"], 2)
        result["left"] = [_describe(p) for p in left]
        # Only the named ports: Ray's own ports are random, and another cluster on the machine may take
        # one of them as soon as it is freed.
        result["ports_held"] = sorted(p for p in named if _held(p))
        result["expected_rc"] = list(case.expect_rc)
        result["log_tail"] = log_path.read_text(errors="replace")[-1500:]
        return result
    finally:
        for child in [*_session(sid), proc]:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def problems(result: dict) -> list[str]:
    """What is wrong with a case's ending, apart from its duration."""
    found = []
    if result.get("error"):
        found.append(result["error"])
    if result.get("rc") not in result.get("expected_rc", []):
        found.append(f"exit status {result.get('rc')}, expected one of {result.get('expected_rc')}")
    if result.get("left"):
        found.append(f"processes left: {result['left']}")
    if result.get("ports_held"):
        found.append(f"ports still held: {result['ports_held']}")
    if result.get("named_beyond_loopback"):
        found.append(f"named listeners beyond loopback: {result['named_beyond_loopback']}")
    return found


def add_stops_parser(sub) -> None:
    parser = sub.add_parser("stops", help="Time to exit and leftovers for each way of stopping a command.")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="Run only these (repeatable).")
    parser.add_argument("--out", default="outputs/benchmark", help="Output directory.")


def run_stops(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    names = args.case or list(CASES)
    results = []
    with tempfile.TemporaryDirectory(prefix="llmopt-stops-") as tmp:
        for name in names:
            console.print(f"[bold]{name}[/] ...", highlight=False)
            result = run_case(make_case(name), Path(tmp))
            result["problems"] = problems(result)
            results.append(result)
    table = Table("case", "exit status", "time to exit", "processes left", "ports held", "problems")
    for r in results:
        exit_s = r.get("exit_s")
        table.add_row(
            r["case"],
            str(r.get("rc")),
            "-" if exit_s is None else f"{exit_s:.1f} s",
            str(len(r.get("left", []))),
            str(len(r.get("ports_held", []))),
            "; ".join(r["problems"]) or "none",
        )
    console.print(table)
    report = {"exit_limit_s": EXIT_LIMIT_S, "date": time.strftime("%Y-%m-%d"), "cases": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        r.pop("log_tail", None) if not r["problems"] else None
    (out / "stops.json").write_text(json.dumps(report, indent=2))
    _plot(results, out / "stops.png")
    console.print(f"wrote {out / 'stops.json'} and {out / 'stops.png'}", highlight=False)
    if any(r["problems"] for r in results):
        raise SystemExit("some stops were not clean: see the table")
    return report


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in results]
    seconds = [r.get("exit_s") or 0.0 for r in results]
    colors = ["tab:red" if r["problems"] else "tab:blue" for r in results]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    ax.barh(names, seconds, color=colors)
    ax.axvline(EXIT_LIMIT_S, color="gray", linestyle="--", label=f"{EXIT_LIMIT_S:g} s limit")
    for y, s in enumerate(seconds):
        ax.text(s + 0.2, y, f"{s:.1f} s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the stop to the exit (red: not clean)")
    ax.set_title("Stopping llmopt's commands")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
