"""Entry points of the benchmark's child processes (``python -m tests.benchmarks._children``).

``kernel``: the dev kernel, also writing when it started serving (see ``BenchKernel``).
``idle``: 100 connected idle connections (or raw channels) in a fresh process; prints
threads, RSS and CPU as one JSON line.
``churn``: crash/restart cycles against a kernel of its own; prints RSS samples as JSON.

Each measuring child prints exactly one JSON object, on its last stdout line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable


def _kernel(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="_children kernel")
    parser.add_argument("--max-workers", type=int, required=True)
    args, rest = parser.parse_known_args(argv)
    import time

    from chronicle_conn import cli, devserver

    server = devserver.DevServer
    start = server.start

    def start_and_stamp(self: devserver.DevServer) -> devserver.DevServer:
        started = start(self)
        # Before the CLI prints its listening line: the parent finds it when it has that.
        print(f"bench-listening-at {time.monotonic():.6f}", file=sys.stderr, flush=True)
        return started

    server.start = start_and_stamp  # type: ignore[method-assign]
    return cli.main(["dev-server", "--max-workers", str(args.max_workers), *rest])


def _quiet() -> None:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))


def _idle(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="_children idle")
    parser.add_argument("--mode", choices=("keepalive", "transport", "raw"), required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args(argv)
    _quiet()

    import re
    import threading
    import time

    import grpc

    import chronicle_conn as cc
    from tests.benchmarks._common import (
        cpu_seconds,
        pause,
        plaintext,
        proc_status,
        version,
        wait_until,
    )

    # Warm grpc's process-wide machinery (its core threads) the same way in every mode,
    # so that "before" already has them.
    # Kept open: grpc shuts its core (and its threads) down when the last channel closes.
    warm = grpc.insecure_channel(args.address, options=[("grpc.use_local_subchannel_pool", 1)])
    version(warm, timeout=10, wait_for_ready=True)
    pause(0.5)
    threads_before = proc_status("Threads")
    py_before = threading.active_count()
    rss_before = proc_status("VmRSS")

    started = time.monotonic()
    keep: list[object] = [warm]
    ready: set[int] = set()
    lock = threading.Lock()
    if args.mode == "raw":

        def watcher(index: int):  # type: ignore[no-untyped-def]
            def on_state(state: grpc.ChannelConnectivity) -> None:
                if state is grpc.ChannelConnectivity.READY:
                    with lock:
                        ready.add(index)

            return on_state

        for index in range(args.count):
            channel = grpc.insecure_channel(
                args.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            callback = watcher(index)
            channel.subscribe(callback, try_to_connect=True)
            keep.append((channel, callback))

        def all_ready() -> bool:
            with lock:
                return len(ready) == args.count

        wait_until(all_ready, 120, "raw channels not all READY")
    else:
        conns = [
            cc.Connection(plaintext(args.address), liveness=args.mode, retry_attempts=None)
            for _ in range(args.count)
        ]
        for conn in conns:
            conn.connect(timeout=120)
        keep.extend(conns)
    setup = time.monotonic() - started

    pause(1.0)  # let the dialing settle
    threads_after = proc_status("Threads")
    py_after = threading.active_count()
    rss_after = proc_status("VmRSS")
    names: dict[str, int] = {}
    for thread in threading.enumerate():
        kind = re.sub(r"\d+", "N", thread.name.split("[", 1)[0])
        names[kind] = names.get(kind, 0) + 1

    samples: list[int] = []
    cpu0, wall0 = cpu_seconds(), time.monotonic()
    end = wall0 + args.idle
    while time.monotonic() < end:
        pause(min(0.25, max(0.0, end - time.monotonic())))
        samples.append(proc_status("Threads"))
    cpu = cpu_seconds() - cpu0
    wall = time.monotonic() - wall0
    connected = (
        sum(1 for c in keep if isinstance(c, cc.Connection) and c.connected)
        if args.mode != "raw"
        else args.count
    )
    samples.sort()
    print(
        json.dumps(
            {
                "mode": args.mode,
                "count": args.count,
                "setup_s": setup,
                "threads_before": threads_before,
                "threads_after": threads_after,
                "threads_idle_median": samples[len(samples) // 2],
                "threads_idle_max": samples[-1],
                "py_threads_before": py_before,
                "py_threads_after": py_after,
                "thread_kinds": names,
                "rss_before_kb": rss_before,
                "rss_after_kb": rss_after,
                "cpu_s": cpu,
                "idle_s": wall,
                "connected_at_end": connected,
            }
        ),
        flush=True,
    )
    # Leave without closing 100 connections one by one: the process ends here.
    import os

    os._exit(0)


def _churn(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="_children churn")
    parser.add_argument("--mode", choices=("ours", "raw"), required=True)
    parser.add_argument("--cycles", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0, help="cycles before cycle 0")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--channels", type=int, help="raw: channels to build in all")
    args = parser.parse_args(argv)
    _quiet()

    import contextlib
    import ctypes
    import gc
    import threading
    import time
    from typing import Any

    import grpc

    import chronicle_conn as cc
    from chronicle_conn._proto import clients_pb2, clients_pb2_grpc
    from tests.benchmarks._common import plaintext, proc_status, version, wait_until
    from tests.harness import KernelProcess

    try:
        libc: Any = ctypes.CDLL("libc.so.6")
    except OSError:
        libc = None

    def rss() -> tuple[int, int]:
        """VmRSS after a full collection, and again after ``malloc_trim(0)`` has handed
        the allocator's free pages back (what is still in use, fragmentation aside)."""
        gc.collect()
        before = proc_status("VmRSS")
        if libc is not None:
            libc.malloc_trim(0)
        return before, proc_status("VmRSS")

    # A fresh KernelProcess object per restart (same port): one object would keep every
    # child's bookkeeping, and that would grow this process's memory, not the client's.
    kernel = KernelProcess().start()
    port = kernel.port

    def crash_and_restart(noticed: Callable[[], None], while_down: Callable[[], None]) -> None:
        nonlocal kernel
        kernel.kill()
        noticed()
        kernel.close()
        while_down()
        kernel = KernelProcess(port=port).start(bind_retry=10)

    total = args.warmup + args.cycles
    samples: list[tuple[int, int, int]] = []
    started = time.monotonic()
    result: dict[str, object] = {"mode": args.mode, "cycles": args.cycles}
    try:
        if args.mode == "ours":
            conn = cc.Connection(plaintext(kernel.address), retry_attempts=None)
            conn.connect(timeout=30)
            version(conn.channel(), timeout=10)
            result["rss_start_kb"] = rss()[0]

            def lost() -> None:
                wait_until(lambda: not conn.connected, 10, "loss not noticed")

            for index in range(total + 1):
                cycle = index - args.warmup
                if cycle >= 0 and (cycle % args.every == 0 or cycle == args.cycles):
                    if cycle == 0:
                        stats = conn.stats()
                        warm_attempts = stats.attempts
                    samples.append((cycle, *rss()))
                if index == total:
                    break
                crash_and_restart(lost, lambda: None)
                conn.connect(timeout=30)
                version(conn.channel(), timeout=10)
            stats = conn.stats()
            result.update(
                attempts=stats.attempts - warm_attempts,
                attempts_total=stats.attempts,
                generation=stats.generation,
                py_threads=threading.active_count(),
            )
            conn.close()
        else:
            options = [("grpc.use_local_subchannel_pool", 1)]
            # One ready channel per cycle; the others (to build as many channels as the
            # connection did) are spread over the outages as failed attempts.
            extra = max(0, (args.channels or args.cycles) - args.cycles)
            built = 0
            current: list[tuple[grpc.Channel, threading.Thread]] = []

            def open_ready() -> None:
                nonlocal built
                channel = grpc.insecure_channel(kernel.address, options=options)
                built += 1
                version(channel, timeout=10, wait_for_ready=True)
                stub = clients_pb2_grpc.ConnectionServiceStub(channel)
                stream = stub.Connect(clients_pb2.ConnectRequest(ConnectionId=f"raw-{built}"))
                first = threading.Event()

                def read() -> None:
                    with contextlib.suppress(grpc.RpcError):
                        for _ in stream:
                            first.set()

                reader = threading.Thread(target=read, name="raw-stream", daemon=True)
                reader.start()
                if not first.wait(10):
                    raise TimeoutError("no keep-alive on the raw stream")
                current[:] = [(channel, reader)]

            def lost() -> None:
                channel, reader = current[0]
                reader.join(10)  # the stream ended: the raw client noticed
                channel.close()

            def failing(cycle: int) -> Callable[[], None]:
                def attempt() -> None:
                    nonlocal built
                    if cycle < 1:  # warming up: the same rate, rounded down
                        count = extra // args.cycles
                    else:
                        count = extra * cycle // args.cycles - extra * (cycle - 1) // args.cycles
                    for _ in range(count):
                        dead = grpc.insecure_channel(kernel.address, options=options)
                        built += 1
                        with contextlib.suppress(grpc.RpcError):
                            version(dead, timeout=5)
                        dead.close()

                return attempt

            open_ready()
            result["rss_start_kb"] = rss()[0]
            for index in range(total + 1):
                cycle = index - args.warmup
                if cycle >= 0 and (cycle % args.every == 0 or cycle == args.cycles):
                    if cycle == 0:
                        built_at_zero = built
                    samples.append((cycle, *rss()))
                if index == total:
                    break
                crash_and_restart(lost, failing(cycle + 1))
                open_ready()
            current[0][0].close()
            result.update(channels=built - built_at_zero, py_threads=threading.active_count())
    finally:
        kernel.close()
    result.update(samples=samples, elapsed_s=time.monotonic() - started)
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "kernel":
        return _kernel(rest)
    if command == "idle":
        return _idle(rest)
    if command == "churn":
        return _churn(rest)
    raise SystemExit(f"unknown child command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
