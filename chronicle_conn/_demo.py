"""``chronicle-conn demo``: a managed connection through a kernel crash and a hung kernel.

Runs the embedded kernel in a child process (so it can really be SIGKILLed), connects a
:class:`~chronicle_conn.Connection` to it and prints every state change as it happens:
the first connect, the crash being noticed, the recovery once the kernel is back on the
same port, and a kernel that stops sending keep-alives being caught. Every wait is
bounded; the whole run takes a few seconds and exits 0, or 1 with the reason.
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any, TextIO

import structlog
from google.protobuf import empty_pb2

from ._proto import host_pb2_grpc
from .connection import Connection
from .states import ConnectionState, StateChange

__all__ = ["DemoError", "run_demo"]

_S = ConnectionState


class DemoError(RuntimeError):
    """A step of the demo did not happen in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _KernelChild:
    """``chronicle-conn dev-server --control-stdin`` in a child process."""

    def __init__(self, port: int, keepalive_interval: float) -> None:
        self.port = port
        self._argv = [
            sys.executable,
            "-m",
            "chronicle_conn",
            "dev-server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--keepalive-interval",
            str(keepalive_interval),
            "--control-stdin",
        ]
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else -1

    def start(self, timeout: float) -> None:
        """Start it and wait (bounded) for its "listening" line; retries a busy port."""
        deadline = time.monotonic() + timeout
        while True:
            self._lines = queue.Queue()
            self._proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            assert self._proc.stdout is not None
            threading.Thread(
                target=_pump, args=(self._proc.stdout, self._lines), daemon=True
            ).start()
            line = self._line(deadline)
            if line is not None and "listening on" in line:
                return
            self._proc.wait(5)
            if time.monotonic() >= deadline:  # the port may still be held briefly: retry
                raise DemoError(f"the kernel did not start on port {self.port}")
            threading.Event().wait(0.2)

    def _line(self, deadline: float) -> str | None:
        try:
            return self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def command(self, command: str, timeout: float = 5.0) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise DemoError("the kernel is not running")
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        line = self._line(time.monotonic() + timeout)
        if line is None:
            raise DemoError(f"the kernel did not answer {command!r}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(10)
            self._close_pipes()

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # end of input stops a --control-stdin server
            proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        proc = self._proc
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    try:
        for line in stream:
            lines.put(line.rstrip("\n"))
    except (OSError, ValueError):
        pass
    lines.put(None)


class _Printer:
    """Timestamped lines, from any thread, in order."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.started = time.monotonic()

    def __call__(self, who: str, text: str) -> None:
        elapsed = time.monotonic() - self.started
        with self._lock:
            print(f"[{elapsed:+8.3f}s] {who:<11} {text}", file=self._out, flush=True)


class _Watcher:
    """A listener that prints each change and lets the demo wait for the next one."""

    def __init__(self, say: _Printer) -> None:
        self._say = say
        self._cond = threading.Condition()
        self.changes: list[tuple[float, StateChange]] = []

    def __call__(self, change: StateChange) -> None:
        now = time.monotonic()
        text = f"{change.old.value} -> {change.new.value}"
        if change.new is _S.CONNECTED:
            text += f" (generation {change.generation}, attempt {change.attempt})"
        if change.error:
            text += f": {change.error}"
        self._say("connection", text)
        with self._cond:
            self.changes.append((now, change))
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.changes)

    def wait_for(self, state: ConnectionState, since: int, timeout: float) -> float:
        """Block until a change to ``state`` (after index ``since``); return its time."""
        with self._cond:
            found = self._cond.wait_for(
                lambda: any(c.new is state for _, c in self.changes[since:]), timeout
            )
            if not found:
                raise DemoError(f"the connection did not become {state.value} in {timeout:g}s")
            return next(t for t, c in self.changes[since:] if c.new is state)


def run_demo(out: TextIO = sys.stdout, *, verbose: bool = False) -> int:
    """Run the demo, printing to ``out``; return the exit code."""
    say = _Printer(out)
    logger = structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(20 if verbose else 40),
    )
    port = _free_port()
    interval, stale_after = 0.5, 2.0
    kernel = _KernelChild(port, interval)
    conn: Connection | None = None
    try:
        kernel.start(timeout=20)
        say(
            "kernel",
            f"started (pid {kernel.pid}) on 127.0.0.1:{port}, keep-alive every {interval:g}s",
        )
        watcher = _Watcher(say)
        conn = Connection(
            f"chronicle://127.0.0.1:{port}?disableTls=true",
            auto_connect=False,
            retry_attempts=None,
            reconnect_base_delay=0.5,
            reconnect_max_delay=2.0,
            keepalive_stale_after=stale_after,
            logger=logger,
        )
        conn.add_listener(watcher)
        mark = watcher.mark()
        conn.connect(timeout=15)
        watcher.wait_for(_S.CONNECTED, mark, 5)
        stub = host_pb2_grpc.ServerStub(conn.channel())
        reply = stub.GetVersionInfo(empty_pb2.Empty(), timeout=5)
        say("call", f"GetVersionInfo -> {reply.Version} (liveness: {conn.stats().liveness})")

        # 1. A crash: SIGKILL, noticed by the transport and confirmed by a ready probe.
        mark = watcher.mark()
        say("kernel", f"SIGKILL (pid {kernel.pid})")
        killed = time.monotonic()
        kernel.kill()
        lost = watcher.wait_for(_S.RECONNECTING, mark, 10)
        say("demo", f"crash noticed {(lost - killed) * 1000:.1f} ms after the SIGKILL")
        threading.Event().wait(1.5)  # an outage: the supervisor keeps dialing
        say("demo", f"{conn.stats().failed_attempts} attempt(s) failed during the outage")

        # 2. The kernel comes back on the same port; a caller is waiting in connect().
        mark = watcher.mark()
        kernel.start(timeout=20)
        back = time.monotonic()
        say("kernel", f"restarted (pid {kernel.pid}) on the same port")
        conn.connect(timeout=20)
        recovered = watcher.wait_for(_S.CONNECTED, mark, 5)
        say("demo", f"recovered {(recovered - back) * 1000:.0f} ms after the kernel was back")
        reply = stub.GetVersionInfo(empty_pb2.Empty(), timeout=5)
        say("call", f"GetVersionInfo through the stub made before the crash -> {reply.Version}")

        # 3. A hung kernel: the process lives, the Connect stream goes quiet.
        mark = watcher.mark()
        kernel.command("pause-keepalives")
        paused = time.monotonic()
        say("kernel", "stops sending keep-alives (a hung kernel)")
        lost = watcher.wait_for(_S.RECONNECTING, mark, stale_after + 10)
        say(
            "demo",
            f"hung kernel caught {lost - paused:.2f} s after it went quiet "
            f"(stale after {stale_after:g}s)",
        )
        mark = watcher.mark()
        kernel.command("resume-keepalives")
        say("kernel", "sends keep-alives again")
        watcher.wait_for(_S.CONNECTED, mark, 20)

        stats = conn.stats()
        conn.close()
        say(
            "demo",
            f"closed: {stats.connects} connects, {stats.disconnects} disconnects, "
            f"{stats.attempts} attempts, {stats.keepalives_received} keep-alives, "
            f"generation {stats.generation}",
        )
        say("demo", "ok")
        return 0
    except Exception as exc:
        say("demo", f"FAILED: {exc}")
        return 1
    finally:
        if conn is not None:
            conn.close()
        kernel.stop()
