"""Test harness: a real kernel and real application servers in child processes, a
fault-injecting TCP proxy, and an event recorder that tests wait on instead of sleeping."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .kernel import (
    KernelCommandError,
    KernelError,
    KernelProcess,
    KernelStartError,
    ServerCommandError,
    ServerProcess,
    ServerProcessError,
    ServerStartError,
    StoppingServer,
)
from .ports import LOOPBACK_HOSTS, free_port, wait_listening
from .proxy import FaultProxy, ProxyMode, ProxyStats
from .recorder import EventRecorder

if TYPE_CHECKING:
    from .appserver import (
        AppServerProcess,
        ExecutionLog,
        LogEntry,
        LogSnapshot,
        WorkRequest,
        WorkStub,
        work_request,
        work_response,
    )

__all__ = [
    "LOOPBACK_HOSTS",
    "AppServerProcess",
    "EventRecorder",
    "ExecutionLog",
    "FaultProxy",
    "KernelCommandError",
    "KernelError",
    "KernelProcess",
    "KernelStartError",
    "LogEntry",
    "LogSnapshot",
    "ProxyMode",
    "ProxyStats",
    "ServerCommandError",
    "ServerProcess",
    "ServerProcessError",
    "ServerStartError",
    "StoppingServer",
    "WorkRequest",
    "WorkStub",
    "free_port",
    "wait_listening",
    "work_request",
    "work_response",
]

# Imported on first use, not here: the app server's child runs
# ``python -m tests.harness.appserver``, which imports this package first, and a package
# that had already imported the module it is asked to run makes runpy warn (and run the
# module's code twice).
_FROM_APPSERVER = frozenset(
    {
        "AppServerProcess",
        "ExecutionLog",
        "LogEntry",
        "LogSnapshot",
        "WorkRequest",
        "WorkStub",
        "work_request",
        "work_response",
    }
)


def __getattr__(name: str) -> Any:
    if name in _FROM_APPSERVER:
        from . import appserver

        return getattr(appserver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
