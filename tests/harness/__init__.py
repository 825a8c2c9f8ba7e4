"""Test harness: a real kernel in a child process, a fault-injecting TCP proxy, and an
event recorder that tests wait on instead of sleeping."""

from __future__ import annotations

from .kernel import KernelCommandError, KernelError, KernelProcess, KernelStartError
from .ports import LOOPBACK_HOSTS, free_port, wait_listening
from .proxy import FaultProxy, ProxyMode, ProxyStats
from .recorder import EventRecorder

__all__ = [
    "LOOPBACK_HOSTS",
    "EventRecorder",
    "FaultProxy",
    "KernelCommandError",
    "KernelError",
    "KernelProcess",
    "KernelStartError",
    "ProxyMode",
    "ProxyStats",
    "free_port",
    "wait_listening",
]
