"""Benchmarks of the connection manager, each beside a baseline measured in the same run.

    python tests/benchmarks/bench_connection.py            # full run, about 3 minutes
    python tests/benchmarks/bench_connection.py --quick    # fewer repeats (a smoke run)

Prints one table: our figure, the baseline, their ratio, and the goal. Figures are
medians over repeated runs; the machine is shared and noisy, so compare ratios, not
absolute numbers. Real components only: the dev kernel in a child process (SIGKILLed and
restarted on the same port), raw ``grpc`` channels as baselines.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import structlog
from google.protobuf import empty_pb2

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import chronicle_conn as cc  # noqa: E402
from chronicle_conn._proto import host_pb2_grpc  # noqa: E402
from tests.harness import KernelProcess, free_port  # noqa: E402

S = cc.ConnectionState


@dataclass
class Row:
    figure: str
    ours: float
    baseline: float | None
    unit: str
    goal: str
    ok: bool | None  # None: an informative figure with no goal
    note: str = ""
    paired_ratio: float | None = None  # when measured in pairs, see bench_throughput

    @property
    def ratio(self) -> float | None:
        """The paired ratio when the benchmark measured one, else ours / baseline."""
        if self.paired_ratio is not None:
            return self.paired_ratio
        return None if not self.baseline else self.ours / self.baseline


def plaintext(address: str) -> str:
    return f"chronicle://{address}?disableTls=true"


def pause(seconds: float) -> None:
    """Let time pass (the benchmark's scenario needs wall-clock time to elapse)."""
    threading.Event().wait(seconds)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    cond = threading.Condition()
    deadline = time.monotonic() + timeout
    with cond:
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(what)
            cond.wait(min(remaining, 0.005))


def version(channel: grpc.Channel, **kwargs: object) -> str:
    stub = host_pb2_grpc.ServerStub(channel)
    return stub.GetVersionInfo(empty_pb2.Empty(), **kwargs).Version  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- figures


def _one_kill(
    kernel: KernelProcess, conn: cc.Connection, lost_at: list[float]
) -> tuple[float, float]:
    """Kill the kernel once; return (ours, raw) seconds from SIGKILL to noticing it."""
    conn.connect(timeout=20)
    channel = grpc.insecure_channel(kernel.address)
    grpc.channel_ready_future(channel).result(timeout=10)
    raw_at: list[float] = []
    seen_ready = threading.Event()

    def on_state(state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            seen_ready.set()
        elif seen_ready.is_set() and not raw_at:
            raw_at.append(time.monotonic())

    channel.subscribe(on_state)
    if not seen_ready.wait(5):
        raise TimeoutError("the raw channel never reported READY")
    lost_at.clear()
    killed = time.monotonic()
    kernel.kill()
    wait_until(lambda: bool(lost_at) and bool(raw_at), 10, "loss not seen")
    channel.unsubscribe(on_state)
    channel.close()
    kernel.restart()
    return lost_at[0] - killed, raw_at[0] - killed


def bench_detection(repeats: int) -> Row:
    """SIGKILL -> ``connected`` is False, beside a raw channel's own IDLE callback."""
    ours, raw = [], []
    with KernelProcess(keepalive_interval=1.0) as kernel:
        conn = cc.Connection(plaintext(kernel.address), retry_attempts=None)
        lost_at: list[float] = []
        conn.add_listener(
            lambda c: lost_at.append(time.monotonic()) if c.new is S.RECONNECTING else None
        )
        try:
            for _ in range(repeats):
                mine, theirs = _one_kill(kernel, conn, lost_at)
                ours.append(mine)
                raw.append(theirs)
        finally:
            conn.close()
    value = statistics.median(ours) * 1000
    return Row(
        "SIGKILL -> connected is False",
        value,
        statistics.median(raw) * 1000,
        "ms",
        "<= 20 ms",
        value <= 20,
        "baseline: a raw channel's subscribe callback leaving READY (the floor)",
    )


def bench_channel_call(repeats: int) -> Row:
    """``conn.channel()`` on a connected manager, beside a plain attribute read."""
    with KernelProcess() as kernel, cc.Connection(plaintext(kernel.address)) as conn:
        conn.connect(timeout=20)
        number = 1_000_000
        ours = timeit.repeat(conn.channel, number=number, repeat=repeats)

        class Holder:
            attr = 1

        holder = Holder()
        base = timeit.repeat(
            "holder.attr", globals={"holder": holder}, number=number, repeat=repeats
        )
    value = statistics.median(ours) / number * 1e9
    return Row(
        "conn.channel() on a connected manager",
        value,
        statistics.median(base) / number * 1e9,
        "ns",
        "<= 150 ns",
        value <= 150,
        "baseline: a plain attribute read",
    )


def bench_dispatch(repeats: int) -> Row:
    """What the facade adds to one call: a stub on ``conn.channel()`` whose underlying
    callable does nothing, beside calling that no-op callable directly (no network)."""
    with KernelProcess() as kernel, cc.Connection(plaintext(kernel.address)) as conn:
        conn.connect(timeout=20)

        def noop(*args: object) -> None:
            return None

        call = conn.channel().unary_unary("/x.Y/Z")
        with contextlib.suppress(grpc.RpcError):
            call(b"", timeout=1)  # fills the per-generation cache (UNIMPLEMENTED)
        gen = conn._core.current
        call._cache = (gen, noop)  # type: ignore[attr-defined]
        number = 500_000
        ours = timeit.repeat(lambda: call(b"", 5.0), number=number, repeat=repeats)
        base = timeit.repeat(lambda: noop(b"", 5.0), number=number, repeat=repeats)
    added = (statistics.median(ours) - statistics.median(base)) / number * 1e9
    return Row(
        "dispatch added per call by the facade",
        added,
        None,
        "ns",
        "(informative)",
        None,
        "a unary call through ManagedChannel minus calling its inner callable directly",
    )


def _race(channels: dict[str, grpc.Channel], threads: int, seconds: float) -> dict[str, int]:
    """``threads`` threads per channel, all at once against the same kernel, each making
    unary calls back to back for ``seconds``; return the calls each channel completed."""
    counts = {name: [0] * threads for name in channels}
    stop = threading.Event()
    start = threading.Barrier(threads * len(channels) + 1)

    def work(name: str, channel: grpc.Channel, index: int) -> None:
        stub = host_pb2_grpc.ServerStub(channel)
        request = empty_pb2.Empty()
        start.wait()
        done = 0
        while not stop.is_set():
            stub.GetVersionInfo(request, timeout=10)
            done += 1
        counts[name][index] = done

    workers = [
        threading.Thread(target=work, args=(name, channel, index))
        for name, channel in channels.items()
        for index in range(threads)
    ]
    for worker in workers:
        worker.start()
    start.wait()
    pause(seconds)
    stop.set()
    for worker in workers:
        worker.join(30)
    return {name: sum(per_thread) for name, per_thread in counts.items()}


def bench_throughput(rounds: int, seconds: float) -> Row:
    """8-thread unary RPC throughput through stubs on ``conn.channel()`` / a raw channel.

    Both clients run at the same time, 8 threads each, against the same kernel, so the
    machine's load drift (+-20 % between rounds here) hits both alike; each round gives
    the ratio of their completed calls, and the figure is the median over the rounds. A
    control runs a second raw channel against the first the same way: its ratio is what
    "no difference" looks like on this machine.
    """
    ratios, control, ours, raw = [], [], [], []
    with (
        KernelProcess(keepalive_interval=1.0) as kernel,
        cc.Connection(plaintext(kernel.address)) as conn,
    ):
        conn.connect(timeout=20)
        channel = grpc.insecure_channel(kernel.address)
        other = grpc.insecure_channel(
            kernel.address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        try:
            _race({"raw": channel, "ours": conn.channel(), "other": other}, 8, 0.5)  # warm up
            for _ in range(rounds):
                counts = _race({"raw": channel, "ours": conn.channel()}, 8, seconds)
                ours.append(counts["ours"] / seconds)
                raw.append(counts["raw"] / seconds)
                ratios.append(counts["ours"] / counts["raw"])
                counts = _race({"raw": channel, "other": other}, 8, seconds)
                control.append(counts["other"] / counts["raw"])
        finally:
            channel.close()
            other.close()
    ratio = statistics.median(ratios)
    spread = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio] * 3
    floor = statistics.quantiles(control, n=4) if len(control) > 1 else [control[0]] * 3
    return Row(
        "8-thread unary throughput, managed / raw",
        statistics.median(ours),
        statistics.median(raw),
        "calls/s",
        ">= 0.99 (ratio)",
        ratio >= 0.99,
        f"median of {rounds} concurrent rounds of {seconds:g} s: {ratio:.4f} (quartiles "
        f"{spread[0]:.4f}..{spread[2]:.4f}); control raw/raw: {statistics.median(control):.4f} "
        f"({floor[0]:.4f}..{floor[2]:.4f})",
        paired_ratio=ratio,
    )


def _release_connect_waiters(count: int) -> float:
    """``count`` threads in ``connect()`` while the kernel is down; seconds from the
    CONNECTED transition to the last of them returning."""
    port = free_port()
    conn = cc.Connection(
        plaintext(f"127.0.0.1:{port}"), retry_attempts=None, reconnect_base_delay=0.2
    )
    connected_at: list[float] = []
    conn.add_listener(lambda c: connected_at.append(c.at) if c.new is S.CONNECTED else None)
    returned: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(count + 1)

    def wait() -> None:
        ready.wait()
        conn.connect(timeout=120)
        now = time.time()
        with lock:
            returned.append(now)

    threads = [threading.Thread(target=wait, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    ready.wait()
    wait_until(lambda: conn.stats().waiters == count, 60, "waiters")
    with KernelProcess(port=port):
        for thread in threads:
            thread.join(120)
        conn.close()
    return max(returned) - connected_at[0]


def _release_bare_waiters(count: int) -> float:
    """The same number of threads on a bare Condition: seconds from ``notify_all`` to the
    last of them running."""
    cond = threading.Condition()
    flag = [False]
    waiting = [0]  # guarded by cond: threads that reached cond.wait()
    woke: list[float] = []
    lock = threading.Lock()

    def bare() -> None:
        with cond:
            waiting[0] += 1  # counted and waiting in one critical section
            while not flag[0]:
                cond.wait()
        now = time.time()
        with lock:
            woke.append(now)

    threads = [threading.Thread(target=bare, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while True:
        with cond:
            if waiting[0] == count:  # all of them are inside cond.wait()
                flag[0] = True
                released = time.time()
                cond.notify_all()
                break
        if time.monotonic() > deadline:
            raise TimeoutError("the bare waiters did not all start")
        pause(0.005)
    for thread in threads:
        thread.join(60)
    return max(woke) - released


def bench_waiters(repeats: int, count: int = 1000) -> Row:
    """1,000 threads blocked in ``connect()``, released when the kernel returns, beside a
    bare ``Condition.notify_all`` to 1,000 waiters."""
    ours, base = [], []
    for _ in range(repeats):
        ours.append(_release_connect_waiters(count))
        base.append(_release_bare_waiters(count))
    value = statistics.median(ours) * 1000
    baseline = statistics.median(base) * 1000
    return Row(
        f"{count} threads in connect(), released / bare notify_all",
        value,
        baseline,
        "ms",
        "<= 1.5 (ratio)",
        value / baseline <= 1.5,
        "from the CONNECTED transition / from notify_all to the last waiter running",
    )


def bench_close_in_backoff(repeats: int) -> Row:
    """``close()`` during a 30 s backoff."""
    took = []
    for _ in range(repeats):
        conn = cc.Connection(
            plaintext(f"127.0.0.1:{free_port()}"),
            retry_attempts=None,
            delay_factory=lambda policy: itertools.repeat(30.0),
        )
        wait_until(lambda conn=conn: conn.stats().current_delay == 30.0, 20, "no backoff")
        pause(0.5)  # well inside the 30 s sleep
        started = time.monotonic()
        conn.close()
        took.append(time.monotonic() - started)
        assert conn._threads() == []
    value = statistics.median(took) * 1000
    return Row("close() during a 30 s backoff", value, None, "ms", "<= 50 ms", value <= 50, "")


def _call_through(done: dict[str, float], name: str, stub: host_pb2_grpc.ServerStub) -> None:
    """A caller waiting out the outage: one ``wait_for_ready`` call, timed at success."""
    stub.GetVersionInfo(empty_pb2.Empty(), timeout=60, wait_for_ready=True)
    done[name] = time.monotonic()


def bench_recovery(rounds: int, outages: tuple[float, ...]) -> Row:
    """Recovery with a caller waiting from the start of the outage (default settings) /
    a raw channel with a pending ``wait_for_ready`` RPC (grpc's defaults), summed over
    the outage lengths; both clients ride the same outages."""
    ours: dict[float, list[float]] = {o: [] for o in outages}
    raw: dict[float, list[float]] = {o: [] for o in outages}
    with KernelProcess(keepalive_interval=1.0) as kernel:
        conn = cc.Connection(plaintext(kernel.address))  # default settings
        channel = grpc.insecure_channel(kernel.address)  # grpc's defaults
        try:
            conn.connect(timeout=20)
            managed_stub = host_pb2_grpc.ServerStub(conn.channel())
            raw_stub = host_pb2_grpc.ServerStub(channel)
            for _, outage in itertools.product(range(rounds), outages):
                conn.connect(timeout=30)
                raw_stub.GetVersionInfo(empty_pb2.Empty(), timeout=30, wait_for_ready=True)
                done: dict[str, float] = {}
                kernel.kill()
                callers = [
                    threading.Thread(target=_call_through, args=(done, "ours", managed_stub)),
                    threading.Thread(target=_call_through, args=(done, "raw", raw_stub)),
                ]
                for caller in callers:
                    caller.start()
                pause(outage)
                kernel.restart()
                back = time.monotonic()
                for caller in callers:
                    caller.join(90)
                ours[outage].append(done["ours"] - back)
                raw[outage].append(done["raw"] - back)
        finally:
            channel.close()
            conn.close()
    ours_sum = sum(statistics.median(v) for v in ours.values())
    raw_sum = sum(statistics.median(v) for v in raw.values())
    ms = {o: (statistics.median(ours[o]) * 1000, statistics.median(raw[o]) * 1000) for o in outages}
    detail = ", ".join(f"{o:g} s: {a:.0f} / {b:.0f} ms" for o, (a, b) in ms.items())
    return Row(
        f"recovery summed over {'/'.join(f'{o:g}' for o in outages)} s outages",
        ours_sum * 1000,
        raw_sum * 1000,
        "ms",
        "<= 0.5 (ratio)",
        ours_sum / raw_sum <= 0.5,
        detail,
    )


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--only", action="append", help="run only these (by function name)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40),  # errors only
    )
    quick = args.quick
    benches: dict[str, Callable[[], Row]] = {
        "detection": lambda: bench_detection(3 if quick else 9),
        "channel": lambda: bench_channel_call(3 if quick else 7),
        "dispatch": lambda: bench_dispatch(3 if quick else 7),
        "throughput": lambda: bench_throughput(2 if quick else 10, 1.0 if quick else 2.0),
        "waiters": lambda: bench_waiters(1 if quick else 3, 200 if quick else 1000),
        "close": lambda: bench_close_in_backoff(3 if quick else 9),
        "recovery": lambda: bench_recovery(1 if quick else 3, (2.0,) if quick else (2.0, 5.0, 9.0)),
    }
    rows = []
    for name, bench in benches.items():
        if args.only and name not in args.only:
            continue
        print(f"running {name}...", file=sys.stderr, flush=True)
        rows.append(bench())
    print()
    print("| figure | ours | baseline | ratio | goal | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        base = f"{row.baseline:.4g} {row.unit}" if row.baseline is not None else "-"
        ratio = f"{row.ratio:.3f}" if row.ratio is not None else "-"
        print(
            f"| {row.figure} | {row.ours:.4g} {row.unit} | {base} | {ratio} | {row.goal} | "
            f"{'-' if row.ok is None else 'yes' if row.ok else 'NO'} |"
        )
    notes = [f"- {row.figure}: {row.note}" for row in rows if row.note]
    if notes:
        print("\n" + "\n".join(notes))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"ratio": r.ratio} for r in rows], indent=2))
    return 0 if all(row.ok is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
