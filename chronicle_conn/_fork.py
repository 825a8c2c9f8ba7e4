"""Fork safety: quiet before ``fork()``, resume in the parent, start over in the child.

gRPC's own fork handlers only run when no thread is inside a gRPC call, and gRPC Python
supports a fork with open channels but no call in progress (grpc/grpc#15851, #16025).
A connection always has calls in progress of its own: the liveness stream, periodic
probes, keep-alive answers, an attempt's readiness probe. So, before every fork (an
``os.register_at_fork`` ``before`` hook):

1. every supervisor is asked to hold (:meth:`Participant.fork_prepare`): it stops its
   liveness monitors, cancels its probes and attempts, and parks once none of its calls
   is left, saying so under its Condition;
2. the hook waits for all of them together, bounded by :data:`QUIESCE_TIMEOUT` (a
   supervisor stuck in a listener must not hold the fork for long).

After the fork the parent's supervisors resume (the monitor is restarted on the same
channel: no state change, no reconnect); the child's connections start over on
channels of their own (``Connection._after_fork``).

uWSGI forks its workers with the C ``fork()``, which runs no Python fork hook unless the
application asks (``py-call-uwsgi-fork-hooks``), and a worker forked while any thread of
the master runs can hang before it runs any Python. Inside uWSGI, :func:`install` chains
the child's reset onto ``uwsgi.post_fork_hook`` (which uWSGI calls in every new worker);
a connection made in a master that forks without those hooks and without ``lazy-apps``
logs a warning and does not dial there (``Connection``): each worker's copy dials from
that hook.

Our hooks are registered after grpc's own (``GRPC_ENABLE_FORK_SUPPORT=1`` registers
those lazily, with the first channel: :func:`install` makes grpc register first), so that
ours run first before the fork and last after it: our calls are gone before grpc waits
for its threads, and the child's new supervisor starts after grpc has reset itself.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = [
    "GRPC_THREADS_TIMEOUT",
    "QUIESCE_TIMEOUT",
    "Participant",
    "fork_support_problem",
    "install",
    "on_child",
    "register",
    "uwsgi_problem",
]

#: The longest a fork waits for the library's own gRPC calls to end (all connections
#: together), seconds. Normally a few milliseconds.
QUIESCE_TIMEOUT = 2.0

#: Then, the longest it waits for grpc's polling threads to leave (they end a moment
#: after the last call on their channel; one still running when grpc's own fork
#: handler runs was seen to deadlock the fork, 1 in about 80 gunicorn --preload
#: start-ups). A thread that serves the application's own calls in flight stays.
GRPC_THREADS_TIMEOUT = 0.25


class Participant(Protocol):
    """What the hooks need from a supervisor."""

    def fork_prepare(self) -> None:
        """Ask the supervisor to hold (non-blocking)."""

    def fork_wait(self, deadline: float) -> bool:
        """Wait until it holds with no call of its own in progress, or ``deadline``
        (``time.monotonic()``). True if it holds (or has nothing to hold)."""

    def fork_resume(self) -> None:
        """The parent after the fork: carry on."""

    def fork_late(self, timeout: float) -> None:
        """The parent after a fork that did not wait for it (say so)."""

    def fork_child(self) -> None:
        """The child: forget the parent's threads, park its channels (idempotent)."""


#: Guards the participants (a connection may be built on one thread while another
#: forks) and the installation.
_lock = threading.Lock()
_participants: weakref.WeakSet[Participant] = weakref.WeakSet()
_children: list[Callable[[], None]] = []
_installed = False
#: Per fork in progress (forks from several threads may overlap): the participants its
#: ``before`` hook prepared, which its ``after`` hooks resume; and those that did not
#: quiesce in time (for the parent's log).
_held = threading.local()


def register(participant: Participant) -> str | None:
    """Quiesce ``participant`` at every fork (held weakly). Returns a warning for its
    log when a forked child cannot work (:func:`fork_support_problem`) or forks will not
    be quiesced (:func:`uwsgi_problem`)."""
    install()
    with _lock:
        _participants.add(participant)
    return fork_support_problem() or uwsgi_problem()


def fork_support_problem() -> str | None:
    """``GRPC_ENABLE_FORK_SUPPORT`` set to a false value turns gRPC core's fork handlers
    off: then gRPC hangs in every forked child (measured: every child, raw channels too)."""
    value = os.environ.get("GRPC_ENABLE_FORK_SUPPORT")
    if value is None or not value.strip() or _on(value):
        return None
    return (
        f"GRPC_ENABLE_FORK_SUPPORT={value} turns gRPC's fork handlers off, and gRPC then "
        "hangs in forked children (pre-forking servers' workers): unset it, or set it to 1"
    )


def uwsgi_problem() -> str | None:
    """Inside a uWSGI master that will fork workers without running Python's fork
    hooks (no ``py-call-uwsgi-fork-hooks``, no ``lazy-apps``): what to change."""
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None or getattr(uwsgi, "worker_id", lambda: 0)() != 0:
        return None  # not uWSGI, or already in a worker (nothing forks it any more)
    options = getattr(uwsgi, "opt", {})
    if any(_on(options.get(name)) for name in ("py-call-uwsgi-fork-hooks", "lazy-apps", "lazy")):
        return None
    return (
        "uWSGI forks its workers without Python's fork hooks, and a worker forked while any "
        "thread runs in the master can hang: this connection dials in each worker, not in "
        "the master; set py-call-uwsgi-fork-hooks = true (or lazy-apps = true)"
    )


def _on(value: object) -> bool:
    if isinstance(value, list):
        value = value[-1] if value else None
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def on_child(callback: Callable[[], None]) -> None:
    """Call ``callback()`` in the child after every fork (once the hooks are installed,
    by the first :func:`register`), after grpc's own reset and the participants'."""
    _children.append(callback)


def install() -> None:
    """Register the hooks once, after grpc's own (see the module docstring)."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed or not hasattr(os, "register_at_fork"):
            return
        _grpc_registers_first()
        os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_child)
        _chain_uwsgi_post_fork()
        _installed = True


def _chain_uwsgi_post_fork() -> None:
    """Inside uWSGI: reset in every new worker, also when uWSGI runs no Python fork hook
    (the reset is idempotent: with the hooks it has already run)."""
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None:
        return
    previous = getattr(uwsgi, "post_fork_hook", None)

    def post_fork() -> None:
        _child()
        if previous is not None:
            previous()

    setattr(uwsgi, "post_fork_hook", post_fork)  # noqa: B010 - a module of the host


def _grpc_registers_first() -> None:
    """With ``GRPC_ENABLE_FORK_SUPPORT`` on, grpc registers its fork hooks with its first
    channel; make it do so now, before ours (``before`` hooks run in reverse order)."""
    try:
        from grpc._cython import cygrpc  # type: ignore[attr-defined]  # noqa: PLC0415

        state = cygrpc._fork_state
        if cygrpc.is_fork_support_enabled() and not state.fork_handler_registered:
            cygrpc.fork_handlers_and_grpc_init()
    except Exception:  # an unexpected grpc version: the order is then grpc's business
        return


def _before() -> None:
    with _lock:
        participants = list(_participants)
    prepared: list[Participant] = []
    late: list[Participant] = []
    _held.prepared, _held.late = prepared, late  # resumed by this thread's after hooks
    if not participants:
        return
    deadline = time.monotonic() + QUIESCE_TIMEOUT
    for each in participants:
        each.fork_prepare()
        prepared.append(each)
    for each in participants:
        if not each.fork_wait(deadline):
            late.append(each)
    _await_grpc_threads(min(deadline, time.monotonic() + GRPC_THREADS_TIMEOUT))


def _await_grpc_threads(deadline: float) -> None:
    """Join (bounded) grpc's Python threads: the per-channel polling threads, which end
    once no call is left on their channel."""
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is current or not _is_grpc_thread(thread):
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        thread.join(remaining)


def _is_grpc_thread(thread: threading.Thread) -> bool:
    target = getattr(thread, "_target", None)
    return getattr(target, "__module__", None) == "grpc._cython.cygrpc"


def _after_in_parent() -> None:
    prepared: list[Participant] = getattr(_held, "prepared", [])
    late: list[Participant] = getattr(_held, "late", [])
    _held.prepared, _held.late = [], []
    for each in prepared:
        each.fork_resume()
    for each in late:
        each.fork_late(QUIESCE_TIMEOUT)


_child_pid = os.getpid()


def _child() -> None:
    global _lock, _child_pid
    if _child_pid == os.getpid():
        return  # already reset in this process (uWSGI: the hook and post_fork_hook)
    _child_pid = os.getpid()
    _lock = threading.Lock()  # another thread of the parent may have held it
    _held.prepared, _held.late = [], []
    for each in list(_participants):  # only this thread exists now
        each.fork_child()
    for callback in list(_children):
        callback()
