"""One process-wide timer thread for the deadlines of calls waiting for a connection.

A ``wait_for_ready`` ``future()`` or streaming call made while its connection is down
returns at once (as on a ``grpc.Channel``) and waits for the connection in the
background; if its deadline passes first it must end with ``DEADLINE_EXCEEDED`` then,
done-callbacks included, even if nobody is blocked on it. One shared thread serves every
such deadline of the process. It starts on the first deadline and ends when it has had
none for a while, so an idle process has no timer thread.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable

from ._log import module_log, swallow

__all__ = ["Timer", "timer"]

_IDLE_EXIT = 5.0  # seconds without a deadline before the thread ends


class Handle:
    """A scheduled callback; :meth:`cancel` it when it is no longer needed."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run it (if it has not run yet). Lock-free: plain attribute writes; the
        callback (and what it refers to) is let go at once."""
        self.cancelled = True
        self.callback = _nothing


def _nothing() -> None:
    return None


class Timer:
    """Runs callbacks at ``time.monotonic()`` deadlines on one daemon thread.

    Thread-safe. Callbacks run outside the timer's lock and must not block; their
    exceptions are logged.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        # Guarded by _cond:
        self._heap: list[tuple[float, int, Handle]] = []
        self._thread: threading.Thread | None = None
        self._order = itertools.count()

    def schedule(self, when: float, callback: Callable[[], None]) -> Handle:
        """Run ``callback()`` at ``when`` (a ``time.monotonic()`` reading)."""
        handle = Handle(when, callback)
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._order), handle))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="chronicle_conn-deadlines", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is handle:
                self._cond.notify()
        return handle

    def _run(self) -> None:
        log = module_log()
        while True:
            with self._cond:
                due = self._take_due()
                if not due:
                    if self._heap:
                        self._cond.wait(self._heap[0][0] - time.monotonic())
                        continue
                    if not self._cond.wait(_IDLE_EXIT) and not self._heap:
                        self._thread = None
                        return
                    continue
            for handle in due:
                try:
                    handle.callback()
                except BaseException as exc:
                    swallow(exc)
                    log.exception("deadline_callback_failed")

    def _take_due(self) -> list[Handle]:
        now = time.monotonic()
        due = []
        while self._heap and (self._heap[0][0] <= now or self._heap[0][2].cancelled):
            handle = heapq.heappop(self._heap)[2]
            if not handle.cancelled:
                due.append(handle)
        return due


#: The process's timer.
timer = Timer()

if hasattr(os, "register_at_fork"):
    # The child has no timer thread, and the lock may have been held by one.
    os.register_at_fork(after_in_child=timer._reset)
