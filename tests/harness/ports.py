"""Loopback ports for tests: pick a free one, wait until something listens on one.

Only loopback addresses are ever used (``127.0.0.1`` or ``::1``): tests must not open
anything on a routable interface.
"""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["LOOPBACK_HOSTS", "check_loopback", "free_port", "wait_listening"]

LOOPBACK_HOSTS = ("127.0.0.1", "::1")


def check_loopback(host: str) -> str:
    """Return ``host`` if it is a loopback address the harness may use.

    Raises:
        ValueError: for any other address (including ``localhost``, whose resolution
            is not ours to trust).
    """
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"test harness only uses {LOOPBACK_HOSTS}, not {host!r}")
    return host


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in check_loopback(host) else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    Binds to port 0, reads the port the OS chose and closes the socket. Another process
    may take the port before the caller binds it; callers that spawn servers retry.
    """
    with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def wait_listening(host: str, port: int, timeout: float = 5.0) -> None:
    """Block until a TCP connect to ``host:port`` succeeds, for at most ``timeout`` s.

    Polls with connect attempts (there is no event to wait on for another process's
    listen), at most every 20 ms.

    Raises:
        TimeoutError: nothing accepted a connection within ``timeout``.
    """
    family = family_of(host)
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: an interruptible, bounded pause between polls
    last_error: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"nothing listening on {host}:{port} after {timeout:.1f}s (last: {last_error!r})"
            )
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(min(remaining, 1.0))
            try:
                sock.connect((host, port))
            except OSError as exc:
                last_error = exc
            else:
                return
        pause.wait(min(0.02, max(0.0, deadline - time.monotonic())))
