"""What every benchmark module shares: the result row, waiting helpers, kernels, children.

Child processes (kernels, and the children that measure threads, memory and CPU in a
clean process) run with warm bytecode: ``main()`` removes ``PYTHONDONTWRITEBYTECODE``
from the environment and points ``PYTHONPYCACHEPREFIX`` at a temporary directory, as an
installed package would have compiled bytecode.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chronicle_conn._proto import host_pb2_grpc  # noqa: E402
from tests.harness import KernelProcess  # noqa: E402

#: Worker threads of the kernels that serve 100 connections (each ``Connect`` stream
#: holds one; the dev server's own default is 64).
WIDE_WORKERS = 512

#: What ``_children kernel`` writes to stderr once it serves.
LISTENING_AT = re.compile(r"^bench-listening-at (\d+\.\d+)$", re.MULTILINE)


@dataclass
class Row:
    """One line of the table."""

    figure: str
    ours: float
    baseline: float | None
    unit: str
    goal: str
    ok: bool | None  # None: an informative figure with no goal
    note: str = ""
    paired_ratio: float | None = None  # a ratio measured in pairs (see throughput)
    with_ratio: bool = True  # False where a ratio means nothing (slopes near zero)

    @property
    def ratio(self) -> float | None:
        """The paired ratio when the benchmark measured one, else ours / baseline."""
        if self.paired_ratio is not None:
            return self.paired_ratio
        if not self.with_ratio or not self.baseline:
            return None
        return self.ours / self.baseline


def plaintext(address: str) -> str:
    return f"chronicle://{address}?disableTls=true"


def pause(seconds: float) -> None:
    """Let time pass (the benchmark's scenario needs wall-clock time to elapse)."""
    threading.Event().wait(seconds)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 2 ms (the things polled have no event to wait on)."""
    cond = threading.Condition()
    deadline = time.monotonic() + timeout
    with cond:
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(what)
            cond.wait(min(remaining, 0.002))


def version(channel: grpc.Channel, **kwargs: Any) -> str:
    """One unary call (``GetVersionInfo``) on ``channel``."""
    stub = host_pb2_grpc.ServerStub(channel)
    return stub.GetVersionInfo(empty_pb2.Empty(), **kwargs).Version  # type: ignore[no-any-return]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of ``(x, y)`` points (0 with fewer than two)."""
    if len(points) < 2:
        return 0.0
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


# ---------------------------------------------------------------------------- processes


def proc_status(field: str) -> int:
    """An integer field of ``/proc/self/status`` (``VmRSS`` in kB, ``Threads``)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds() -> float:
    """This process's CPU time, all threads, user + system."""
    times = os.times()
    return times.user + times.system


class BenchKernel(KernelProcess):
    """The dev kernel (``python -m chronicle_conn dev-server``), run through
    ``_children kernel``: the same server and control protocol, but it also writes the
    ``time.monotonic()`` at which it started serving to its stderr; ``workers`` is its
    ``--max-workers``."""

    workers = 64  # the dev server's own default

    def build_argv(self) -> list[str]:
        argv = super().build_argv()
        start = argv.index("dev-server")
        return [
            sys.executable,
            "-m",
            "tests.benchmarks._children",
            "kernel",
            "--max-workers",
            str(self.workers),
            *argv[start + 1 :],
        ]

    def listening_at(self) -> float:
        """When the current child started serving, on this machine's monotonic clock
        (shared by all processes): more exact than when ``restart()`` returned, which
        waits for the parent to read the listening line."""
        stamps = LISTENING_AT.findall(self.stderr_text(current_only=True))
        if not stamps:
            raise RuntimeError(f"{self!r} wrote no listening time")
        return float(stamps[-1])


class WideKernel(BenchKernel):
    """A kernel for the figures with 100 connections (each ``Connect`` stream holds a
    worker thread)."""

    workers = WIDE_WORKERS


def run_child(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m tests.benchmarks._children ARGS`` and return the JSON object it
    prints last on stdout.

    Raises:
        RuntimeError: it failed or printed no JSON (its stderr is in the message).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks._children", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {' '.join(args)} failed with {proc.returncode}:\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result
