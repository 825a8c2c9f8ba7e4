"""The embedded dev kernel (``python -m chronicle_conn dev-server``) in a child process.

A real process, so tests can SIGKILL it and start it again on the same port. The child is
driven through its stdin control protocol: one command a line, one JSON answer a line.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .ports import check_loopback, free_port

__all__ = ["KernelCommandError", "KernelError", "KernelProcess", "KernelStartError"]

LISTENING = re.compile(r"^chronicle-conn dev-server listening on (?P<host>\S+):(?P<port>\d+)$")
_BIND_FAILURE = re.compile(r"bind|address already in use", re.IGNORECASE)
_REPO_ROOT = Path(__file__).resolve().parents[2]
_EOF = object()  # queued by the reader thread when the child's stdout closes
_STDERR_TAIL = 6000


class KernelError(RuntimeError):
    """The kernel process misbehaved; the message carries its stderr."""


class KernelStartError(KernelError):
    """The kernel did not print its listening line in time, or exited first."""


class KernelCommandError(KernelError):
    """A control command got no answer in time, or an answer that was not ``ok``."""


class KernelProcess:
    """One dev kernel in a child process, on a fixed loopback port.

    The port is chosen once (``port=None``: a free one) and kept for the life of the
    object, so ``restart()`` brings the kernel back where clients expect it.

    Not thread-safe except ``command()`` (and the helpers built on it), which serializes
    commands. Every blocking method has a bounded timeout.

    Args:
        port: the port to listen on; ``None`` picks a free one.
        keepalive_interval: seconds between keep-alives on ``Connect`` streams.
        extra_args: more CLI arguments for ``dev-server``.
        host: ``127.0.0.1`` or ``::1``.
        env: extra environment variables for the child.
    """

    def __init__(
        self,
        port: int | None = None,
        keepalive_interval: float | None = 1.0,
        extra_args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
    ) -> None:
        self.host = check_loopback(host)
        self._auto_port = port is None
        self.port = free_port(host) if port is None else int(port)
        self.keepalive_interval = keepalive_interval
        self.extra_args = tuple(extra_args)
        self._env = dict(env or {})
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[Any] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._command_lock = threading.Lock()
        self._stderr_path: Path | None = None
        self._stderr_offset = 0  # where the current child's stderr starts in the file
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
        """The pid of the current (or last) child; ``None`` before the first start."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def build_argv(self) -> list[str]:
        """The child's command line (a seam for tests of the harness itself)."""
        argv = [sys.executable, "-m", "chronicle_conn", "dev-server"]
        argv += ["--host", self.host, "--port", str(self.port), "--control-stdin"]
        if self.keepalive_interval is not None:
            argv += ["--keepalive-interval", str(self.keepalive_interval)]
        return argv + list(self.extra_args)

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> KernelProcess:
        """Spawn the child and block until it prints its listening line. Returns ``self``.

        With ``port=None`` a port that turns out to be taken is replaced by a fresh one.

        Raises:
            KernelStartError: no listening line within ``timeout`` (the child is killed),
                or the child exited first. The message has the child's stderr.
        """
        if self.running:
            raise KernelError(f"kernel already running (pid {self.pid}) on {self.address}")
        self._start(timeout, bind_retry=timeout if self._auto_port else 0.0, new_port=True)
        return self

    def restart(self, timeout: float = 15.0, bind_retry: float = 5.0) -> KernelProcess:
        """Kill the child if it runs, then start a new one on the same port.

        If the new child fails to bind (the port is briefly unavailable) it is retried
        for up to ``bind_retry`` seconds. Blocks; returns ``self``.
        """
        if self.running:
            self.kill()
        self._start(timeout, bind_retry=bind_retry, new_port=False)
        return self

    def kill(self, timeout: float = 5.0) -> int | None:
        """SIGKILL the child and reap it. Idempotent. Returns its exit code.

        Raises:
            KernelError: the child did not die within ``timeout`` (should not happen).
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        return self._reap(proc, timeout, "SIGKILL")

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM the child and wait for it to exit. Returns its exit code.

        Raises:
            KernelError: it did not exit within ``timeout`` (it is then SIGKILLed).
        """
        proc = self._require_proc()
        if proc.poll() is None:
            proc.terminate()
        return self._reap(proc, timeout, "SIGTERM")

    def stop(self, timeout: float = 10.0) -> int:
        """Send the ``stop`` command and wait for the child to exit. Returns its exit code."""
        proc = self._require_proc()
        with self._command_lock:
            self._write_line(proc, "stop")
        return self._reap(proc, timeout, "stop")

    def close(self) -> None:
        """Kill the child (if any) and remove the stderr file. Idempotent."""
        try:
            self.kill()
        finally:
            if self._stderr_path is not None:
                self._stderr_path.unlink(missing_ok=True)
                self._stderr_path = None

    def __enter__(self) -> KernelProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else f"exited {self.returncode}"
        return f"<KernelProcess {self.address} {state}>"

    # -- control commands ---------------------------------------------------------------

    def command(self, cmd: str, timeout: float = 5.0, *, check: bool = True) -> dict[str, Any]:
        """Send one control command and return its JSON answer. Blocks; thread-safe.

        Stdout lines that are not JSON objects are skipped (kept in ``stdout_noise``).

        Raises:
            KernelCommandError: no answer within ``timeout``, the child exited, or (with
                ``check``) the answer's ``ok`` is not true.
        """
        if "\n" in cmd:
            raise ValueError(f"a command is one line: {cmd!r}")
        with self._command_lock:
            proc = self._require_proc()
            self._write_line(proc, cmd)
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                try:
                    line = self._lines.get(timeout=max(0.0, remaining))
                except queue.Empty:
                    raise KernelCommandError(
                        self._describe(f"no answer to {cmd!r} within {timeout}s")
                    ) from None
                if line is _EOF:
                    self._lines.put(_EOF)  # keep telling later readers
                    proc.wait(timeout=5)
                    raise KernelCommandError(self._describe(f"child exited during {cmd!r}"))
                answer = _json_object(line)
                if answer is None:
                    self.stdout_noise.append(line)
                    continue
                break
        if check and answer.get("ok") is not True:
            raise KernelCommandError(self._describe(f"{cmd!r} answered {answer!r}"))
        return answer

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

    def wait_for_bind_failures(self, count: int, timeout: float) -> bool:
        """Block until ``bind_failures >= count``, at most ``timeout`` s; ``False`` if not.

        Thread-safe: meant for a thread that watches a blocking ``start()``/``restart()``.
        """
        with self._attempts:
            return self._attempts.wait_for(lambda: self.bind_failures >= count, timeout)

    def stderr_text(self, *, current_only: bool = False) -> str:
        """The child's stderr so far (all starts, or only the current child's)."""
        if self._stderr_path is None or not self._stderr_path.exists():
            return ""
        data = self._stderr_path.read_bytes()
        if current_only:
            data = data[self._stderr_offset :]
        return data.decode("utf-8", "replace")

    # -- internals ----------------------------------------------------------------------

    def _start(self, timeout: float, *, bind_retry: float, new_port: bool) -> None:
        started = time.monotonic()
        retry_until = started + bind_retry
        pause = threading.Event()  # never set: a bounded pause between bind retries
        while True:
            remaining = timeout - (time.monotonic() - started)
            self._spawn()
            try:
                self._await_listening(max(remaining, 0.5))
                return
            except KernelStartError:
                bind_failed = bool(_BIND_FAILURE.search(self.stderr_text(current_only=True)))
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

    def _spawn(self) -> None:
        if self._stderr_path is None:
            fd, name = tempfile.mkstemp(prefix="chronicle-kernel-", suffix=".stderr")
            os.close(fd)
            self._stderr_path = Path(name)
        self._stderr_offset = self._stderr_path.stat().st_size
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # the listening line must not sit in a pipe buffer
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.update(self._env)
        self._lines = queue.Queue()
        with open(self._stderr_path, "ab") as stderr:
            self._proc = subprocess.Popen(
                self.build_argv(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                env=env,
                cwd=str(_REPO_ROOT),
            )
        self.starts += 1
        assert self._proc.stdout is not None
        self._reader = threading.Thread(
            target=_pump_lines,
            args=(self._proc.stdout, self._lines),
            name=f"KernelProcess[{self.port}]-stdout-{self._proc.pid}",
            daemon=True,
        )
        self._reader.start()

    def _await_listening(self, timeout: float) -> None:
        proc = self._require_proc()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise KernelStartError(
                    self._describe(f"no listening line within {timeout:.1f}s (killed)")
                ) from None
            if line is _EOF:
                self._reap(proc, 5.0, "start")
                raise KernelStartError(
                    self._describe(f"exited with {proc.returncode} before listening")
                )
            match = LISTENING.match(line)
            if match is None:
                self.stdout_noise.append(line)
                continue
            if int(match["port"]) != self.port or match["host"].strip("[]") != self.host:
                self.kill()
                raise KernelStartError(self._describe(f"listening on the wrong address: {line!r}"))
            return

    def _reap(self, proc: subprocess.Popen[str], timeout: float, how: str) -> int:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            self._cleanup_pipes(proc)
            raise KernelError(
                self._describe(f"did not exit within {timeout}s after {how} (SIGKILLed)")
            ) from None
        self._cleanup_pipes(proc)
        return proc.returncode

    def _cleanup_pipes(self, proc: subprocess.Popen[str]) -> None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):  # broken pipe: the child is gone already
                proc.stdin.close()
        reader = self._reader
        if reader is not None and proc is self._proc:
            reader.join(timeout=5)
        if proc.stdout is not None and (reader is None or not reader.is_alive()):
            proc.stdout.close()

    def _write_line(self, proc: subprocess.Popen[str], line: str) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise KernelCommandError(self._describe(f"cannot send {line!r}: {exc}")) from exc

    def _require_proc(self) -> subprocess.Popen[str]:
        if self._proc is None:
            raise KernelError(f"kernel on {self.address} was never started")
        return self._proc

    def _describe(self, what: str) -> str:
        argv = " ".join(self.build_argv()[1:])
        stderr = self.stderr_text(current_only=True)
        if len(stderr) > _STDERR_TAIL:
            stderr = "...\n" + stderr[-_STDERR_TAIL:]
        noise = "".join(f"\n  {line}" for line in self.stdout_noise[-20:])
        return (
            f"kernel {self.address} (pid {self.pid}, {argv!r}): {what}"
            f"\n--- stdout (unexpected lines) ---{noise or ' none'}"
            f"\n--- stderr ---\n{stderr or '(empty)'}"
        )


def _pump_lines(stream: IO[str], lines: queue.Queue[Any]) -> None:
    """Move the child's stdout into a queue, line by line, until EOF."""
    try:
        for line in stream:
            lines.put(line.rstrip("\r\n"))
    except (OSError, ValueError):
        pass  # closed under us
    finally:
        lines.put(_EOF)


def _json_object(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
