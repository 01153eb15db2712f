"""Processes of a command: stopping cleanly whatever signal arrives and to whom, and the ports it opens.

A command that starts the embedded Ray cluster (`llmopt serve`, `finetune`, `tune`, the demo) owns a tree of
processes: Ray's GCS, raylet, dashboard and workers, and under a Serve proxy actor possibly HAProxy. A stop
has to take all of them, in every way a stop arrives:

- Ctrl-C, or SIGTERM to the command alone (`kill PID`, `docker stop`): the command's own shutdown runs
  (Serve's, Ray's), bounded in time.
- SIGTERM to the whole process group (systemd, supervisors, `kill -- -PGID`): Ray's processes receive it
  too and die first, so a shutdown that talks to them would wait for a cluster that is gone. The command
  checks whether the cluster still lives and skips what would hang.
- The cluster dying underneath (its raylet or GCS killed): a watcher notices and stops the command.
- A second signal: the command kills its tree and exits at once.

Whatever path is taken, a watchdog ends the process `grace_s` seconds after the first signal, and the
command kills every process it leaves behind: the command registers as a child subreaper (Linux), so a
process whose parent died (HAProxy under a killed proxy actor) is re-parented to the command rather than to
init, and is found among its descendants.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

__all__ = [
    "StopGuard",
    "become_subreaper",
    "embedded_cluster_alive",
    "kill_descendants",
    "port_holder",
    "port_problem",
    "ray_session",
    "run_bounded",
    "start_reaper",
]

_PR_SET_CHILD_SUBREAPER = 36
# Descendants that a stop leaves running: the reaper below, which must outlive the command.
_SPARED: set[int] = set()


def become_subreaper() -> bool:
    """Make orphaned descendants this process's children (Linux `PR_SET_CHILD_SUBREAPER`).

    Returns:
        Whether it took effect (False on other systems).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def kill_descendants(timeout_s: float = 2.0, force: bool = False) -> list[str]:
    """Stop every descendant of this process and reap them: SIGTERM, then SIGKILL after `timeout_s`.

    Repeated until none is left: a raylet still alive while its workers die starts new ones.

    Args:
        timeout_s: How long SIGTERM has to work.
        force: SIGKILL at once.

    Returns:
        `name(pid)` of each process that was still running.
    """
    stopped: list[str] = []
    for _ in range(5):
        try:
            procs = [
                p for p in psutil.Process().children(recursive=True) if _running(p) and p.pid not in _SPARED
            ]
        except psutil.Error:
            break
        if not procs:
            break
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                stopped.append(f"{proc.name()}({proc.pid})")
        _stop(procs, timeout_s, force)
    # Orphans re-parented here by the subreaper flag end as this process's zombies: collect them by pid.
    with contextlib.suppress(psutil.Error):
        psutil.wait_procs(psutil.Process().children(), timeout=0)
    return stopped


def _stop(procs: list[psutil.Process], timeout_s: float, force: bool = False) -> None:
    """SIGTERM each process (SIGKILL with `force`), SIGKILL those still running after `timeout_s`; wait."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill() if force else proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=0 if force else timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=max(timeout_s, 1.0))


def _own_node() -> Any:
    """The Ray node this process started in-process, or None (Ray not initialized, or a joined cluster).

    Ray's private API (`ray._private.worker._global_node`): only a node of its own can be checked and
    cleaned up after without asking the cluster, which may hang.
    """
    import ray

    node = ray._private.worker._global_node
    if node is None or not ray.is_initialized() or not getattr(node, "head", False):
        return None
    return node


def run_bounded(
    fn: Callable[[], Any], timeout_s: float, still_useful: Callable[[], bool] | None = None
) -> bool:
    """Run `fn` in a daemon thread and wait at most `timeout_s` for it.

    Ray's shutdown calls block on a cluster that may be gone; a stop must not wait for them forever.

    Args:
        fn: The call.
        timeout_s: The longest wait.
        still_useful: Checked while waiting; the wait ends early once it returns False (the cluster the
            call talks to died meanwhile).

    Returns:
        Whether `fn` returned (raising counts as returned) in time.
    """
    done = threading.Event()

    def target() -> None:
        try:
            fn()
        except BaseException:  # a failed shutdown step is over too: the stop goes on
            pass
        finally:
            done.set()

    threading.Thread(target=target, name=f"bounded-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(min(0.2, max(deadline - time.monotonic(), 0))):
        if time.monotonic() >= deadline or (still_useful is not None and not still_useful()):
            return False
    return True


def embedded_cluster_alive() -> bool:
    """Whether the Ray cluster this process started in-process still has its GCS and raylet.

    True when this process started no cluster (it joined one, or Ray is not initialized): only a cluster of
    its own can be checked without asking the cluster itself, which may hang.
    """
    try:
        node = _own_node()
        if node is None:
            return True
        for kind in ("gcs_server", "raylet"):
            for info in node.all_processes.get(kind, []):
                if info.process is not None and info.process.poll() is not None:
                    return False
        return True
    except Exception:  # another Ray version: assume alive and let the bounded shutdown decide
        return True


class StopGuard:
    """Signal handling, a watchdog and clean-up for a command that owns a Ray cluster or joins one.

    Use::

        with StopGuard("llmopt serve") as guard:
            ...  # a stop signal raises KeyboardInterrupt here
            guard.bounded(serve.shutdown, 8)  # skipped when the embedded cluster is gone

    The first SIGINT/SIGTERM raises KeyboardInterrupt in the main thread and arms a watchdog that, after
    `grace_s`, kills this process's descendants and exits with 128 + the signal's number. A second signal
    does that at once. On leaving the block every descendant still running is killed, so nothing of the
    command outlives it. `watch_cluster` starts a thread that stops the command (as SIGTERM would) when the
    embedded cluster dies underneath it; `cluster_died` tells afterwards whether that happened.
    """

    def __init__(self, name: str, grace_s: float = 12.0, poll_s: float = 1.0) -> None:
        self.name = name
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.signum: int | None = None
        self.cluster_died = False
        self.ray_stopped = True  # False once a bounded `ray.shutdown` did not finish
        self._deadline: float | None = None
        self._signalled_at: float | None = None
        self._tree_at_signal: list[psutil.Process] = []
        self._group_signal: bool | None = None
        self._previous: dict[int, Any] = {}
        self._watching = threading.Event()

    def __enter__(self) -> StopGuard:
        become_subreaper()
        self.arm()
        return self

    def arm(self) -> None:
        """(Re)install the handlers: call it again after `ray.init`, whose core worker installs its own
        SIGTERM handler (one that aborts the process)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, self._on_signal)
            self._previous.setdefault(signum, previous)

    def __exit__(self, *exc: object) -> None:
        self._watching.clear()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        kill_descendants()

    @property
    def stopping(self) -> bool:
        """Whether a stop signal arrived (or the cluster died)."""
        return self.signum is not None

    def remaining(self) -> float:
        """Seconds left of the grace period (all of it before any stop)."""
        return self.grace_s if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def bounded(self, fn: Callable[[], Any], timeout_s: float, needs_cluster: bool = True) -> bool:
        """Run a shutdown step for at most `timeout_s` (and never past the grace period).

        Args:
            fn: The step (`serve.shutdown`, `ray.shutdown`, ...).
            timeout_s: Its limit.
            needs_cluster: Skip it when the embedded cluster is gone: it would only wait for it.

        Returns:
            Whether the step ran to its end.
        """
        if needs_cluster and not self.cluster_usable():
            return False
        limit = min(timeout_s, max(self.remaining() - 2.0, 0.5))

        return run_bounded(fn, limit, self.cluster_usable if needs_cluster else None)

    def cluster_usable(self) -> bool:
        """Whether shutdown steps that talk to the cluster can still succeed.

        Not when the embedded cluster's GCS or raylet died, nor when the stop signal went to the whole
        process group: Ray's workers (the Serve controller among them) die of it at once while the raylet
        drains for many seconds, so a shutdown would wait on dead actors. The second case shows as
        descendants exiting within half a second of the signal, which a signal to this process alone
        never causes.
        """
        if not embedded_cluster_alive():
            return False
        if self._signalled_at is None:
            return True
        if self._group_signal is None:  # judged once, before any shutdown step ends processes itself
            time.sleep(max(0.0, self._signalled_at + 0.5 - time.monotonic()))
            self._group_signal = not all(_running(proc) for proc in self._tree_at_signal)
        return not self._group_signal

    def shutdown_ray(self) -> bool:
        """`ray.shutdown()`, bounded: it stops the embedded cluster (only disconnects from a joined one).

        When the cluster is no longer usable (a group signal, a dead raylet), what is left of it is killed
        first: Ray's own stop would wait seconds for each process to drain, and then it only lets go.
        """
        import ray

        usable = self.cluster_usable()
        if not usable:
            kill_descendants(timeout_s=1.0)
        done = self.bounded(ray.shutdown, 3 if usable else 2, needs_cluster=False)
        if not done:  # Ray's exit hook would run the same stuck shutdown again, unbounded
            atexit.unregister(ray.shutdown)
        self.ray_stopped = done
        return done

    def leave(self, code: int = 0) -> None:
        """End the command with `code` once its work and messages are done.

        After a clean Ray shutdown this is the normal exit (returning for 0). Otherwise the process exits at
        once, its output flushed: the interpreter's teardown destroys Ray's core worker, which waits on
        connections to the processes that are gone, for many seconds and past the watchdog, whose thread
        no longer runs by then.
        """
        if self.ray_stopped:
            if code:
                raise SystemExit(code)
            return
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    def watch_cluster(self) -> None:
        """Stop the command when the embedded cluster's GCS or raylet dies."""
        self._watching.set()

        def watch() -> None:
            while self._watching.is_set() and not self.stopping:
                if not embedded_cluster_alive():
                    self.cluster_died = True
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                time.sleep(self.poll_s)

        threading.Thread(target=watch, name="cluster-watch", daemon=True).start()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            self._force(signum, "second stop signal")
        self.signum = signum
        self._signalled_at = time.monotonic()
        self._deadline = self._signalled_at + self.grace_s
        with contextlib.suppress(psutil.Error):
            self._tree_at_signal = [p for p in psutil.Process().children(recursive=True) if _running(p)]
        timer = threading.Timer(self.grace_s, self._force, (signum, f"not stopped within {self.grace_s:g} s"))
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    def _force(self, signum: int, why: str) -> None:
        print(f"{self.name}: {why}; killing its processes and exiting", file=sys.stderr, flush=True)
        kill_descendants(timeout_s=1.0, force=True)
        os._exit(128 + signum)


@contextlib.contextmanager
def ray_session(name: str, address: str | None = None, **init_kwargs: Any) -> Iterator[StopGuard | None]:
    """Start or join Ray for a command under a `StopGuard`, so that any stop ends it cleanly.

    The body runs with Ray initialized. A stop signal (or the embedded cluster dying) interrupts it: Ray is
    shut down within the grace period and the process exits with 128 + the signal's number (130 for Ctrl-C,
    143 for SIGTERM), or 1 when the cluster died, after one line on stderr saying so. A body that ends
    normally has Ray shut down too; a body that handles KeyboardInterrupt itself (`llmopt serve`, for
    which a stop is the normal end) decides its own exit, through `StopGuard.leave`.

    A process that runs Ray already (a notebook, a test session) keeps its cluster and its own signal
    handling: the body runs as is, with no guard (None).

    Args:
        name: The command, for messages (`llmopt finetune`).
        address: A cluster to join (else RAY_ADDRESS, else an embedded one).
        **init_kwargs: Passed to `ray.init` (see `llmopt.cluster.init_ray`).
    """
    import ray

    from llmopt.cluster import init_ray

    if ray.is_initialized():
        yield None
        return
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    # Ray Tune's Ctrl-C handler would replace this one during `Tuner.fit` and leave SIGTERM to the default.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    with StopGuard(name) as guard:
        init_ray(address, **init_kwargs)
        guard.arm()  # after ray.init: its core worker installs a SIGTERM handler that aborts the process
        if not joined:
            guard.watch_cluster()
            start_reaper()
        code = None
        try:
            yield guard
        except KeyboardInterrupt:
            if guard.cluster_died:
                print(
                    f"{name}: the Ray cluster stopped underneath it (its GCS or raylet died)", file=sys.stderr
                )
                code = 1
            else:
                signum = guard.signum or signal.SIGINT
                print(f"{name}: interrupted by {signal.Signals(signum).name}; stopping", file=sys.stderr)
                code = 128 + signum
        finally:
            # Before the guard kills what is left: Ray's exit hook would otherwise wait on a killed cluster.
            guard.shutdown_ray()
    if code is not None:
        guard.leave(code)


def start_reaper() -> int | None:
    """Start a process that ends this command's embedded cluster after the command, however it ends.

    The command's own stop kills its process tree, but Ray can end the command before that runs: when a
    signal to the whole group takes the raylet's object store, Ray's core worker exits the process at once
    (status 1). Workers the draining raylet started after the signal then run on, orphaned, for half a
    minute. The reaper (`python -m llmopt.processes`) ignores the stop signals, follows the command's tree
    while the command lives, and when it is gone stops what is left of it and every process of its Ray
    session, then exits.

    Returns:
        The reaper's pid, or None when this process runs no Ray cluster of its own.
    """
    import subprocess

    try:
        node = _own_node()
        session_dir = node.get_session_dir_path() if node is not None else None
    except Exception:  # another Ray version: the command's own stop is all there is
        session_dir = None
    if not session_dir:
        return None
    reaper = subprocess.Popen(
        [sys.executable, "-m", "llmopt.processes", str(os.getpid()), session_dir],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _SPARED.add(reaper.pid)
    return reaper.pid


def _reap(command_pid: int, session_dir: str, poll_s: float = 0.5) -> None:
    """The reaper's work (see `start_reaper`)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    me = os.getpid()
    try:
        command = psutil.Process(command_pid)
        tree: list[psutil.Process] = []
        while _running(command):
            with contextlib.suppress(psutil.Error):
                tree = [p for p in command.children(recursive=True) if p.pid != me]
            time.sleep(poll_s)
    except psutil.Error:
        tree = []

    ours = re.compile(re.escape(session_dir.rstrip("/")) + r"(?![\w.-])")  # not session_..._123 of _1234

    def of_session() -> list[psutil.Process]:
        return [proc for proc in psutil.process_iter() if proc.pid != me and _in_session(proc, ours)]

    for _ in range(3):  # a raylet still draining may start workers meanwhile
        procs = [p for p in {*tree, *of_session()} if _running(p)]
        tree = []
        if not procs:
            return
        _stop(procs, 2.0)


def _in_session(proc: psutil.Process, session: re.Pattern[str]) -> bool:
    """Whether the session directory is in the process's command line, or its stdout or stderr is a file
    under it. A Ray worker renames itself (`ray::ProxyActor`), which drops the session from its command
    line, but writes to `<session>/logs/worker-*.out`: a worker missing from the command's last look at
    its tree (one the draining raylet started afterwards) is found that way."""
    try:
        if any(session.search(arg) for arg in proc.cmdline()):
            return True
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if session.search(os.readlink(f"/proc/{proc.pid}/fd/{fd}")):
                    return True
    except psutil.Error:
        pass
    return False


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def port_holder(host: str, port: int) -> str | None:
    """`name (pid N): command line` of the process listening on host:port (or on every interface), if
    this user can see it."""
    wanted = {host, "0.0.0.0", "::"} if host not in ("0.0.0.0", "::") else None
    try:
        connections = psutil.net_connections("inet")
    except (psutil.Error, OSError):
        return None
    for conn in connections:
        if conn.status != psutil.CONN_LISTEN or conn.laddr.port != port or conn.pid is None:
            continue
        if wanted is not None and conn.laddr.ip not in wanted:
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(conn.pid)
            command = " ".join(proc.cmdline())[:120]
            return f"{proc.name()} (pid {conn.pid}): {command}"
    return None


def port_problem(host: str, port: int) -> str | None:
    """Why this process could not listen on host:port, naming the process that holds it; None if free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            holder = port_holder(host, port)
            held = f"; held by {holder}" if holder else ""
            return f"cannot listen on {host}:{port} ({exc.strerror}){held}"
    return None


if __name__ == "__main__":  # the reaper: python -m llmopt.processes COMMAND_PID RAY_SESSION_DIR
    _reap(int(sys.argv[1]), sys.argv[2])
