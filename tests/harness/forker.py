"""Fork trials: a process with a live connection forks children that use it.

Run as::

    python -m tests.harness.forker --address HOST:PORT --children N \\
        [--liveness auto|keepalive|health|transport] [--concurrent] [--burner] \\
        [--busy THREADS] [--run-id ID] [--child-timeout S] [--raw [--fresh]] \\
        [--connection-string STRING]

The parent connects (``Connection`` with ``liveness``, or with ``--raw`` a plain
``grpc.insecure_channel``, which ``--fresh`` children do not reuse: each makes its own),
builds a stub for the work service (``tests.harness.appserver``)
*before* any fork, makes one call, and then forks ``N`` children: one after another
(each waited for before the next), or with ``--concurrent`` all at once. Each child
calls ``connect(timeout=10)`` and makes one work call with the id ``<run-id>-<i>``
through the stub inherited from the parent, then exits 0 (3 on an error, printed to its
stderr). Between forks the parent keeps calling too (the parent must keep working).

``--burner`` runs a CPU-bound thread in the parent throughout; ``--busy K`` runs K
application threads in the parent that call the work service in a loop (so that a user
call is in flight at most forks: the case the library cannot quiesce).

Every child is bounded: it sets an alarm first thing, and the parent kills (SIGKILL) a
child that has not exited ``--child-timeout`` seconds after its fork (a child stuck
inside ``fork()`` never runs its own alarm). Prints one line on stdout, ``RESULT`` and a
JSON object:
``outcomes`` (``ok``, ``exit N``, ``SIGSEGV``..., ``hung``), ``ok_ids`` (the ids the
successful children used), ``parent_calls`` / ``parent_failures``, ``fork_ms`` (the
parent's ``os.fork()`` durations: median and max) and ``grpc_fork_support`` (the
environment variable as the parent saw it). The execution log of the work server
tells, on the server side, which of those calls ran, and how many times.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

import chronicle_conn as cc
from tests.harness.appserver import WorkStub, work_request, work_response

_REPO_ROOT = Path(__file__).resolve().parents[2]


def run(
    address: str, run_id: str, args: list[str], *, support: str | None, timeout: float = 240
) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess[str]]:
    """Run the forker in a fresh interpreter (grpc reads ``GRPC_ENABLE_FORK_SUPPORT``,
    here ``support``, None for unset, when it is imported) with ``GRPC_VERBOSITY=info``
    (grpc then says when it skips its fork handlers). Returns its result (None if it
    failed) and the finished process."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    env["GRPC_VERBOSITY"] = "info"
    if support is not None:
        env["GRPC_ENABLE_FORK_SUPPORT"] = support
    argv = [sys.executable, "-m", "tests.harness.forker", "--address", address]
    proc = subprocess.run(
        [*argv, "--run-id", run_id, *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=_REPO_ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return None, proc
    return json.loads(lines[-1][len("RESULT ") :]), proc


def _child(
    stub: WorkStub, conn: cc.Connection | None, rid: str, timeout: float, fresh: str | None
) -> None:
    """The child's whole life: connect, one call, exit. Never returns."""
    code = 3
    try:
        signal.alarm(max(1, int(timeout)))
        if conn is not None:
            conn.connect(timeout=10)
        if fresh is not None:
            stub = WorkStub(grpc.insecure_channel(fresh))
        answer = work_response(stub.unary(work_request(rid), timeout=10, wait_for_ready=True))
        if answer["id"] == rid and answer["pid"] != os.getpid():
            code = 0
        else:
            os.write(2, f"forker child {rid}: unexpected answer {answer!r}\n".encode())
    except BaseException as exc:
        os.write(2, f"forker child {rid}: {type(exc).__name__}: {exc}\n".encode())
    finally:
        os._exit(code)


def _outcome(status: int) -> str:
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    code = os.waitstatus_to_exitcode(status)
    return "ok" if code == 0 else f"exit {code}"


class _Parent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.conn: cc.Connection | None = None
        if args.raw:
            self.channel: grpc.Channel = grpc.insecure_channel(args.address)
        else:
            self.conn = cc.Connection(
                args.connection_string or f"chronicle://{args.address}?disableTls=true",
                liveness=args.liveness,
                retry_attempts=None,
                auto_connect=True,
            )
            self.conn.connect(timeout=15)
            self.channel = self.conn.managed_channel
        self.stub = WorkStub(self.channel)
        self.calls = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def call(self, rid: str) -> None:
        try:
            answer = work_response(self.stub.unary(work_request(rid), timeout=10))
            ok = answer["id"] == rid
            error = "" if ok else f"unexpected answer {answer!r}"
        except grpc.RpcError as exc:
            ok, error = False, f"{exc.code()}: {exc.details()}"  # type: ignore[attr-defined]
        with self.lock:
            self.calls += 1
            if not ok:
                self.failures.append(f"{rid}: {error}")

    def start_threads(self) -> None:
        if self.args.burner:
            self.threads.append(threading.Thread(target=self._burn, daemon=True))
        for n in range(self.args.busy):
            self.threads.append(threading.Thread(target=self._busy, args=(n,), daemon=True))
        for thread in self.threads:
            thread.start()

    def _burn(self) -> None:
        while not self.stop.is_set():
            sum(range(20_000))

    def _busy(self, n: int) -> None:
        for i in range(1_000_000):
            if self.stop.is_set():
                return
            self.call(f"{self.args.run_id}-busy{n}-{i}")

    def join_threads(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forker")
    parser.add_argument("--address", required=True)
    parser.add_argument(
        "--connection-string", help="for the Connection (default: plaintext to --address)"
    )
    parser.add_argument("--children", type=int, required=True)
    parser.add_argument("--liveness", default="auto")
    parser.add_argument("--concurrent", action="store_true")
    parser.add_argument("--burner", action="store_true")
    parser.add_argument("--busy", type=int, default=0)
    parser.add_argument("--run-id", default="fork")
    parser.add_argument("--child-timeout", type=float, default=20.0)
    parser.add_argument("--raw", action="store_true", help="a plain grpc channel, no Connection")
    parser.add_argument(
        "--fresh", action="store_true", help="with --raw: each child makes a channel of its own"
    )
    args = parser.parse_args(argv)

    parent = _Parent(args)
    parent.call(f"{args.run_id}-parent-first")
    parent.start_threads()
    outcomes: collections.Counter[str] = collections.Counter()
    ok_ids: list[str] = []
    fork_ms: list[float] = []
    running: dict[int, tuple[str, float]] = {}

    def reap(block_until: float | None) -> None:
        """Collect finished children; kill those past their time. ``block_until``: keep
        going until every child is collected or that time passes."""
        while running:
            now = time.monotonic()
            for pid, (rid, deadline) in list(running.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    del running[pid]
                    outcome = _outcome(status)
                    outcomes[outcome] += 1
                    if outcome == "ok":
                        ok_ids.append(rid)
                elif now >= deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    del running[pid]
                    outcomes["hung"] += 1
            if block_until is None or not running or now >= block_until:
                return
            time.sleep(0.005)  # polling children: there is nothing to wait on

    for i in range(args.children):
        rid = f"{args.run_id}-{i}"
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            fresh = args.address if args.fresh else None
            _child(parent.stub, parent.conn, rid, args.child_timeout, fresh)
        fork_ms.append((time.perf_counter() - started) * 1000)
        running[pid] = (rid, time.monotonic() + args.child_timeout + 5)
        if not args.concurrent:
            reap(time.monotonic() + args.child_timeout + 10)
            parent.call(f"{args.run_id}-parent-{i}")
    reap(time.monotonic() + args.child_timeout + 10)
    parent.join_threads()
    parent.call(f"{args.run_id}-parent-last")
    if parent.conn is not None:
        parent.conn.close()
    else:
        parent.channel.close()
    result: dict[str, Any] = {
        "outcomes": dict(outcomes),
        "ok_ids": ok_ids,
        "parent_calls": parent.calls,
        "parent_failures": parent.failures[:20],
        "parent_failure_count": len(parent.failures),
        "fork_ms": {
            "median": round(statistics.median(fork_ms), 2),
            "max": round(max(fork_ms), 2),
        },
        "grpc_fork_support": os.environ.get("GRPC_ENABLE_FORK_SUPPORT"),
    }
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
