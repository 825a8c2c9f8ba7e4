"""A Flask app with a module-level connection (``tests/apps/flask_app.py``) under real
pre-forking servers: gunicorn (gthread, with and without ``--preload``) and uWSGI (with
``lazy-apps``, with ``py-call-uwsgi-fork-hooks``, and with neither), against a dev kernel
in a child process.

Each start-up: wait until every worker's readiness probe says connected, send a burst of
concurrent requests (one connection each) that each make one real RPC, and require every
one to succeed, every worker to answer, the workers to stay the same processes, the log to
be free of crashes and respawns, the kernel to have served at least as many RPCs as there
were 200s and to hold one connection per process that loaded the app. With the app loaded
in the master, the master's connection must stay connected through the forks. In the first
start-up of each configuration the kernel is SIGKILLed and restarted on its port while
clients keep calling: every worker must serve again within :data:`RECOVERY_BOUND` seconds
of the restart; the last start-up stops the server gracefully (exit 0). Then: uWSGI
without fork hooks must warn (how many workers still serve is measured and printed), a
gevent worker must refuse to boot, and a clean stop must close every connection the
kernel sees.

``CHRONICLE_SERVER_STARTUPS`` (default 20) sets the number of start-ups per
configuration. Every server runs in a process group of its own, SIGKILLed at teardown;
a failing start-up attaches its server's log to the report.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.harness import KernelProcess
from tests.harness.wsgi import (
    Reply,
    WsgiServer,
    fan_out,
    get,
    gunicorn_argv,
    log_events,
    thread_count,
    uwsgi_argv,
)
from tests.helpers import plaintext

STARTUPS = int(os.environ.get("CHRONICLE_SERVER_STARTUPS", "20"))
WORKERS = 3
THREADS = 4
#: Requests per start-up, sent over CLIENTS concurrent clients, one connection each.
BURST = 150
CLIENTS = 12
#: At most this many more requests, when a worker has not answered any of the burst.
TOP_UP = 600
#: Every worker must serve again within this many seconds of the kernel's restart.
RECOVERY_BOUND = 2.0
#: How long a start-up of the unprotected uWSGI configuration is given to serve.
UNPROTECTED_WINDOW = 10.0
FLASK_APP = "tests.apps.flask_app:app"
#: What the dev kernel answers to GetVersionInfo.
KERNEL_VERSION = "0.0.0-dev"

#: Signs of a crashed, killed, timed-out or replaced worker (gunicorn's and uWSGI's
#: wording), of an exception, or of a fork the library did not quiesce in time.
TROUBLE = (
    "WORKER TIMEOUT",
    "SIGSEGV",
    "Segmentation",
    "was sent",
    "exited with code",
    "Worker failed to boot",
    "DAMN !",
    "Respawned uWSGI worker",
    "Traceback",
    "fork_not_quiesced",
)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    server: str  # "gunicorn" or "uwsgi"
    preload: bool = False
    lazy_apps: bool = False
    fork_hooks: bool = False
    worker_class: str = "gthread"
    #: GRPC_ENABLE_FORK_SUPPORT for the server (None: unset). The README recommends 1
    #: where the master connects before forking: unset, about 1 start-up in 20 to 80
    #: froze a worker in grpc's channel constructor (a master still dialing at the fork).
    fork_support: str | None = None

    @property
    def master_connects(self) -> bool:
        """The app (so the connection) is loaded in the master, then the workers fork."""
        return self.preload if self.server == "gunicorn" else not self.lazy_apps

    @property
    def boot_line(self) -> str:
        return "Booting worker" if self.server == "gunicorn" else "spawned uWSGI worker"

    def argv(self, port: int) -> list[str]:
        if self.server == "gunicorn":
            return gunicorn_argv(
                port,
                FLASK_APP,
                preload=self.preload,
                workers=WORKERS,
                threads=THREADS,
                worker_class=self.worker_class,
            )
        return uwsgi_argv(
            port,
            FLASK_APP,
            lazy_apps=self.lazy_apps,
            fork_hooks=self.fork_hooks,
            processes=WORKERS,
            threads=THREADS,
        )


GUNICORN_PRELOAD = Config("gunicorn-preload", "gunicorn", preload=True, fork_support="1")
GUNICORN = Config("gunicorn", "gunicorn")
UWSGI_LAZY = Config("uwsgi-lazy-apps", "uwsgi", lazy_apps=True)
UWSGI_HOOKS = Config("uwsgi-fork-hooks", "uwsgi", fork_hooks=True, fork_support="1")
UWSGI_UNPROTECTED = Config("uwsgi-unprotected", "uwsgi")
HEALTHY = [GUNICORN_PRELOAD, GUNICORN, UWSGI_LAZY, UWSGI_HOOKS]


# -- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., WsgiServer]]:
    """``make(config, kernel, *, liveness="auto", start=True)``: a server running the
    Flask app against ``kernel``. Every server made is SIGKILLed (its whole process
    group) at teardown, pass or fail."""
    made: list[WsgiServer] = []

    def make(
        config: Config, kernel: KernelProcess, *, liveness: str = "auto", start: bool = True
    ) -> WsgiServer:
        env = {
            "CHRONICLE_CONNECTION_STRING": plaintext(kernel.address),
            "CHRONICLE_TEST_LIVENESS": liveness,
        }
        if config.fork_support is not None:
            env["GRPC_ENABLE_FORK_SUPPORT"] = config.fork_support
        log = tmp_path / f"{config.name}-{len(made) + 1}.log"
        server = WsgiServer(config.name, config.argv, log, env=env)
        made.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            server.close()


@contextlib.contextmanager
def reported(request: pytest.FixtureRequest, server: WsgiServer) -> Iterator[None]:
    """Attach ``server``'s log to the test's report if the block fails."""
    try:
        yield
    except BaseException:
        request.node.add_report_section("call", f"{server.name} log", server.describe("failed"))
        raise


def _pause(seconds: float) -> None:
    threading.Event().wait(seconds)  # between polls of another process


def wait_ready(server: WsgiServer, pids: set[int], timeout: float = 10.0) -> float:
    """Poll ``/readyz`` until every worker in ``pids`` has answered 200; return how long
    it took (from the server's spawn)."""
    seen: collections.defaultdict[int | None, collections.Counter[int]]
    seen = collections.defaultdict(collections.Counter)  # pid -> status -> count
    deadline = time.monotonic() + timeout
    while not all(seen[pid][200] for pid in pids):
        if time.monotonic() >= deadline:
            missing = sorted(pid for pid in pids if not seen[pid][200])
            raise AssertionError(
                f"workers {missing} not ready after {timeout}s (threads: "
                f"{[thread_count(pid) for pid in missing]}); answers by pid and status: "
                f"{ {pid: dict(counts) for pid, counts in seen.items()} }"
            )
        assert server.returncode is None, server.describe("exited while starting")
        for reply in fan_out(server.host, server.port, ["/readyz"] * 24, timeout=2):
            seen[reply.pid][reply.status] += 1
        _pause(0.02)
    return time.monotonic() - server.started_at


def kernel_clients(kernel: KernelProcess) -> int:
    """How many ``Connect`` streams (library connections, in keep-alive liveness) the
    kernel has open."""
    return len(kernel.stats()["connection_ids"])


def wait_kernel_clients(kernel: KernelProcess, count: int, timeout: float) -> float:
    """Poll the kernel until it has ``count`` open ``Connect`` streams; return the wait."""
    started = time.monotonic()
    deadline = started + timeout
    while (seen := kernel_clients(kernel)) != count:
        assert time.monotonic() < deadline, (
            f"kernel has {seen} clients after {timeout}s, not {count}"
        )
        _pause(0.02)
    return time.monotonic() - started


def served_rpcs(kernel: KernelProcess) -> int:
    """The kernel's count of ``ConnectionKeepAlive`` calls served (``/work`` makes one)."""
    return int(kernel.stats()["keepalive_answers"])


def burst(server: WsgiServer, pids: set[int]) -> tuple[list[Reply], int]:
    """:data:`BURST` ``/work`` requests; then more (bounded) until every worker in
    ``pids`` has answered. Returns the replies and how many more were needed."""
    replies = fan_out(server.host, server.port, ["/work"] * BURST, clients=CLIENTS)
    extra = 0
    while not pids <= {r.pid for r in replies} and extra < TOP_UP:
        replies += fan_out(server.host, server.port, ["/work"] * 48, clients=CLIENTS)
        extra += 48
    return replies, extra


def check_replies(replies: Sequence[Reply], pids: set[int], what: str) -> None:
    bad = [(r.status, r.pid, r.body, r.error) for r in replies if r.status != 200]
    assert not bad, f"{what}: {len(bad)} of {len(replies)} not 200, e.g. {bad[:5]}"
    responders = collections.Counter(r.pid for r in replies)
    assert set(responders) <= pids, f"{what}: answers from unknown processes {responders}"
    assert pids <= set(responders), (
        f"{what}: workers {sorted(pids - set(responders))} never answered in "
        f"{len(replies)} requests (answers per worker: {dict(responders)})"
    )
    for reply in replies:
        assert reply.body["pid"] == reply.pid, reply


def check_log(server: WsgiServer, config: Config) -> None:
    text = server.log_text()
    found = [sign for sign in TROUBLE if sign in text]
    assert not found, server.describe(f"log has {found}")
    boots = text.count(config.boot_line)
    assert boots == WORKERS, server.describe(f"{boots} x {config.boot_line!r}, not {WORKERS}")


def check_connections(server: WsgiServer, pids: set[int], config: Config) -> None:
    """From the app's log: every worker connected and none lost its connection; with the
    app loaded in the master, the master's connection is connected and stayed so."""
    events = log_events(server.log_text())
    lost = [e for e in events if e["event"] in ("connection_lost", "liveness_stale")]
    assert not lost, f"connections lost while the kernel was up: {lost}"
    connected = {e["pid"] for e in events if e["event"] == "connected"}
    assert pids <= connected, f"workers {sorted(pids - connected)} never logged 'connected'"
    if config.master_connects:
        # (and stayed so: no connection_lost of any pid, above)
        assert server.pid in connected, "the master's connection never logged 'connected'"
    else:
        assert server.pid not in connected, "the master connected, though it has no app"


@dataclasses.dataclass
class Outage:
    """What the clients saw while the kernel was killed and restarted."""

    recovery: dict[int, float]  # worker pid -> seconds from restart to its first 200
    statuses: collections.Counter[int]
    down_for: float  # SIGKILL to restart() returning


def kill_and_restart(server: WsgiServer, kernel: KernelProcess, pids: set[int]) -> Outage:
    """SIGKILL the kernel while :data:`CLIENTS` clients keep calling ``/work``, restart
    it on the same port, and wait (bounded) until every worker has served a 200 again."""
    replies: list[Reply] = []
    lock = threading.Lock()
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            reply = get(server.host, server.port, "/work", timeout=8)
            with lock:
                replies.append(reply)

    clients = [threading.Thread(target=poll, name=f"poll-{i}", daemon=True) for i in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        killed_at = time.monotonic()
        kernel.kill()
        killed = time.monotonic()
        kernel.restart()
        up = time.monotonic()
        deadline = up + 10.0
        while True:
            with lock:
                after = [r for r in replies if r.started >= killed and r.status == 200]
            firsts: dict[int, float] = {}
            for reply in sorted(after, key=lambda r: r.ended):
                if reply.pid is not None:
                    firsts.setdefault(reply.pid, reply.ended - up)
            if pids <= set(firsts) or time.monotonic() >= deadline:
                break
            _pause(0.01)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=15)
    assert not any(client.is_alive() for client in clients), "a client is stuck"
    statuses = collections.Counter(r.status for r in replies)
    assert pids <= set(firsts), (
        f"workers {sorted(pids - set(firsts))} not serving 10 s after the restart; "
        f"statuses {dict(statuses)}"
    )
    odd = [(r.status, r.pid, r.body, r.error) for r in replies if r.status not in (200, 503)]
    assert not odd, f"during the outage, answers other than 200/503: {odd[:5]}"
    return Outage(firsts, statuses, up - killed_at)


@dataclasses.dataclass
class Startup:
    ready_after: float
    requests: int
    extra: int
    per_worker: dict[int, int]
    rpcs: int
    outage: Outage | None = None
    master_back: float | None = None
    stopped_in: float | None = None  # the graceful stop's duration (the last start-up)


def one_startup(
    request: pytest.FixtureRequest,
    servers: Callable[..., WsgiServer],
    kernel: KernelProcess,
    config: Config,
    *,
    outage: bool,
    graceful: bool,
) -> Startup:
    """One start-up of ``config``'s server (see the module docstring). With ``outage``,
    the kernel is killed and restarted in it; with ``graceful``, the server is stopped
    with SIGTERM (it must exit 0), else its process group is SIGKILLed (faster; the
    clean stop has its own test)."""
    clients = WORKERS + (1 if config.master_connects else 0)
    # The previous start-up's connections are gone before this one starts.
    wait_kernel_clients(kernel, 0, timeout=10)
    server = servers(config, kernel)
    with reported(request, server):
        pids = server.wait_for_workers(WORKERS)
        ready_after = wait_ready(server, pids)
        wait_kernel_clients(kernel, clients, timeout=10)
        before = served_rpcs(kernel)
        replies, extra = burst(server, pids)
        rpcs = served_rpcs(kernel) - before
        check_replies(replies, pids, f"{config.name} burst")
        assert rpcs >= len(replies), f"kernel served {rpcs} RPCs for {len(replies)} 200s"
        versions = fan_out(server.host, server.port, ["/version"] * CLIENTS)
        assert {(r.status, r.body["version"]) for r in versions} == {(200, KERNEL_VERSION)}
        assert server.worker_pids() == pids, "workers were replaced"
        assert kernel_clients(kernel) == clients
        check_connections(server, pids, config)
        result = Startup(
            ready_after,
            len(replies),
            extra,
            dict(collections.Counter(r.pid for r in replies)),
            rpcs,
        )
        if outage:
            result.outage = kill_and_restart(server, kernel, pids)
            worst = max(result.outage.recovery.values())
            assert worst <= RECOVERY_BOUND, (
                f"{config.name}: a worker served again only {worst:.3f}s after the "
                f"kernel's restart: {result.outage.recovery}"
            )
            after = fan_out(server.host, server.port, ["/work"] * BURST, clients=CLIENTS)
            check_replies(after, pids, f"{config.name} after the restart")
            # The master (no demand: its own backoff) and every worker reconnect.
            result.master_back = wait_kernel_clients(kernel, clients, timeout=15)
            assert server.worker_pids() == pids, "workers were replaced"
        check_log(server, config)
        if graceful:
            stopping = time.monotonic()
            assert server.stop(timeout=20) == 0, server.describe("stopped with an error")
            result.stopped_in = time.monotonic() - stopping
            check_log(server, config)
        else:
            server.kill()
    return result


def _summary(config: Config, startups: list[Startup], took: float) -> str:
    ready = [s.ready_after for s in startups]
    lines = [
        f"{config.name}: {len(startups)} start-ups in {took:.1f}s; ready after "
        f"{statistics.median(ready):.2f}s median, {max(ready):.2f}s max; "
        f"{sum(s.requests for s in startups)} requests, all 200 "
        f"(top-ups: {sum(1 for s in startups if s.extra)}); graceful stop in "
        + ", ".join(f"{s.stopped_in:.2f}s" for s in startups if s.stopped_in is not None)
    ]
    for index, startup in enumerate(startups):
        if startup.outage is not None:
            recovery = startup.outage.recovery
            lines.append(
                f"  start-up {index}: kernel down {startup.outage.down_for:.2f}s; "
                "every worker serving again "
                + ", ".join(f"{pid}: {seconds:.3f}s" for pid, seconds in sorted(recovery.items()))
                + f" after the restart (worst {max(recovery.values()):.3f}s); statuses "
                f"{dict(startup.outage.statuses)}; kernel saw every connection again after "
                f"{startup.master_back:.2f}s"
            )
    return "\n".join(lines)


# -- the tests ---------------------------------------------------------------------------


@pytest.mark.timeout(60 + 10 * STARTUPS)
@pytest.mark.parametrize("config", HEALTHY, ids=[c.name for c in HEALTHY])
def test_every_worker_serves(
    request: pytest.FixtureRequest,
    kernel: KernelProcess,
    servers: Callable[..., WsgiServer],
    config: Config,
) -> None:
    """:data:`STARTUPS` start-ups; the kernel is killed and restarted in the first, the
    server is stopped gracefully in the last."""
    began = time.monotonic()
    startups = [
        one_startup(
            request, servers, kernel, config, outage=index == 0, graceful=index == STARTUPS - 1
        )
        for index in range(STARTUPS)
    ]
    print(_summary(config, startups, time.monotonic() - began))


@pytest.mark.timeout(60 + 10 * STARTUPS)
def test_uwsgi_without_fork_hooks_warns(
    request: pytest.FixtureRequest,
    kernel: KernelProcess,
    servers: Callable[..., WsgiServer],
) -> None:
    """No ``lazy-apps``, no ``py-call-uwsgi-fork-hooks``: the master's connection logs
    ``fork_unprotected`` and does not dial (a thread in the master at uWSGI's bare
    fork() can hang a worker before it runs any Python); every worker dials from
    ``uwsgi.post_fork_hook`` and serves."""
    outcomes: collections.Counter[int] = collections.Counter()  # workers serving -> start-ups
    statuses: collections.Counter[int] = collections.Counter()
    stuck_single_thread = 0
    silent = 0
    began = time.monotonic()
    for _ in range(STARTUPS):
        server = servers(UWSGI_UNPROTECTED, kernel)
        with reported(request, server):
            pids = server.wait_for_workers(WORKERS)
            served: set[int] = set()
            deadline = time.monotonic() + UNPROTECTED_WINDOW
            while not pids <= served and time.monotonic() < deadline:
                replies = fan_out(server.host, server.port, ["/work"] * 24, timeout=1.0)
                statuses.update(r.status for r in replies)
                served |= {r.pid for r in replies if r.status == 200 and r.pid is not None}
            outcomes[len(served & pids)] += 1
            # A worker that never answered and runs one thread never got to start its
            # request threads (gdb shows such workers waiting for the GIL at boot).
            stuck_single_thread += sum(1 for pid in pids - served if thread_count(pid) == 1)
            warnings = [
                e
                for e in log_events(server.log_text())
                if e["event"] == "fork_unprotected" and e["pid"] == server.pid
            ]
            assert len(warnings) == 1, server.describe("no single fork_unprotected warning")
            assert warnings[0]["level"] == "warning"
            assert "py-call-uwsgi-fork-hooks" in warnings[0]["reason"]
            silent += sum(
                1 for pid in pids if not any(e["pid"] == pid for e in log_events(server.log_text()))
            )
            server.kill()
            with contextlib.suppress(AssertionError):
                wait_kernel_clients(kernel, 0, timeout=5)
    print(
        f"{UWSGI_UNPROTECTED.name}: {STARTUPS} start-ups in {time.monotonic() - began:.1f}s; "
        f"start-ups by number of workers (of {WORKERS}) that served within "
        f"{UNPROTECTED_WINDOW}s: {dict(sorted(outcomes.items()))}; request statuses "
        f"{dict(statuses)} (0: no answer within 1 s); silent workers (nothing logged, so "
        f"no reset after the fork): {silent}; non-serving workers with one thread: "
        f"{stuck_single_thread}"
    )
    assert outcomes == {WORKERS: STARTUPS}, dict(outcomes)


def test_gevent_worker_refuses_to_boot(
    request: pytest.FixtureRequest,
    kernel: KernelProcess,
    servers: Callable[..., WsgiServer],
) -> None:
    config = Config("gunicorn-gevent", "gunicorn", worker_class="gevent")
    server = servers(config, kernel, start=False)
    server.spawn()
    with reported(request, server):
        code = server.wait(timeout=45)
        text = server.log_text()
        assert code != 0, server.describe("gunicorn exited 0 with workers that cannot boot")
        assert "gevent has monkey-patched threading" in text
        assert "ConfigurationError" in text
        assert kernel_clients(kernel) == 0


@pytest.mark.parametrize("config", HEALTHY, ids=[c.name for c in HEALTHY])
def test_clean_stop_closes_every_connection(
    request: pytest.FixtureRequest,
    kernel: KernelProcess,
    servers: Callable[..., WsgiServer],
    config: Config,
) -> None:
    """SIGTERM to the master: the kernel sees every connection go, and every worker's
    connection was closed by the library (not dropped)."""
    clients = WORKERS + (1 if config.master_connects else 0)
    server = servers(config, kernel, liveness="keepalive")
    with reported(request, server):
        pids = server.wait_for_workers(WORKERS)
        wait_ready(server, pids)
        wait_kernel_clients(kernel, clients, timeout=10)
        check_replies(fan_out(server.host, server.port, ["/work"] * 48), pids, "before the stop")
        stopping = time.monotonic()
        server.send_signal(signal.SIGTERM)
        gone = wait_kernel_clients(kernel, 0, timeout=15)
        assert server.wait(timeout=20) == 0
        exited = time.monotonic() - stopping
        events = log_events(server.log_text())
        closed = {e["pid"] for e in events if e["event"] == "closed"}
        assert pids <= closed, f"workers {sorted(pids - closed)} did not close their connection"
        print(
            f"{config.name}: kernel saw 0 connections {gone:.2f}s after SIGTERM; master "
            f"exited after {exited:.2f}s; closed by the library in: "
            f"{sorted(closed)} (master {server.pid})"
        )
