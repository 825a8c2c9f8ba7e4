"""Servers in child processes: the machinery (:class:`ServerProcess`) and the embedded dev
kernel (``python -m chronicle_conn dev-server``) on it (:class:`KernelProcess`).

A real process, so tests can SIGKILL it and start it again on the same port. The child is
driven through its stdin control protocol: one command a line, one JSON answer a line.
:mod:`tests.harness.appserver` runs its application servers on the same machinery.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

from .ports import check_loopback, free_port

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+

__all__ = [
    "EOF",
    "KernelCommandError",
    "KernelError",
    "KernelProcess",
    "KernelStartError",
    "ServerCommandError",
    "ServerProcess",
    "ServerProcessError",
    "ServerStartError",
    "StoppingServer",
    "pump_lines",
    "spawn_child",
]

LISTENING = re.compile(r"^chronicle-conn dev-server listening on (?P<host>\S+):(?P<port>\d+)$")
_BIND_FAILURE = re.compile(r"bind|address already in use", re.IGNORECASE)
_REPO_ROOT = Path(__file__).resolve().parents[2]
EOF = object()  # queued by the reader thread when the child's stdout closes
_STDERR_TAIL = 6000


class ServerProcessError(RuntimeError):
    """A server process misbehaved; the message carries its stderr."""


class ServerStartError(ServerProcessError):
    """The child did not print its listening line in time, or exited first."""


class ServerCommandError(ServerProcessError):
    """A control command got no answer in time, or an answer that was not ``ok``."""


# The names these errors had when only the kernel ran on this machinery.
KernelError = ServerProcessError
KernelStartError = ServerStartError
KernelCommandError = ServerCommandError


@dataclasses.dataclass(eq=False)
class _Child:
    """One spawned child: its process, its stdout lines (a reader thread fills the
    queue), and its own stderr file."""

    number: int  # 1 for the first child of a ServerProcess, then 2, ...
    argv: tuple[str, ...]
    proc: subprocess.Popen[str]
    lines: queue.Queue[Any]
    reader: threading.Thread
    stderr_path: Path


class ServerProcess:
    """A server in a child process, on a fixed loopback port, driven over its stdin.

    The port is chosen once (``port=None``: a free one) and kept for the life of the
    object, so ``restart()`` brings the server back where clients expect it. Each child
    writes stderr to its own file; :meth:`stderr_text` joins them, oldest first.

    A subclass says what to run (:meth:`build_argv`), what its listening line looks like
    (:attr:`listening`, a regex with ``host`` and ``port`` groups) and what it is called
    in messages (:attr:`kind`).

    There is at most one *current* child: the one ``command()``, ``kill()`` and
    ``running`` are about. :meth:`_stop_gracefully` detaches it (it becomes a
    :class:`StoppingServer` that drains on its own) so that a new current child can be
    started on the same port while the old one finishes its calls.

    Not thread-safe except ``command()`` (and the helpers built on it), which serializes
    commands. Every blocking method has a bounded timeout.

    Args:
        port: the port to listen on; ``None`` picks a free one.
        host: ``127.0.0.1`` or ``::1``.
        env: extra environment variables for the child.
        extra_args: more command-line arguments for the child.
    """

    kind: ClassVar[str] = "server"
    listening: ClassVar[re.Pattern[str]] = LISTENING

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.host = check_loopback(host)
        self._auto_port = port is None
        self.port = free_port(host) if port is None else int(port)
        self.extra_args = tuple(extra_args)
        self._env = dict(env or {})
        self._child: _Child | None = None  # the current child; None once detached
        self._children: list[_Child] = []  # every child spawned, oldest first
        self._command_lock = threading.Lock()
        self._stderr_dir: Path | None = None
        self.starts = 0
        self._attempts = threading.Condition()
        self.bind_failures = 0  # starts that failed to bind, over this object's life
        self.stdout_noise: list[str] = []  # stdout lines that were neither protocol nor JSON

    # -- properties ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` for ``grpc.insecure_channel``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The pid of the current (or last killed) child; ``None`` before the first start
        and after a graceful stop detached it."""
        return None if self._child is None else self._child.proc.pid

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._child is None else self._child.proc.poll()

    def build_argv(self) -> list[str]:
        """The child's command line (a seam for tests of the harness itself)."""
        raise NotImplementedError

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 15.0, *, bind_retry: float | None = None) -> Self:
        """Spawn a child and block until it prints its listening line. Returns ``self``.

        With ``port=None`` a port that turns out to be taken is replaced by a fresh one.
        With a fixed port, a failed bind is retried for ``bind_retry`` seconds (default:
        not at all).

        Raises:
            ServerStartError: no listening line within ``timeout`` (the child is killed),
                or the child exited first. The message has the child's stderr.
        """
        if self.running:
            raise ServerProcessError(
                f"{self.kind} already running (pid {self.pid}) on {self.address}"
            )
        if bind_retry is None:
            bind_retry = timeout if self._auto_port else 0.0
        self._start(timeout, bind_retry=bind_retry, new_port=self._auto_port)
        return self

    def restart(self, timeout: float = 15.0, bind_retry: float = 5.0) -> Self:
        """Kill the current child if it runs, then start a new one on the same port.

        If the new child fails to bind (the port is briefly unavailable) it is retried
        for up to ``bind_retry`` seconds. A child stopped gracefully (and still draining)
        is not touched. Blocks; returns ``self``.
        """
        if self.running:
            self.kill()
        self._start(timeout, bind_retry=bind_retry, new_port=False)
        return self

    def kill(self, timeout: float = 5.0) -> int | None:
        """SIGKILL the current child and reap it. Idempotent. Returns its exit code.

        Raises:
            ServerProcessError: the child did not die within ``timeout`` (should not
                happen).
        """
        child = self._child
        if child is None:
            return None
        if child.proc.poll() is None:
            child.proc.kill()
        return self._reap(child, timeout, "SIGKILL")

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM the current child and wait for it to exit. Returns its exit code.

        Raises:
            ServerProcessError: it did not exit within ``timeout`` (it is then SIGKILLed).
        """
        child = self._require_child()
        if child.proc.poll() is None:
            child.proc.terminate()
        return self._reap(child, timeout, "SIGTERM")

    def stop(self, timeout: float = 10.0) -> int:
        """Send the ``stop`` command and wait for the child to exit. Returns its exit code."""
        child = self._require_child()
        with self._command_lock:
            self._write_line(child, "stop")
        return self._reap(child, timeout, "stop")

    def close(self) -> None:
        """Kill every child (the current one and any still draining) and remove their
        stderr files. Idempotent."""
        first: BaseException | None = None
        for child in self._children:
            try:
                if child.proc.poll() is None:
                    child.proc.kill()
                self._reap(child, 5.0, "SIGKILL")
            except BaseException as exc:
                first = first or exc
        if self._stderr_dir is not None:
            shutil.rmtree(self._stderr_dir, ignore_errors=True)
            self._stderr_dir = None
        if first is not None:
            raise first

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._child is None:
            state = "not running"
        else:
            state = f"pid {self.pid}" if self.running else f"exited {self.returncode}"
        return f"<{type(self).__name__} {self.address} {state}>"

    # -- control commands ---------------------------------------------------------------

    def command(self, cmd: str, timeout: float = 5.0, *, check: bool = True) -> dict[str, Any]:
        """Send one control command to the current child and return its JSON answer.
        Blocks; thread-safe.

        Stdout lines that are not JSON objects are skipped (kept in ``stdout_noise``).

        Raises:
            ServerCommandError: no answer within ``timeout``, the child exited, or (with
                ``check``) the answer's ``ok`` is not true.
        """
        if "\n" in cmd:
            raise ValueError(f"a command is one line: {cmd!r}")
        with self._command_lock:
            child = self._require_child()
            return self._exchange(child, cmd, timeout, check=check)

    def wait_for_bind_failures(self, count: int, timeout: float) -> bool:
        """Block until ``bind_failures >= count``, at most ``timeout`` s; ``False`` if not.

        Thread-safe: meant for a thread that watches a blocking ``start()``/``restart()``.
        """
        with self._attempts:
            return self._attempts.wait_for(lambda: self.bind_failures >= count, timeout)

    def stderr_text(self, *, current_only: bool = False) -> str:
        """The children's stderr so far: every child's, oldest first, each under a
        ``--- <kind> child N (pid P) ---`` line; or only the current (last) child's."""
        if current_only:
            child = self._child or (self._children[-1] if self._children else None)
            return "" if child is None else _read_text(child.stderr_path)
        return "".join(
            f"--- {self.kind} child {child.number} (pid {child.proc.pid}) ---\n"
            + _read_text(child.stderr_path)
            for child in self._children
        )

    def report_sections(self) -> list[tuple[str, str]]:
        """``(title, text)`` sections for a failed test's report: stderr, stray stdout."""
        sections = [(f"{self.kind} {self.address} stderr", self.stderr_text() or "(empty)")]
        if self.stdout_noise:
            sections.append(
                (f"{self.kind} {self.address} unexpected stdout", "\n".join(self.stdout_noise))
            )
        return sections

    # -- for subclasses -----------------------------------------------------------------

    def _stop_gracefully(self, cmd: str, timeout: float) -> StoppingServer:
        """Send ``cmd`` (a stop command the child answers once it has stopped listening),
        then detach the current child: it drains on its own while this object can start
        a new child on the same port. Blocks only for the answer.

        Raises:
            ServerCommandError: no ``ok`` answer within ``timeout`` (the child stays the
                current one).
        """
        with self._command_lock:
            child = self._require_child()
            answer = self._exchange(child, cmd, timeout, check=True)
            self._child = None
        return StoppingServer(self, child, answer)

    # -- internals ----------------------------------------------------------------------

    def _exchange(self, child: _Child, cmd: str, timeout: float, *, check: bool) -> dict[str, Any]:
        self._write_line(child, cmd)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = child.lines.get(timeout=max(0.0, remaining))
            except queue.Empty:
                raise ServerCommandError(
                    self._describe(f"no answer to {cmd!r} within {timeout}s", child)
                ) from None
            if line is EOF:
                child.lines.put(EOF)  # keep telling later readers
                child.proc.wait(timeout=5)
                raise ServerCommandError(self._describe(f"child exited during {cmd!r}", child))
            answer = _json_object(line)
            if answer is None:
                self.stdout_noise.append(line)
                continue
            break
        if check and answer.get("ok") is not True:
            raise ServerCommandError(self._describe(f"{cmd!r} answered {answer!r}", child))
        return answer

    def _start(self, timeout: float, *, bind_retry: float, new_port: bool) -> None:
        started = time.monotonic()
        retry_until = started + bind_retry
        pause = threading.Event()  # never set: a bounded pause between bind retries
        while True:
            remaining = timeout - (time.monotonic() - started)
            child = self._spawn()
            try:
                self._await_listening(child, max(remaining, 0.5))
                return
            except ServerStartError:
                bind_failed = bool(_BIND_FAILURE.search(_read_text(child.stderr_path)))
                if bind_failed:
                    with self._attempts:
                        self.bind_failures += 1
                        self._attempts.notify_all()
                if not bind_failed or time.monotonic() >= retry_until:
                    raise
            if new_port and self._auto_port:
                self.port = free_port(self.host)
            else:
                pause.wait(0.2)

    def _spawn(self) -> _Child:
        if self._stderr_dir is None:
            self._stderr_dir = Path(
                tempfile.mkdtemp(prefix=f"chronicle-{self.kind.replace(' ', '-')}-")
            )
        number = len(self._children) + 1
        stderr_path = self._stderr_dir / f"child-{number}.stderr"
        argv = tuple(self.build_argv())
        proc = spawn_child(argv, stderr_path, self._env)
        self.starts += 1
        assert proc.stdout is not None
        lines: queue.Queue[Any] = queue.Queue()
        reader = threading.Thread(
            target=pump_lines,
            args=(proc.stdout, lines),
            name=f"{type(self).__name__}[{self.port}]-stdout-{proc.pid}",
            daemon=True,
        )
        child = _Child(number, argv, proc, lines, reader, stderr_path)
        self._children.append(child)
        self._child = child
        reader.start()
        return child

    def _await_listening(self, child: _Child, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = child.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise ServerStartError(
                    self._describe(f"no listening line within {timeout:.1f}s (killed)", child)
                ) from None
            if line is EOF:
                self._reap(child, 5.0, "start")
                raise ServerStartError(
                    self._describe(f"exited with {child.proc.returncode} before listening", child)
                )
            match = self.listening.match(line)
            if match is None:
                self.stdout_noise.append(line)
                continue
            if int(match["port"]) != self.port or match["host"].strip("[]") != self.host:
                self.kill()
                raise ServerStartError(
                    self._describe(f"listening on the wrong address: {line!r}", child)
                )
            return

    def _reap(self, child: _Child, timeout: float, how: str, *, kill: bool = True) -> int:
        try:
            child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            what = f"did not exit within {timeout}s after {how}"
            if not kill:
                raise ServerProcessError(self._describe(what, child)) from None
            child.proc.kill()
            child.proc.wait(timeout=5)
            self._cleanup_pipes(child)
            raise ServerProcessError(self._describe(f"{what} (SIGKILLed)", child)) from None
        self._cleanup_pipes(child)
        return child.proc.returncode

    def _cleanup_pipes(self, child: _Child) -> None:
        proc = child.proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):  # broken pipe: the child is gone already
                proc.stdin.close()
        child.reader.join(timeout=5)
        if proc.stdout is not None and not child.reader.is_alive():
            proc.stdout.close()

    def _write_line(self, child: _Child, line: str) -> None:
        assert child.proc.stdin is not None
        try:
            child.proc.stdin.write(line + "\n")
            child.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise ServerCommandError(self._describe(f"cannot send {line!r}: {exc}", child)) from exc

    def _require_child(self) -> _Child:
        if self._child is None:
            how = "was never started" if not self._children else "has no current child"
            raise ServerProcessError(f"{self.kind} on {self.address} {how}")
        return self._child

    def _describe(self, what: str, child: _Child | None = None) -> str:
        child = child or self._child
        argv = " ".join((child.argv if child else tuple(self.build_argv()))[1:])
        stderr = _read_text(child.stderr_path) if child else ""
        if len(stderr) > _STDERR_TAIL:
            stderr = "...\n" + stderr[-_STDERR_TAIL:]
        noise = "".join(f"\n  {line}" for line in self.stdout_noise[-20:])
        pid = child.proc.pid if child else None
        return (
            f"{self.kind} {self.address} (pid {pid}, {argv!r}): {what}"
            f"\n--- stdout (unexpected lines) ---{noise or ' none'}"
            f"\n--- stderr ---\n{stderr or '(empty)'}"
        )


class StoppingServer:
    """A child that was told to stop gracefully and was detached from its
    :class:`ServerProcess`: it finishes its calls in flight, then exits on its own.

    Its stdin stays open until it exits (end of input would tell it to stop at once).
    The owner's ``close()`` kills it if it is still running.

    Attributes:
        answer: the child's JSON answer to the stop command.
    """

    def __init__(self, owner: ServerProcess, child: _Child, answer: dict[str, Any]) -> None:
        self._owner = owner
        self._child = child
        self.answer = answer

    @property
    def pid(self) -> int:
        return self._child.proc.pid

    @property
    def running(self) -> bool:
        return self._child.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._child.proc.poll()

    def wait(self, timeout: float) -> int:
        """Block until the child has exited, at most ``timeout`` s; return its exit code.

        Raises:
            ServerProcessError: still running after ``timeout`` (it is left running).
        """
        return self._owner._reap(self._child, timeout, "the graceful stop", kill=False)

    def kill(self, timeout: float = 5.0) -> int:
        """SIGKILL the child (if still running) and reap it. Returns its exit code."""
        if self._child.proc.poll() is None:
            self._child.proc.kill()
        return self._owner._reap(self._child, timeout, "SIGKILL")

    def stderr_text(self) -> str:
        return _read_text(self._child.stderr_path)

    def __repr__(self) -> str:
        state = "draining" if self.running else f"exited {self.returncode}"
        return f"<StoppingServer {self._owner.address} pid {self.pid} {state}>"


class KernelProcess(ServerProcess):
    """One dev kernel (``python -m chronicle_conn dev-server``) in a child process.

    Args:
        port: the port to listen on; ``None`` picks a free one.
        keepalive_interval: seconds between keep-alives on ``Connect`` streams.
        extra_args: more CLI arguments for ``dev-server``.
        host: ``127.0.0.1`` or ``::1``.
        env: extra environment variables for the child.
    """

    kind: ClassVar[str] = "kernel"
    listening: ClassVar[re.Pattern[str]] = LISTENING

    def __init__(
        self,
        port: int | None = None,
        keepalive_interval: float | None = 1.0,
        extra_args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(port, host=host, env=env, extra_args=extra_args)
        self.keepalive_interval = keepalive_interval

    def build_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "chronicle_conn", "dev-server"]
        argv += ["--host", self.host, "--port", str(self.port), "--control-stdin"]
        if self.keepalive_interval is not None:
            argv += ["--keepalive-interval", str(self.keepalive_interval)]
        return argv + list(self.extra_args)

    def pause_keepalives(self) -> dict[str, Any]:
        """Stop sending keep-alives on ``Connect`` streams (a hung kernel)."""
        return self.command("pause-keepalives")

    def resume_keepalives(self) -> dict[str, Any]:
        return self.command("resume-keepalives")

    def set_serving(self, serving: bool) -> dict[str, Any]:
        """Flip the ``grpc.health.v1`` status between SERVING and NOT_SERVING."""
        return self.command("serving" if serving else "not-serving")

    def stats(self) -> dict[str, Any]:
        """``connect_requests``, ``keepalive_answers``, ``keepalives_sent``,
        ``connection_ids``."""
        return self.command("stats")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def spawn_child(
    argv: Sequence[str], stderr_path: Path, env: Mapping[str, str]
) -> subprocess.Popen[str]:
    """Start a Python child of the tests: the repository importable, stdout unbuffered
    (its lines must not sit in a pipe buffer), stdin and stdout text pipes, stderr
    appended to ``stderr_path``; ``env`` on top of this process's environment."""
    full = dict(os.environ)
    full["PYTHONUNBUFFERED"] = "1"
    full["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_REPO_ROOT), full.get("PYTHONPATH", "")) if p
    )
    full.update(env)
    with open(stderr_path, "ab") as stderr:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=full,
            cwd=str(_REPO_ROOT),
        )


def pump_lines(stream: IO[str], lines: queue.Queue[Any]) -> None:
    """Move the child's stdout into a queue, line by line, then :data:`EOF`."""
    try:
        for line in stream:
            lines.put(line.rstrip("\r\n"))
    except (OSError, ValueError):
        pass  # closed under us
    finally:
        lines.put(EOF)


def _json_object(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
