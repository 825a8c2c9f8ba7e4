"""The figures of a server outage: how soon clients are back, and how hard they knock.

Ours and the raw baselines ride the same outages at the same time (the kernel is
SIGKILLed, stays down for the outage, and is restarted on the same port), so load drift
hits both alike.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence

import grpc
from google.protobuf import empty_pb2

import chronicle_conn as cc
from chronicle_conn._proto import host_pb2_grpc
from tests.benchmarks._common import (
    BenchKernel,
    Row,
    median,
    pause,
    plaintext,
    version,
    wait_until,
)
from tests.harness import FaultProxy, KernelProcess


class _Poller:
    """A thread making a fail-fast unary call every ``interval`` on ``channel`` (a call
    that takes longer delays the next one; there is no burst to catch up) and recording
    when each successful call returned."""

    def __init__(self, name: str, channel: grpc.Channel, interval: float = 0.02) -> None:
        self._stub = host_pb2_grpc.ServerStub(channel)
        self._interval = interval
        self._cond = threading.Condition()
        self._ok: list[float] = []  # guarded by _cond: monotonic end times, ascending
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bench-poller-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        request = empty_pb2.Empty()
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                self._stub.GetVersionInfo(request, timeout=1.0)
            except grpc.RpcError:
                pass
            else:
                now = time.monotonic()
                with self._cond:
                    self._ok.append(now)
                    self._cond.notify_all()
            due = max(due + self._interval, time.monotonic())
            self._stop.wait(max(0.0, due - time.monotonic()))

    def first_success_after(self, after: float, timeout: float) -> float:
        """The end time of the first successful call that returned after ``after``."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._ok) and self._ok[-1] > after, timeout):
                raise TimeoutError(f"{self._thread.name}: no success within {timeout}s")
            return self._ok[bisect.bisect_right(self._ok, after)]

    def succeeded_between(self, start: float, end: float) -> int:
        with self._cond:
            return bisect.bisect_right(self._ok, end) - bisect.bisect_right(self._ok, start)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _call_until_ok(done: dict[str, float], name: str, stub: host_pb2_grpc.ServerStub) -> None:
    """A ``wait_for_ready`` call made during the outage, timed at its success. One that
    fails (it raced the dying transport) is made again at once."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            stub.GetVersionInfo(empty_pb2.Empty(), timeout=150, wait_for_ready=True)
        except grpc.RpcError:
            continue
        done[name] = time.monotonic()
        return


def _connect_through(done: dict[str, float], conn: cc.Connection) -> None:
    conn.connect(timeout=300)
    done["connect"] = time.monotonic()


def bench_recovery(rounds: int, outages: Sequence[float]) -> list[Row]:
    """Server back -> ``connect()`` returns / a ``wait_for_ready`` call through the facade
    succeeds / a fail-fast caller succeeds again, each beside a raw channel at grpc's
    defaults doing the same, all in the same outages.

    Clients: connection A (``retry_attempts=None``) with a thread in ``connect()`` and a
    ``wait_for_ready`` call through its facade, both started right after A noticed the
    kill; connection B (``retry_attempts=None``) whose only traffic is a fail-fast call
    every 20 ms through a stub on ``managed_channel``; raw channel A with a
    ``wait_for_ready`` call made right after the kill; raw channel B making fail-fast
    calls every 20 ms. Raw B has another user agent than raw A, so that the two do not
    share a subchannel (and its backoff) through grpc's global pool.
    """
    keys = ("connect", "wfr", "raw_wfr", "failfast", "raw_failfast")
    results: dict[str, dict[float, list[float]]] = {k: {o: [] for o in outages} for k in keys}
    attempts_during: dict[float, list[float]] = {o: [] for o in outages}
    anomalies = 0  # fail-fast calls that succeeded while the kernel was down (expect 0)
    lag: list[float] = []  # from serving to restart() returning
    with BenchKernel(keepalive_interval=1.0) as kernel:
        conn_a = cc.Connection(plaintext(kernel.address), retry_attempts=None)
        conn_b = cc.Connection(plaintext(kernel.address), retry_attempts=None)
        raw_a = grpc.insecure_channel(kernel.address)
        raw_b = grpc.insecure_channel(
            kernel.address, options=[("grpc.primary_user_agent", "bench-failfast")]
        )
        pollers: list[_Poller] = []
        try:
            conn_a.connect(timeout=30)
            conn_b.connect(timeout=30)
            version(raw_a, timeout=30, wait_for_ready=True)
            stub_a = host_pb2_grpc.ServerStub(conn_a.managed_channel)
            raw_stub_a = host_pb2_grpc.ServerStub(raw_a)
            poll_b = _Poller("ours", conn_b.managed_channel)
            raw_poll_b = _Poller("raw", raw_b)
            pollers = [poll_b, raw_poll_b]
            for _ in range(rounds):
                for outage in outages:
                    # Everyone connected and answered before the kill.
                    conn_a.connect(timeout=60)
                    version(raw_a, timeout=60, wait_for_ready=True)
                    now = time.monotonic()
                    for poller in pollers:
                        poller.first_success_after(now, 60)
                    done: dict[str, float] = {}
                    kernel.kill()
                    killed = time.monotonic()
                    wait_until(lambda: not conn_a.connected and not conn_b.connected, 5, "loss")
                    before = conn_a.stats().attempts
                    callers = [
                        threading.Thread(target=_connect_through, args=(done, conn_a)),
                        threading.Thread(target=_call_until_ok, args=(done, "wfr", stub_a)),
                        threading.Thread(target=_call_until_ok, args=(done, "raw_wfr", raw_stub_a)),
                    ]
                    for caller in callers:
                        caller.start()
                    pause(max(0.0, outage - (time.monotonic() - killed)))
                    down_for = time.monotonic() - killed
                    attempts_during[outage].append(
                        (conn_a.stats().attempts - before) / down_for * 60
                    )
                    kernel.restart()
                    back = kernel.listening_at()
                    lag.append(time.monotonic() - back)
                    for caller in callers:
                        caller.join(300)
                    for name in ("connect", "wfr", "raw_wfr"):
                        results[name][outage].append(done[name] - back)
                    for name, poller in (("failfast", poll_b), ("raw_failfast", raw_poll_b)):
                        # Calls already on the wire at the kill may still have returned.
                        anomalies += poller.succeeded_between(killed + 0.5, back)
                        results[name][outage].append(poller.first_success_after(back, 300) - back)
        finally:
            for poller in pollers:
                poller.close()
            raw_a.close()
            raw_b.close()
            conn_a.close()
            conn_b.close()

    def mean_of_medians(name: str) -> float:
        return sum(median(v) for v in results[name].values()) / len(outages)

    def detail(name: str, base: str) -> str:
        return ", ".join(
            f"{o:g} s: {median(results[name][o]) * 1000:.0f} / "
            f"{median(results[base][o]) * 1000:.0f} ms"
            for o in outages
        )

    def spread(name: str) -> str:
        every = [v * 1000 for per in results[name].values() for v in per]
        return f"min {min(every):.0f} ms, max {max(every):.0f} ms over {len(every)} outages"

    label = "/".join(f"{o:g}" for o in outages)
    how = (
        f"{rounds} round(s) of {label} s outages, timed from the kernel's own clock reading "
        f"once it serves (restart() returned {median(lag) * 1000:.1f} ms later, median; "
        f"max {max(lag) * 1000:.1f} ms); "
        "per outage the median, then the mean"
    )
    connect, raw = mean_of_medians("connect"), mean_of_medians("raw_wfr")
    wfr = mean_of_medians("wfr")
    fast, raw_fast = mean_of_medians("failfast"), mean_of_medians("raw_failfast")
    return [
        Row(
            "server back -> connect() returns (mean over outages)",
            connect,
            raw,
            "s",
            "<= 0.15 s and <= 0.2x raw",
            connect <= 0.15 and connect / raw <= 0.2,
            f"{how}; ours / raw wait_for_ready call: {detail('connect', 'raw_wfr')}; "
            f"ours {spread('connect')}; raw {spread('raw_wfr')}; ours attempted "
            + ", ".join(f"{o:g} s: {median(v):.0f}/min" for o, v in attempts_during.items())
            + " during the outage (a thread in connect())",
        ),
        Row(
            "server back -> wait_for_ready call via facade succeeds (mean)",
            wfr,
            raw,
            "s",
            "<= 0.5x raw",
            wfr / raw <= 0.5,
            f"same connection and outages as connect(); ours / raw: {detail('wfr', 'raw_wfr')}",
        ),
        Row(
            "server back -> first fail-fast call succeeds (mean over outages)",
            fast,
            raw_fast,
            "s",
            "<= 0.5 s",
            fast <= 0.5,
            f"a second connection, fail-fast calls every 20 ms via managed_channel / a raw "
            f"channel doing the same: {detail('failfast', 'raw_failfast')}; ours "
            f"{spread('failfast')}; calls that succeeded while down: {anomalies}",
        ),
    ]


# ---------------------------------------------------------------------------- attempts


def bench_attempts(repeats: int, seconds: float) -> list[Row]:
    """Connection attempts per minute while the server is down, counted on the server side.

    Four clients, each through its own ``FaultProxy`` (pass-through) to one kernel, ride
    the same outages: ours idle (nobody waiting, no calls), ours with a thread in
    ``connect()``, a raw channel at grpc's defaults with no calls, and one with a pending
    ``wait_for_ready`` call. While the kernel is down each proxy accepts every connect and
    resets it (the upstream refuses): its ``accepted`` count is the client's attempts.
    """
    names = ("ours_idle", "ours_demand", "raw_idle", "raw_demand")
    rates: dict[str, list[float]] = {name: [] for name in names}
    client_side: dict[str, list[float]] = {name: [] for name in names[:2]}  # stats().attempts
    with KernelProcess(keepalive_interval=1.0) as kernel:
        proxies = {name: FaultProxy("127.0.0.1", kernel.port).start() for name in names}
        ours_idle = cc.Connection(plaintext(proxies["ours_idle"].address), retry_attempts=None)
        ours_demand = cc.Connection(plaintext(proxies["ours_demand"].address), retry_attempts=None)
        ours = {"ours_idle": ours_idle, "ours_demand": ours_demand}
        raw_idle = grpc.insecure_channel(proxies["raw_idle"].address)
        raw_demand = grpc.insecure_channel(proxies["raw_demand"].address)
        try:
            for _ in range(repeats):
                ours_idle.connect(timeout=60)
                ours_demand.connect(timeout=60)
                version(raw_idle, timeout=60, wait_for_ready=True)
                version(raw_demand, timeout=60, wait_for_ready=True)
                pause(0.2)
                counted = {name: proxy.accepted for name, proxy in proxies.items()}
                made = {name: conn.stats().attempts for name, conn in ours.items()}
                kernel.kill()
                killed = time.monotonic()
                wait_until(lambda: not ours_idle.connected and not ours_demand.connected, 5, "loss")
                done: dict[str, float] = {}
                waiters = [
                    threading.Thread(target=_connect_through, args=(done, ours_demand)),
                    threading.Thread(
                        target=_call_until_ok,
                        args=(done, "raw", host_pb2_grpc.ServerStub(raw_demand)),
                    ),
                ]
                for waiter in waiters:
                    waiter.start()
                pause(max(0.0, seconds - (time.monotonic() - killed)))
                down_for = time.monotonic() - killed
                for name, proxy in proxies.items():
                    rates[name].append((proxy.accepted - counted[name]) / down_for * 60)
                for name, conn in ours.items():
                    client_side[name].append((conn.stats().attempts - made[name]) / down_for * 60)
                kernel.restart()
                for waiter in waiters:
                    waiter.join(300)
        finally:
            raw_idle.close()
            raw_demand.close()
            ours_idle.close()
            ours_demand.close()
            for proxy in proxies.values():
                proxy.close()

    def each(name: str) -> str:
        return "/".join(f"{v:.0f}" for v in rates[name])

    def own(name: str) -> str:
        return "/".join(f"{v:.0f}" for v in client_side[name])

    how = f"{repeats} outage(s) of {seconds:g} s, counted from the kill"
    idle, raw_idle_rate = median(rates["ours_idle"]), median(rates["raw_idle"])
    demand, raw_demand_rate = median(rates["ours_demand"]), median(rates["raw_demand"])
    return [
        Row(
            "connect attempts/min, server down, idle",
            idle,
            raw_idle_rate,
            "/min",
            "(informative)",
            None,
            f"{how}; each outage ours {each('ours_idle')} / raw {each('raw_idle')} (ours by "
            f"its own count of attempts: {own('ours_idle')}); the raw channel goes IDLE and "
            "does not dial without calls",
        ),
        Row(
            "connect attempts/min, server down, with demand",
            demand,
            raw_demand_rate,
            "/min",
            "<= 600/min",
            demand <= 600,
            f"{how}; each outage ours {each('ours_demand')} / raw {each('raw_demand')} (ours "
            f"by its own count of attempts: {own('ours_demand')}); a thread in connect() / "
            "a pending wait_for_ready call",
        ),
    ]
