"""``chronicle-conn watch`` (and the CLI's manners: ``--version``, ``--help``, bad input)
through a real subprocess, against the dev kernel in a child process and a plain grpcio
server with the standard health servicer; terminal mode through a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import IO

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chronicle_conn._watch import REARM_INTERVAL
from tests.helpers import plaintext

REPO = Path(__file__).resolve().parents[1]
WAIT = 30.0  # for anything the watch should print; generous for a loaded 2-core machine
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
SUMMARY = re.compile(
    r"summary: watched (?P<watched>[\d.]+) s, connected (?P<connected>[\d.]+) s "
    r"\((?P<pct>[\d.]+)%\), (?P<outages>\d+) outages?, longest outage (?P<longest>[\d.]+) s$"
)
_EOF = None


def _environment(env: dict[str, str] | None) -> dict[str, str]:
    drop = {"CHRONICLE_CONNECTION_STRING", "NO_COLOR"}
    environment = {k: v for k, v in os.environ.items() if k not in drop}
    environment.update(env or {})
    return environment


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "chronicle_conn", *args]


class Watch:
    """``chronicle-conn watch ARGS`` with piped stdout; a thread queues its lines."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            _command("watch", *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
            env=_environment(env),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._stderr: list[str] = []
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self.lines.put(line.rstrip("\n"))
        finally:
            self.lines.put(_EOF)

    def _drain(self, stream: IO[str]) -> None:
        self._stderr.extend(stream)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = WAIT) -> str:
        """The first line not seen before that satisfies ``predicate``, within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is _EOF:
                self.lines.put(_EOF)
                raise AssertionError(f"watch exited ({self.proc.poll()}): {self._report()}")
            self.seen.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"no such line within {timeout} s: {self._report()}")

    def stop(self, signum: int = signal.SIGINT, timeout: float = WAIT) -> tuple[int, list[str]]:
        """Send ``signum``; return the exit code and the lines printed after the last seen."""
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=10)
        rest: list[str] = []
        while (line := self.lines.get(timeout=5)) is not _EOF:
            rest.append(line)
        self.seen.extend(rest)
        return code, rest

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def _report(self) -> str:
        return "\n--- stdout ---\n" + "\n".join(self.seen) + "\n--- stderr ---\n" + self.stderr


@pytest.fixture
def watch() -> Iterator[Callable[..., Watch]]:
    made: list[Watch] = []

    def make(*args: str, env: dict[str, str] | None = None) -> Watch:
        made.append(Watch(*args, env=env))
        return made[-1]

    yield make
    for proc in made:
        proc.close()


@pytest.fixture
def grpcio_server() -> Iterator[tuple[grpc.Server, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield server, f"127.0.0.1:{port}"
    server.stop(None)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(*args),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
        env=_environment(env),
        stdin=subprocess.DEVNULL,
    )


def summary_of(line: str) -> dict[str, float]:
    match = SUMMARY.search(line)
    assert match is not None, line
    return {key: float(value) for key, value in match.groupdict().items()}


# -- piped stdout -------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_crash_and_a_restart_show_as_lines_and_one_outage(kernel, watch) -> None:
    text = plaintext(kernel.address)
    proc = watch(text)
    first = proc.wait_for(lambda line: True)
    assert STAMP.match(first), first
    assert first.endswith(f" watching {text} (TLS off; auth none)")
    proc.wait_for(lambda line: line.endswith("-> connected") or "-> connected (" in line)
    kernel.kill()
    proc.wait_for(lambda line: "connected -> reconnecting" in line)
    # Failed attempts are no state change, but the view says so while it is down.
    failed = proc.wait_for(lambda line: " reconnecting: attempt" in line)
    assert re.search(r"attempts? [\d-]+ failed(, next in [\d.]+ s)?: connection refused$", failed)
    kernel.restart()
    proc.wait_for(lambda line: "reconnecting -> connected" in line)
    code, _ = proc.stop(signal.SIGINT)
    assert code == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert " connected -> closed" in proc.seen[-2]
    summary = summary_of(proc.seen[-1])
    assert summary["outages"] == 1
    assert summary["longest"] > 0
    assert 0 < summary["pct"] <= 100
    assert summary["connected"] <= summary["watched"]
    for line in proc.seen:
        assert STAMP.match(line), line
        assert "\x1b" not in line, repr(line)
        assert "\r" not in line, repr(line)


@pytest.mark.timeout(180)
def test_json_lines_with_fields_and_a_summary_that_counts_an_ongoing_outage(kernel, watch) -> None:
    proc = watch(plaintext(kernel.address), "--json")
    proc.wait_for(lambda line: json.loads(line).get("new") == "connected")
    kernel.kill()
    proc.wait_for(lambda line: json.loads(line).get("new") == "reconnecting")
    failed = json.loads(proc.wait_for(lambda line: "attempts_failed" in line))
    assert failed["state"] == "reconnecting"
    assert failed["attempt"] >= failed["failed"] >= 1
    assert failed["error"] == "connection refused"
    code, _ = proc.stop(signal.SIGINT)
    assert code == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in proc.seen]
    assert records[0]["event"] == "start"
    assert records[0]["target"] == plaintext(kernel.address)
    assert (records[0]["tls"], records[0]["auth"]) == ("off", "none")
    changes = [r for r in records if r["event"] == "change"]
    assert [(c["old"], c["new"]) for c in changes] == [
        ("idle", "connecting"),
        ("connecting", "connected"),
        ("connected", "reconnecting"),
        ("reconnecting", "closed"),
    ]
    fields = {"event", "time", "old", "new", "attempt", "delay", "error", "generation"}
    for change in changes:
        assert set(change) == fields
        assert STAMP.match(change["time"] + " ")
    assert changes[1]["attempt"] >= 1
    assert changes[1]["generation"] >= 1
    assert changes[2]["error"]
    summary = records[-1]
    assert summary["event"] == "summary"
    assert summary["outages"] == 1
    assert summary["longest_outage_s"] > 0  # still going on at the end: counted up to then
    assert 0 < summary["connected_pct"] < 100
    assert summary["connected_s"] <= summary["watched_s"]


@pytest.mark.timeout(180)
def test_a_plain_grpcio_health_server_going_away_is_an_outage(grpcio_server, watch) -> None:
    server, address = grpcio_server
    proc = watch(plaintext(address))
    proc.wait_for(lambda line: "-> connected" in line)
    server.stop(None)
    proc.wait_for(lambda line: "connected -> reconnecting" in line)
    code, _ = proc.stop(signal.SIGINT)
    assert code == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert summary_of(proc.seen[-1])["outages"] == 1


@pytest.mark.timeout(180)
def test_sigterm_ends_it_with_a_summary_and_the_string_comes_from_the_environment(
    kernel, watch
) -> None:
    text = plaintext(kernel.address)
    proc = watch(env={"CHRONICLE_CONNECTION_STRING": text})
    assert proc.wait_for(lambda line: True).endswith(f" watching {text} (TLS off; auth none)")
    proc.wait_for(lambda line: "-> connected" in line)
    code, _ = proc.stop(signal.SIGTERM)
    assert code == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = summary_of(proc.seen[-1])
    assert summary["outages"] == 0
    assert summary["longest"] == 0
    assert summary["pct"] > 0


@pytest.mark.timeout(180)
def test_tls_refused_is_reported_and_tried_again(grpcio_server, watch) -> None:
    _, address = grpcio_server
    proc = watch(f"chronicle://{address}")  # TLS on, the server speaks plaintext
    failed = proc.wait_for(lambda line: "connecting -> failed" in line)
    assert "disableTls=true" in failed
    proc.wait_for(lambda line: "failed -> connecting" in line, timeout=REARM_INTERVAL + WAIT)
    code, _ = proc.stop(signal.SIGINT)
    assert code == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = summary_of(proc.seen[-1])
    assert (summary["outages"], summary["connected"]) == (0, 0)


# -- on a terminal ------------------------------------------------------------------------


def _read_pty(fd: int, until: Callable[[bytes], bool], timeout: float, data: bytearray) -> None:
    """Append what ``fd`` gives to ``data`` until ``until(data)``, EOF, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not until(bytes(data)) and (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side is closed
            return
        if not chunk:
            return
        data += chunk


@pytest.mark.timeout(180)
@pytest.mark.parametrize("no_color", [None, "1"])
def test_on_a_terminal_a_status_line_updates_in_place(kernel, no_color) -> None:
    master, slave = pty.openpty()
    env = {} if no_color is None else {"NO_COLOR": no_color}
    try:
        proc = subprocess.Popen(
            _command("watch", plaintext(kernel.address)),
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.PIPE,
            cwd=str(REPO),
            env=_environment(env),
        )
    finally:
        os.close(slave)
    data = bytearray()
    try:
        # The status line while connected, redrawn a few times.
        _read_pty(master, lambda d: d.count(b"connected for") >= 3, WAIT, data)
        proc.send_signal(signal.SIGINT)
        _read_pty(master, lambda d: False, WAIT, data)  # to EOF
        code = proc.wait(timeout=WAIT)
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
    output = bytes(data).decode()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert output.count("\r\x1b[K") >= 4, repr(output)
    assert "connected for" in output
    assert "keep-alives received" in output
    assert "summary: watched" in output
    if no_color is None:
        assert "\x1b[32m" in output  # green: connected
        assert "\x1b[33m" in output  # yellow: connecting
    else:
        assert "\x1b[3" not in output, repr(output)


# -- the command line's manners -----------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("args", "prefix"),
    [
        (("watch", "chronicle://"), "chronicle-conn watch: "),
        (("watch", "nonsense://x"), "chronicle-conn watch: "),
        (("watch", "--bogus"), "chronicle-conn watch: "),
        (("watch", "--json", "chronicle://h?disableTls=maybe"), "chronicle-conn watch: "),
        (("watch", "chronicle://127.0.0.1:1?caPath=/nonexistent"), "chronicle-conn watch: "),
        (("watch", "a", "b"), "chronicle-conn watch: "),
        (("watch", ""), "chronicle-conn watch: "),  # empty: not the default
        (("check", ""), "chronicle-conn check: "),
        (("check", "--timeout", "abc"), "chronicle-conn check: "),
        (("check", "--bogus"), "chronicle-conn check: "),
        (("dev-server", "--port", "x"), "chronicle-conn dev-server: "),
        (("selfcheck", "--keepalives", "many"), "chronicle-conn selfcheck: "),
        (("frobnicate",), "chronicle-conn: "),
        ((), "chronicle-conn: "),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(args, prefix) -> None:
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefix), lines[0]


@pytest.mark.timeout(120)
def test_version_and_help_with_examples() -> None:
    from chronicle_conn import __version__

    version = run("--version")
    assert version.returncode == 0
    assert version.stdout == f"chronicle-conn {__version__}\n"
    for args in ((), ("check",), ("watch",)):
        proc = run(*args, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "examples:" in proc.stdout, proc.stdout
        assert "\n  chronicle-conn " in proc.stdout.split("examples:")[1]
    assert "watch" in run("--help").stdout
    assert "NO_COLOR" in run("watch", "--help").stdout
