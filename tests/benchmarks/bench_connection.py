"""Benchmarks of the connection manager, each beside a baseline measured in the same run.

    python tests/benchmarks/bench_connection.py              # full run, 12-23 minutes
    python tests/benchmarks/bench_connection.py --quick      # every figure, 2-4 minutes
    python tests/benchmarks/bench_connection.py --only recovery --only churn
    python tests/benchmarks/bench_connection.py --json rows.json

Prints one Markdown table: our figure, the baseline, their ratio, the goal and whether it
is met, then notes per figure. Exits 1 if a goal is not met. Figures are medians over
repeated runs, ours interleaved with (or racing) the baseline; the machine is shared and
noisy, so compare ratios within one run, never numbers from another run. Real
components only: the dev kernel in a child process (SIGKILLed and restarted on the same
port), the harness's fault proxy, raw ``grpc`` channels as baselines, fresh child
processes for anything measured per process (threads, RSS, CPU, import time).

The figures live in ``_inprocess`` (detection, hot path, throughput, waiters, close in a
backoff), ``_outage`` (recovery, attempts while the server is down) and ``_resources``
(import time, close, idle cost, churn); ``_children`` holds the child processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.benchmarks import _inprocess, _outage, _resources  # noqa: E402
from tests.benchmarks._common import Row, fmt  # noqa: E402


def _benches(quick: bool) -> dict[str, Callable[[], list[Row]]]:
    """Every figure by its ``--only`` name, in the order they run."""
    outages = (1.0, 3.0) if quick else (1.0, 3.0, 7.0, 15.0, 30.0)
    return {
        "import": lambda: [_resources.bench_import(15 if quick else 31)],
        "channel": lambda: [_inprocess.bench_channel_call(7 if quick else 15)],
        "dispatch": lambda: [_inprocess.bench_dispatch(7 if quick else 15)],
        "detection": lambda: [_inprocess.bench_detection(3 if quick else 9)],
        "throughput": lambda: [
            _inprocess.bench_throughput(3 if quick else 10, 1.0 if quick else 2.0)
        ],
        "waiters": lambda: [_inprocess.bench_waiters(1 if quick else 3, 1000)],
        "close": lambda: [
            _inprocess.bench_close_in_backoff(3 if quick else 9),
            *_resources.bench_close_connected(5 if quick else 15, 100),
        ],
        "recovery": lambda: _outage.bench_recovery(1 if quick else 3, outages),
        "attempts": lambda: _outage.bench_attempts(1 if quick else 2, 5.0 if quick else 20.0),
        "idle": lambda: _resources.bench_idle(1 if quick else 3, 3.0 if quick else 10.0),
        "churn": lambda: [_resources.bench_churn(30 if quick else 300, 1 if quick else 2)],
    }


def _warm_bytecode_env() -> Path:
    """Child processes get compiled bytecode, as an installed package would have: not
    ``PYTHONDONTWRITEBYTECODE``, and a private ``PYTHONPYCACHEPREFIX`` (never the
    source tree, which others are editing)."""
    prefix = Path(tempfile.mkdtemp(prefix="chronicle-bench-pyc-"))
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)
    return prefix


def _table(rows: list[Row]) -> str:
    lines = [
        "| figure | ours | baseline | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        unit = f" {row.unit}" if row.unit else ""
        base = f"{fmt(row.baseline)}{unit}" if row.baseline is not None else "-"
        ratio = f"{row.ratio:.3f}" if row.ratio is not None else "-"
        met = "-" if row.ok is None else "yes" if row.ok else "NO"
        lines.append(
            f"| {row.figure} | {fmt(row.ours)}{unit} | {base} | {ratio} | {row.goal} | {met} |"
        )
    notes = [f"- {row.figure}: {row.note}" for row in rows if row.note]
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every figure, fewer repeats")
    parser.add_argument("--only", action="append", help="run only these (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40),  # errors only
    )
    benches = _benches(args.quick)
    unknown = set(args.only or ()) - set(benches)
    if unknown:
        parser.error(f"unknown --only {sorted(unknown)}; choose from {', '.join(benches)}")
    prefix = _warm_bytecode_env()
    rows: list[Row] = []
    began = time.monotonic()
    try:
        for name, bench in benches.items():
            if args.only and name not in args.only:
                continue
            started = time.monotonic()
            print(f"running {name}...", file=sys.stderr, flush=True)
            rows.extend(bench())
            print(f"  {name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
    print(f"total {time.monotonic() - began:.0f} s", file=sys.stderr)
    print()
    print(_table(rows))
    if args.json:
        args.json.write_text(
            json.dumps([asdict(row) | {"ratio": row.ratio} for row in rows], indent=2)
        )
    return 0 if all(row.ok is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
