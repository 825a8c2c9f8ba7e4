"""The figures of one connected process: detection, the hot path, throughput, waiters,
``close()`` in a backoff. Each is measured beside its baseline in the same run."""

from __future__ import annotations

import contextlib
import itertools
import statistics
import threading
import time
import timeit
from collections.abc import Callable

import grpc
from google.protobuf import empty_pb2

import chronicle_conn as cc
from chronicle_conn._proto import host_pb2_grpc
from tests.benchmarks._common import Row, pause, plaintext, wait_until
from tests.harness import KernelProcess, free_port

S = cc.ConnectionState


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


def _interleaved(
    ours: Callable[[], object], base: timeit.Timer | Callable[[], object], number: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds per call of ``ours`` and ``base``, timed alternately ``repeats`` times
    (``number`` calls each), so that a burst of load hits both."""
    mine = timeit.Timer(ours)
    theirs = base if isinstance(base, timeit.Timer) else timeit.Timer(base)
    a, b = [], []
    for _ in range(repeats):
        a.append(mine.timeit(number) / number)
        b.append(theirs.timeit(number) / number)
    return a, b


def bench_channel_call(repeats: int) -> Row:
    """``conn.channel()`` on a connected manager, beside a plain attribute read."""
    with KernelProcess() as kernel, cc.Connection(plaintext(kernel.address)) as conn:
        conn.connect(timeout=20)

        class Holder:
            attr = 1

        read = timeit.Timer("holder.attr", globals={"holder": Holder()})
        ours, base = _interleaved(conn.channel, read, 200_000, repeats)
    value = statistics.median(ours) * 1e9
    return Row(
        "conn.channel() on a connected manager",
        value,
        statistics.median(base) * 1e9,
        "ns",
        "<= 150 ns",
        value <= 150,
        f"baseline: a plain attribute read; {repeats} interleaved timings of 200,000 calls; "
        f"fastest {min(ours) * 1e9:.0f} / {min(base) * 1e9:.0f} ns",
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
        ours, base = _interleaved(lambda: call(b"", 5.0), lambda: noop(b"", 5.0), 100_000, repeats)
    added = (statistics.median(ours) - statistics.median(base)) * 1e9
    return Row(
        "dispatch added per call by the facade",
        added,
        None,
        "ns",
        "(informative)",
        None,
        "a unary call through ManagedChannel minus calling its inner callable directly "
        f"({statistics.median(ours) * 1e9:.0f} - {statistics.median(base) * 1e9:.0f} ns)",
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
