"""Shared fixtures: a real dev kernel in a child process, fault proxies, event recorders.

Every kernel and proxy a test makes is killed/closed at teardown, pass or fail. When a
test fails, the stderr of each of its kernels is attached to the failure report.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# Imported now, not lazily by hypothesis' pytest plugin at the end of the run: CPython
# 3.11.7 can fail with "AST constructor recursion depth mismatch" (gh-106905) when
# pytest rewrites a module on the main thread while other threads are still running.
import hypothesis  # noqa: F401
import pytest
import structlog

import chronicle_conn as cc
from tests.harness import AppServerProcess, EventRecorder, FaultProxy, KernelProcess
from tests.helpers import ChannelLedger, StreamReader

_KERNELS = pytest.StashKey[list[KernelProcess]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.failed and report.when in ("setup", "call"):
        report.sections.append(("threads at failure", _thread_stacks()))
        for kernel in item.stash.get(_KERNELS, []):
            report_sections = getattr(kernel, "report_sections", None)
            if report_sections is not None:  # ServerProcess: app servers add their log
                report.sections.extend(report_sections())
                continue
            report.sections.append(
                (f"kernel {kernel.address} stderr", kernel.stderr_text() or "(empty)")
            )
            if kernel.stdout_noise:
                report.sections.append(
                    (f"kernel {kernel.address} unexpected stdout", "\n".join(kernel.stdout_noise))
                )
    return report


def _thread_stacks() -> str:
    frames = sys._current_frames()
    parts = []
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
        parts.append(f"--- {thread.name} (daemon={thread.daemon})\n{stack}")
    return "\n".join(parts)


def _track(request: pytest.FixtureRequest, kernel: KernelProcess) -> None:
    request.node.stash.setdefault(_KERNELS, []).append(kernel)


def _close_all(closers: Sequence[Callable[[], None]]) -> None:
    """Run every closer even if some fail; re-raise the first failure."""
    first: BaseException | None = None
    for close in closers:
        try:
            close()
        except BaseException as exc:
            first = first or exc
    if first is not None:
        raise first


@pytest.fixture
def kernel(request: pytest.FixtureRequest) -> Iterator[KernelProcess]:
    """A started dev kernel on a free loopback port (keep-alive every 1 s), killed after."""
    proc = KernelProcess()
    _track(request, proc)
    try:
        proc.start()
        yield proc
    finally:
        proc.close()


@pytest.fixture
def kernel_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., KernelProcess]]:
    """``make(port=None, keepalive_interval=1.0, extra_args=(), *, start=True, timeout=15)``.

    Every kernel made is killed at teardown.
    """
    made: list[KernelProcess] = []

    def make(
        port: int | None = None,
        keepalive_interval: float | None = 1.0,
        extra_args: Sequence[str] = (),
        *,
        start: bool = True,
        timeout: float = 15.0,
        **kwargs: object,
    ) -> KernelProcess:
        proc = KernelProcess(port, keepalive_interval, extra_args, **kwargs)  # type: ignore[arg-type]
        made.append(proc)
        _track(request, proc)
        if start:
            proc.start(timeout)
        return proc

    yield make
    _close_all([proc.close for proc in made])


@pytest.fixture
def proxy_factory() -> Iterator[Callable[..., FaultProxy]]:
    """``make(upstream_host, upstream_port, listen_host="127.0.0.1", **kwargs)``: a started
    ``FaultProxy`` in pass-through. Every proxy made is closed at teardown."""
    made: list[FaultProxy] = []

    def make(
        upstream_host: str, upstream_port: int, listen_host: str = "127.0.0.1", **kwargs: object
    ) -> FaultProxy:
        proxy = FaultProxy(upstream_host, upstream_port, listen_host, **kwargs)  # type: ignore[arg-type]
        made.append(proxy)
        return proxy.start()

    yield make
    _close_all([proxy.close for proxy in made])


@pytest.fixture
def recorder() -> EventRecorder:
    """A fresh ``EventRecorder``."""
    return EventRecorder()


@pytest.fixture
def etcd(request: pytest.FixtureRequest) -> Iterator[object]:
    """A started single-member etcd (``tests.harness.etcd.EtcdProcess``: Debian's
    ``etcd-server``, a Go gRPC server nobody here wrote) on a free loopback port, killed
    after. Skipped when etcd is not installed, but failed when ``CI=true``. Keyword
    arguments for ``EtcdProcess`` come by indirect parametrization:
    ``@pytest.mark.parametrize("etcd", [{"log_level": "info"}], indirect=True)``."""
    from tests.harness.etcd import EtcdProcess, require_etcd

    proc = EtcdProcess(binary=require_etcd(), **getattr(request, "param", {}))
    _track(request, proc)  # type: ignore[arg-type]  # its stderr joins failure reports
    try:
        proc.start()
        yield proc
    finally:
        proc.close()


@pytest.fixture
def app_server_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., AppServerProcess]]:
    """``make(flavor="kernel", *, port=None, work_log=None, keepalive_interval=None,
    start=True, timeout=15, bind_retry=None, **kwargs)``: an ``AppServerProcess`` (the
    work service on a ``kernel``, ``grpc-health`` or ``plain`` server), started unless
    ``start=False``; ``bind_retry`` as for ``start()`` (a fixed port is not retried by
    default, so that a taken port fails at once).

    Each server gets its own execution log in a fresh temporary directory unless
    ``work_log`` is given (pass ``other.log.path`` to share one). Every server made, and
    every child it stopped gracefully, is killed at teardown; when the test fails, their
    stderr and execution logs are attached to the report.
    """
    made: list[AppServerProcess] = []

    def make(
        flavor: str = "kernel",
        *,
        port: int | None = None,
        work_log: str | None = None,
        keepalive_interval: float | None = None,
        start: bool = True,
        timeout: float = 15.0,
        bind_retry: float | None = None,
        **kwargs: object,
    ) -> AppServerProcess:
        if work_log is None:
            work_log = str(tmp_path_factory.mktemp("work") / "executions.log")
        proc = AppServerProcess(
            port,
            flavor=flavor,
            work_log=work_log,
            keepalive_interval=keepalive_interval,
            **kwargs,  # type: ignore[arg-type]
        )
        made.append(proc)
        _track(request, proc)  # type: ignore[arg-type]
        if start:
            proc.start(timeout, bind_retry=bind_retry)
        return proc

    yield make
    _close_all([proc.close for proc in made])


@pytest.fixture
def open_stream() -> Iterator[Callable[[Any], StreamReader]]:
    readers: list[StreamReader] = []

    def make(call) -> StreamReader:
        reader = StreamReader(call)
        readers.append(reader)
        return reader

    yield make
    for reader in readers:
        reader.close()


@pytest.fixture(autouse=True)
def _structlog_as_found() -> Iterator[None]:
    """Leave structlog unconfigured if a test configured it (``capture_logs()`` leaves
    it configured): the library's events go to standard logging until an application
    configures structlog, and later tests must see that default."""
    configured = structlog.is_configured()
    yield
    if not configured and structlog.is_configured():
        structlog.reset_defaults()


@pytest.fixture
def make_conn() -> Iterator[Callable[..., cc.Connection]]:
    """``make(*args, ledger=True, **kwargs)``: connections closed at teardown; they must
    leave no thread behind and (with the ledger) must have closed every channel they
    built. ``ledger=False`` keeps the library's own channel disposal (the ledger's
    ``disconnect_fun`` replaces it, and with it the UNAVAILABLE close of a channel the
    library gave up on)."""
    made: list[tuple[cc.Connection, ChannelLedger | None]] = []

    def make(*args: Any, ledger: bool = True, **kwargs: Any) -> cc.Connection:
        book = ChannelLedger() if ledger else None
        if book is not None:
            kwargs.setdefault("connect_fun", book.connect)
            kwargs.setdefault("disconnect_fun", book.disconnect)
        conn = cc.Connection(*args, **kwargs)
        made.append((conn, book))
        return conn

    yield make
    for conn, _ in made:
        conn.close()
    for conn, book in made:
        assert conn._threads() == [], f"threads left behind by {conn!r}: {conn._threads()}"
        if book is not None:
            assert book.open == {}, f"{conn!r} left {len(book.open)} of {book.built} open"
            assert book.errors == []
