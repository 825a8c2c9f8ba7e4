"""Pre-forking WSGI servers (gunicorn, uWSGI) in child processes, and an HTTP client to
drive them.

Each server runs in a process group of its own (``start_new_session``), with stdout and
stderr going to one log file, so that :meth:`WsgiServer.close` can SIGKILL the master and
every worker at once, whatever state they are in (a worker deadlocked at boot included).
Every wait is bounded.

Workers are found from the process tree: the processes whose parent is the master (read
from ``/proc/<pid>/stat``; ``/proc/<pid>/task/*/children`` is not in every kernel).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .ports import check_loopback, free_port

__all__ = [
    "PID_HEADER",
    "Reply",
    "WsgiServer",
    "WsgiServerError",
    "children_of",
    "fan_out",
    "get",
    "gunicorn_argv",
    "log_events",
    "server_binary",
    "thread_count",
    "uwsgi_argv",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]
#: The header in which the test apps name the process that answered.
PID_HEADER = "X-Worker-Pid"
_BIND_FAILURE = ("Address already in use", "Connection in use", "probably another instance")
_LOG_TAIL = 30000


class WsgiServerError(RuntimeError):
    """A server did not start, stop or behave in time; the message has its log's tail."""


def server_binary(name: str) -> str:
    """The ``gunicorn`` or ``uwsgi`` next to this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise WsgiServerError(f"{name} is not installed (looked beside {sys.executable})")
    return found


def gunicorn_argv(
    port: int,
    app: str,
    *,
    host: str = "127.0.0.1",
    preload: bool = False,
    workers: int = 3,
    threads: int = 4,
    worker_class: str = "gthread",
    extra: Sequence[str] = (),
) -> list[str]:
    """A gunicorn command line (gunicorn >= 25 gets ``--no-control-socket``)."""
    argv = [server_binary("gunicorn"), "--bind", f"{host}:{port}"]
    argv += ["--workers", str(workers), "--worker-class", worker_class]
    if worker_class == "gthread":
        argv += ["--threads", str(threads)]
    argv += ["--graceful-timeout", "10", "--timeout", "30", "--log-level", "info"]
    if _gunicorn_has_control_socket():
        argv.append("--no-control-socket")
    if preload:
        argv.append("--preload")
    return [*argv, *extra, app]


def uwsgi_argv(
    port: int,
    module: str,
    *,
    host: str = "127.0.0.1",
    lazy_apps: bool = False,
    fork_hooks: bool = False,
    processes: int = 3,
    threads: int = 4,
    extra: Sequence[str] = (),
) -> list[str]:
    """A uWSGI command line: a master, ``processes`` workers of ``threads`` threads,
    plain HTTP on ``host:port``, SIGTERM stops (not reloads), bounded mercy."""
    argv = [server_binary("uwsgi"), "--http-socket", f"{host}:{port}", "--module", module]
    argv += ["--master", "--processes", str(processes), "--threads", str(threads)]
    argv += ["--die-on-term", "--need-app", "--disable-logging", "--strict"]
    argv += ["--worker-reload-mercy", "5", "--reload-mercy", "5"]
    if lazy_apps:
        argv.append("--lazy-apps")
    if fork_hooks:
        argv.append("--py-call-uwsgi-fork-hooks")
    return [*argv, *extra]


_control_socket: bool | None = None


def _gunicorn_has_control_socket() -> bool:
    global _control_socket
    if _control_socket is None:
        out = subprocess.run(
            [server_binary("gunicorn"), "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        _control_socket = "--no-control-socket" in out
    return _control_socket


# -- the server process ----------------------------------------------------------------


class WsgiServer:
    """One gunicorn or uWSGI master (and its workers) in a process group of its own.

    Args:
        name: for messages (``"gunicorn --preload"``...).
        argv: ``argv(port) -> command line``.
        log_path: where stdout and stderr go (appended; one file per start).
        env: extra environment variables.
        host: the loopback address to bind.
    """

    def __init__(
        self,
        name: str,
        argv: Callable[[int], list[str]],
        log_path: str | os.PathLike[str],
        *,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.host = check_loopback(host)
        self._argv = argv
        self.log_path = Path(log_path)
        self._env = dict(env or {})
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 20.0, *, port_attempts: int = 3) -> WsgiServer:
        """Spawn the master on a free port and wait until the port accepts connections.
        A port taken meanwhile is replaced by another (``port_attempts`` in all).

        Raises:
            WsgiServerError: the master exited first, or nothing listened in time.
        """
        for attempt in range(port_attempts):
            self.spawn()
            try:
                self._await_listening(timeout)
                return self
            except WsgiServerError:
                bind_failed = any(text in self.log_text() for text in _BIND_FAILURE)
                self.kill()
                if not bind_failed or attempt == port_attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def spawn(self) -> WsgiServer:
        """Spawn the master on a free port and return at once (see :meth:`start`)."""
        self.port = free_port(self.host)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.update(self._env)
        argv = self._argv(self.port)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(_REPO_ROOT),
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        return self

    def _await_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pause = threading.Event()  # never set: a bounded pause between polls
        while True:
            if self.returncode is not None:
                raise WsgiServerError(self.describe(f"exited with {self.returncode} first"))
            try:
                with contextlib.closing(
                    http.client.HTTPConnection(self.host, self.port, timeout=1.0)
                ) as probe:
                    probe.connect()
                return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise WsgiServerError(self.describe(f"not listening within {timeout}s"))
            pause.wait(0.02)

    @property
    def pid(self) -> int:
        """The master's pid (also the process group's id)."""
        if self.proc is None:
            raise WsgiServerError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def worker_pids(self) -> set[int]:
        """The master's children right now."""
        return children_of(self.pid)

    def wait_for_workers(self, count: int, timeout: float = 20.0) -> set[int]:
        """Block until the master has ``count`` children; return their pids.

        Raises:
            WsgiServerError: the master exited, or not ``count`` children in time.
        """
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            pids = self.worker_pids()
            if len(pids) == count:
                return pids
            if self.returncode is not None:
                raise WsgiServerError(self.describe(f"exited with {self.returncode}"))
            if time.monotonic() >= deadline:
                raise WsgiServerError(
                    self.describe(f"{len(pids)} workers after {timeout}s, not {count}: {pids}")
                )
            pause.wait(0.02)

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the master alone."""
        if self.returncode is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        """Wait for the master to exit, at most ``timeout`` s; return its exit code.

        Raises:
            WsgiServerError: still running (it is left running: :meth:`close` kills it).
        """
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise WsgiServerError(self.describe(f"still running after {timeout}s")) from None

    def stop(self, timeout: float = 20.0, signum: int = signal.SIGTERM) -> int:
        """Stop gracefully (``signum`` to the master) and wait; return the exit code.

        Raises:
            WsgiServerError: it did not exit within ``timeout`` (the group is then killed).
        """
        self.send_signal(signum)
        try:
            return self.wait(timeout)
        except WsgiServerError:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the whole process group (master and workers) and reap the master."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    close = kill

    # -- the log ------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def describe(self, what: str) -> str:
        text = self.log_text()
        if len(text) > _LOG_TAIL:
            text = "...\n" + text[-_LOG_TAIL:]
        pid = None if self.proc is None else self.proc.pid
        return f"{self.name} on {self.host}:{self.port} (pid {pid}): {what}\n--- log ---\n{text}"

    def __repr__(self) -> str:
        return f"<WsgiServer {self.name} {self.host}:{self.port} rc={self.returncode}>"


def children_of(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (a scan of ``/proc``)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # After the command: state, ppid, ...; a zombie is no worker.
        if int(fields[1]) == pid and fields[0] != b"Z":
            found.add(int(entry))
    return found


def thread_count(pid: int) -> int | None:
    """How many threads ``pid`` has (None: gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def log_events(text: str) -> list[dict[str, Any]]:
    """The JSON objects in the log (the test apps' structlog events), in order.

    Found anywhere in a line, several to a line too: processes that share a log file can
    write a line in pieces (a message, then its newline) that interleave."""
    decoder = json.JSONDecoder()
    events = []
    for line in text.splitlines():
        start = line.find("{")
        while start != -1:
            try:
                value, end = decoder.raw_decode(line, start)
            except ValueError:
                start = line.find("{", start + 1)
                continue
            if isinstance(value, dict):
                events.append(value)
            start = line.find("{", end)
    return events


# -- the HTTP client -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reply:
    """One HTTP exchange. ``status`` 0 means no answer (``error`` says why)."""

    status: int
    pid: int | None
    body: Any
    started: float  # time.monotonic() when the request was sent
    ended: float
    error: str | None = None


def get(host: str, port: int, path: str, timeout: float = 10.0) -> Reply:
    """``GET path`` on a fresh connection (``Connection: close``); never raises."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        raw = response.read()
        pid_text = response.getheader(PID_HEADER)
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        return Reply(
            response.status,
            int(pid_text) if pid_text else None,
            body,
            started,
            time.monotonic(),
        )
    except (OSError, http.client.HTTPException) as exc:
        return Reply(0, None, None, started, time.monotonic(), f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def fan_out(
    host: str, port: int, paths: Iterable[str], *, clients: int = 12, timeout: float = 10.0
) -> list[Reply]:
    """Send every ``GET`` in ``paths`` over ``clients`` concurrent client threads, each
    on its own connection; return the replies in order."""
    with concurrent.futures.ThreadPoolExecutor(clients, thread_name_prefix="http") as pool:
        return list(pool.map(lambda path: get(host, port, path, timeout), paths))
