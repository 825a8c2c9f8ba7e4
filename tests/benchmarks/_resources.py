"""What a connection costs: import time, ``close()``, threads/RSS/CPU when idle, and
memory over crash/restart churn. Anything measured per process runs in a fresh child."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import grpc

import chronicle_conn as cc
from tests.benchmarks._common import (
    ROOT,
    Row,
    WideKernel,
    median,
    pause,
    plaintext,
    quartiles,
    run_child,
    slope,
    version,
)

# ---------------------------------------------------------------------------- import


def bench_import(runs: int) -> Row:
    """``python -c "import chronicle_conn"`` beside ``python -c "import grpc"`` (and a bare
    ``python -c pass`` for reference), interleaved, bytecode warm."""
    commands = {
        "ours": [sys.executable, "-c", "import chronicle_conn"],
        "grpc": [sys.executable, "-c", "import grpc"],
        "bare": [sys.executable, "-c", "pass"],
    }
    env = dict(os.environ)  # main() made it bytecode-warm

    def once(name: str) -> float:
        started = time.perf_counter()
        subprocess.run(
            commands[name],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - started

    for _ in range(2):  # compile and cache the bytecode, warm the page cache
        for name in commands:
            once(name)
    took: dict[str, list[float]] = {name: [] for name in commands}
    order = list(commands)
    for index in range(runs):
        for name in order[index % 3 :] + order[: index % 3]:
            took[name].append(once(name))
    ours, base, bare = (median(took[n]) for n in ("ours", "grpc", "bare"))
    extra = _import_breakdown(env)
    lo, hi = quartiles([a / b for a, b in zip(took["ours"], took["grpc"], strict=True)])
    return Row(
        'python -c "import chronicle_conn" / "import grpc"',
        ours * 1000,
        base * 1000,
        "ms",
        "<= 1.5 (ratio)",
        ours / base <= 1.5,
        f"median of {runs} interleaved runs each, bytecode warm; per-run ratio quartiles "
        f"{lo:.3f}..{hi:.3f}; bare interpreter {bare * 1000:.1f} ms, so the imports alone "
        f"take {(ours - bare) * 1000:.1f} / {(base - bare) * 1000:.1f} ms; what "
        f"chronicle_conn imports beyond grpc (-X importtime, self time, min of 3): {extra}",
    )


def _import_times(code: str, env: dict[str, str]) -> dict[str, int]:
    """Module -> self time in microseconds, per ``-X importtime``."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    times = {}
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and "self [us]" not in line:
            times[parts[2].strip()] = int(parts[0].split(":")[1])
    return times


def _import_breakdown(env: dict[str, str], runs: int = 3) -> str:
    """The modules ``import chronicle_conn`` loads and ``import grpc`` does not, grouped by
    package (the package's own modules one by one), largest first."""
    ours: dict[str, int] = {}
    theirs: set[str] = set()
    for _ in range(runs):
        for module, micros in _import_times("import chronicle_conn", env).items():
            ours[module] = min(micros, ours.get(module, micros))
        theirs.update(_import_times("import grpc", env))
    groups: dict[str, int] = {}
    for module, micros in ours.items():
        if module in theirs:
            continue
        parts = module.split(".")
        group = ".".join(parts[:2]) if parts[0] == "chronicle_conn" else parts[0]
        groups[group] = groups.get(group, 0) + micros
    total = sum(groups.values())
    top = sorted(groups.items(), key=lambda item: -item[1])[:8]
    shown = ", ".join(f"{name} {micros / 1000:.1f}" for name, micros in top)
    return f"{total / 1000:.0f} ms in all: {shown} ms"


# ---------------------------------------------------------------------------- close


def bench_close_connected(repeats: int, count: int) -> list[Row]:
    """``close()`` of a connected, idle connection (defaults: keep-alive with the dev
    kernel), one at a time; then ``count`` connected connections closed one after another."""
    took, raw_took = [], []
    with WideKernel(keepalive_interval=1.0) as kernel:
        for _ in range(repeats):
            conn = cc.Connection(plaintext(kernel.address))
            conn.connect(timeout=30)
            version(conn.channel(), timeout=10)
            channel = grpc.insecure_channel(
                kernel.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            version(channel, timeout=10, wait_for_ready=True)
            pause(0.3)
            started = time.perf_counter()
            conn.close()
            took.append(time.perf_counter() - started)
            started = time.perf_counter()
            channel.close()
            raw_took.append(time.perf_counter() - started)
        conns = [cc.Connection(plaintext(kernel.address)) for _ in range(count)]
        for conn in conns:
            conn.connect(timeout=120)
        pause(1.0)
        started = time.perf_counter()
        for conn in conns:
            conn.close()
        total = time.perf_counter() - started
        left = sum(len(conn._threads()) for conn in conns)
    one = median(took) * 1000
    return [
        Row(
            "close() of a connected connection",
            one,
            None,
            "ms",
            "<= 50 ms",
            one <= 50,
            f"median of {repeats}, max {max(took) * 1000:.1f} ms; a raw channel's close() "
            f"{median(raw_took) * 1000:.2f} ms (for reference)",
        ),
        Row(
            f"closing {count} connected connections one after another",
            total,
            None,
            "s",
            "<= 2 s",
            total <= 2,
            f"{total / count * 1000:.1f} ms each; threads left behind: {left}",
        ),
    ]


# ---------------------------------------------------------------------------- idle


def bench_idle(repeats: int, seconds: float, count: int = 100) -> list[Row]:
    """``count`` connected idle connections in a fresh child process, per liveness mode,
    beside ``count`` raw channels each with a ``subscribe`` callback (grpc's poller).

    Children alternate in order over the repeats; each reports OS threads (before: after
    grpc's own threads started), RSS, and process CPU over ``seconds`` of idleness.
    """
    modes = ("raw", "keepalive", "transport")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    with WideKernel(keepalive_interval=1.0) as kernel:
        for index in range(repeats):
            for mode in modes[index % 3 :] + modes[: index % 3]:
                args = ["idle", "--mode", mode, "--address", kernel.address]
                args += ["--count", str(count), "--idle", str(seconds)]
                runs[mode].append(run_child(args, timeout=300 + seconds))

    def threads(mode: str) -> float:
        return median(
            [(r["threads_idle_median"] - r["threads_before"]) / count for r in runs[mode]]
        )

    def rss(mode: str) -> float:
        return median([(r["rss_after_kb"] - r["rss_before_kb"]) / count for r in runs[mode]])

    def cpu(mode: str) -> float:
        return median([r["cpu_s"] / r["idle_s"] * 1000 for r in runs[mode]])

    def kinds(mode: str) -> str:
        last = runs[mode][-1]
        shown = ", ".join(f"{k} x{v}" for k, v in sorted(last["thread_kinds"].items()))
        native = (last["threads_after"] - last["py_threads_after"]) - (
            last["threads_before"] - last["py_threads_before"]
        )
        return (
            f"Python threads: {shown}; native threads added: {native}; OS threads while "
            f"idle median/max {last['threads_idle_median']}/{last['threads_idle_max']} "
            f"(before {last['threads_before']}); connected at end "
            f"{last['connected_at_end']}/{count}"
        )

    how = f"{count} connections, {len(runs['raw'])} child(ren) per mode, {seconds:g} s idle"
    rows = []
    for mode in ("keepalive", "transport"):
        rows.append(
            Row(
                f"threads per connection, {count} idle, {mode}",
                threads(mode),
                threads("raw"),
                "",
                "<= 3",
                threads(mode) <= 3,
                f"{how}; {kinds(mode)}",
            )
        )
    rows[0].note += f". Raw baseline: {kinds('raw')}"
    for mode in ("keepalive", "transport"):
        rows.append(
            Row(
                f"RSS per connection, {count} idle, {mode}",
                rss(mode),
                rss("raw"),
                "kB",
                "(informative)",
                None,
                "each child: "
                + ", ".join(
                    f"{(r['rss_after_kb'] - r['rss_before_kb']) / 1024:.1f} MB" for r in runs[mode]
                )
                + f" for {count} (raw: "
                + ", ".join(
                    f"{(r['rss_after_kb'] - r['rss_before_kb']) / 1024:.1f} MB" for r in runs["raw"]
                )
                + ")",
            )
        )
    for mode in ("keepalive", "transport"):
        rows.append(
            Row(
                f"idle CPU, {count} connections, {mode}",
                cpu(mode),
                cpu("raw"),
                "ms/s",
                "(informative)",
                None,
                "process CPU per second of idleness, each child: "
                + ", ".join(f"{r['cpu_s'] / r['idle_s'] * 1000:.0f}" for r in runs[mode])
                + " (raw: "
                + ", ".join(f"{r['cpu_s'] / r['idle_s'] * 1000:.0f}" for r in runs["raw"])
                + ")",
            )
        )
    return rows


# ---------------------------------------------------------------------------- churn


def _rss_at(samples: list[list[int]], cycle: int, column: int = 1) -> int:
    """The RSS sample (kB) taken at (or nearest before) ``cycle``."""
    best = samples[0]
    for sample in samples:
        if sample[0] <= cycle:
            best = sample
    return best[column]


def bench_churn(cycles: int, repeats: int) -> Row:
    """RSS over ``cycles`` crash/restart cycles: one ``Connection`` in a child, then raw
    channels in another child building as many channels as that connection did; the pair
    ``repeats`` times, alternating, and the growth per cycle averaged.

    Both first run some warm-up cycles (allocator arenas, grpc's caches fill up), and
    cycle 0 is sampled after them; the RSS before the warm-up is in the note. Each sample
    follows ``gc.collect()``; a second reading after ``malloc_trim(0)`` (free pages
    handed back) is in the note, to tell retained memory from allocator slack.
    """
    every = max(1, cycles // 30)
    warmup = 60  # the first ~80 cycles fill caches in both (measured); cycle 0 is after 60
    timeout = 120 + (cycles + warmup) * 5
    common = ["--cycles", str(cycles), "--warmup", str(warmup), "--every", str(every)]
    ours_runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        ours = run_child(["churn", "--mode", "ours", *common], timeout)
        raw = run_child(
            ["churn", "--mode", "raw", *common, "--channels", str(ours["attempts"])], timeout
        )
        ours_runs.append(ours)
        raw_runs.append(raw)
    third = cycles / 3

    def growth(result: dict[str, Any], column: int = 1) -> float:
        """kB per cycle from the first third of the samples to the last, by their medians
        (robust to the single-sample jitter of RSS)."""
        samples = result["samples"]
        first = median([s[column] for s in samples if s[0] <= third])
        last = median([s[column] for s in samples if s[0] >= cycles - third])
        return (last - first) / (cycles - third)

    def mean_growth(runs: list[dict[str, Any]], column: int = 1) -> float:
        return sum(growth(r, column) for r in runs) / len(runs)

    def each(runs: list[dict[str, Any]], column: int = 1) -> str:
        return "/".join(f"{growth(r, column):.2f}" for r in runs)

    def fitted(runs: list[dict[str, Any]]) -> str:
        return "/".join(f"{slope([(s[0], s[1]) for s in r['samples']]):.2f}" for r in runs)

    marks = [0, cycles // 3, 2 * cycles // 3, cycles]

    def at_marks(result: dict[str, Any], column: int = 1) -> str:
        return "/".join(f"{_rss_at(result['samples'], m, column) / 1024:.1f}" for m in marks)

    ours_growth, raw_growth = mean_growth(ours_runs), mean_growth(raw_runs)
    # RSS moves in steps: allow one 64 kB step over the span (at least 0.5 kB/cycle).
    tolerance = max(0.5, 64 / (cycles - third))
    first_ours, first_raw = ours_runs[0], raw_runs[0]
    return Row(
        f"RSS growth per crash/restart cycle ({cycles} cycles)",
        ours_growth,
        raw_growth,
        "kB/cycle",
        f"<= raw (+{tolerance:.2g} kB)",
        ours_growth <= raw_growth + tolerance,
        with_ratio=False,
        note=f"(median RSS of the last third of the samples - that of the first third) / "
        f"cycles between; {repeats} child(ren) each: ours {each(ours_runs)} / raw "
        f"{each(raw_runs)} kB/cycle, after malloc_trim ours {each(ours_runs, 2)} / raw "
        f"{each(raw_runs, 2)}, least-squares slopes ours {fitted(ours_runs)} / raw "
        f"{fitted(raw_runs)}; RSS MB at cycles {'/'.join(map(str, marks))} (first child): "
        f"ours {at_marks(first_ours)}, raw {at_marks(first_raw)}; before {warmup} warm-up "
        f"cycles ours {first_ours['rss_start_kb'] / 1024:.1f} / raw "
        f"{first_raw['rss_start_kb'] / 1024:.1f} MB; channels built per child ours "
        f"{first_ours['attempts']} / raw {first_raw['channels']}; a child took "
        f"{first_ours['elapsed_s']:.0f} / {first_raw['elapsed_s']:.0f} s",
    )
