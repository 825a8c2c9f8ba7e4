"""Fork trials as a table: children of a process with a live ``Connection`` beside
children of a process with a raw channel (reused in the child, or a fresh one made
there), with ``GRPC_ENABLE_FORK_SUPPORT`` unset and ``1``, with and without a CPU-burning
thread in the parent; plus the case the library cannot help, application threads inside
gRPC calls at the fork.

Run: ``python tests/benchmarks/bench_fork.py [--sequential 100] [--concurrent 50]``
(about 3 minutes). Each cell: children that connected and made their call / children,
forked one after another, then all at once. Uses ``tests.harness.forker`` against the
work server (``tests.harness.appserver``, dev kernel flavor).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.harness import forker
from tests.harness.appserver import AppServerProcess

ROWS = {
    "Connection, keepalive": ["--liveness", "keepalive"],
    "Connection, health": ["--liveness", "health"],
    "Connection, transport": ["--liveness", "transport"],
    "raw channel made in the parent": ["--raw"],
    "fresh channel made in the child": ["--raw", "--fresh"],
}
COLUMNS = {
    "unset": (None, []),
    "unset + CPU burner": (None, ["--burner"]),
    "=1": ("1", []),
    "=1 + CPU burner": ("1", ["--burner"]),
}


def trial(address: str, run_id: str, args: list[str], support: str | None) -> dict[str, object]:
    result, proc = forker.run(address, run_id, args, support=support, timeout=900)
    return result or {"outcomes": {f"forker exit {proc.returncode}": 1}}


def cell(result: dict[str, object], total: int) -> str:
    outcomes = dict(result["outcomes"])  # type: ignore[call-overload]
    ok = outcomes.pop("ok", 0)
    rest = ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items()))
    return f"{ok}/{total}" + (f" ({rest})" if rest else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=100)
    parser.add_argument("--concurrent", type=int, default=50)
    args = parser.parse_args()
    server = AppServerProcess(flavor="kernel").start()
    try:
        print(
            f"children that succeeded: {args.sequential} sequential / {args.concurrent} at once\n"
        )
        print("| children of | " + " | ".join(COLUMNS) + " |")
        print("| --- |" + " --- |" * len(COLUMNS))
        for r, (row, row_args) in enumerate(ROWS.items()):
            cells = []
            for c, (support, col_args) in enumerate(COLUMNS.values()):
                base = row_args + col_args
                seq = trial(
                    server.address, f"s{r}{c}", [*base, "--children", str(args.sequential)], support
                )
                conc = trial(
                    server.address,
                    f"c{r}{c}",
                    [*base, "--children", str(args.concurrent), "--concurrent"],
                    support,
                )
                cells.append(f"{cell(seq, args.sequential)} / {cell(conc, args.concurrent)}")
            print(f"| {row} | " + " | ".join(cells) + " |", flush=True)
        print("\nApplication threads inside gRPC calls at every fork (4 threads, 100 children):\n")
        print("| children of | unset | =1 (10 children) |")
        print("| --- | --- | --- |")
        for row, row_args in (
            ("Connection, keepalive", ["--liveness", "keepalive"]),
            ("raw channel made in the parent", ["--raw"]),
        ):
            busy = [*row_args, "--busy", "4", "--child-timeout", "10"]
            unset = trial(server.address, "bu", [*busy, "--children", "100"], None)
            on = trial(server.address, "bo", [*busy, "--children", "10"], "1")
            print(f"| {row} | {cell(unset, 100)} | {cell(on, 10)} |", flush=True)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
