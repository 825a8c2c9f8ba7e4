"""Listener delivery: state changes queued under the connection's lock, delivered in
order, one deliverer at a time, outside the lock."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from ._log import QuietLog, swallow
from .states import StateChange

__all__ = ["EventQueue", "Listener"]

Listener = Callable[[StateChange], None]


class EventQueue:
    """State changes waiting for delivery, and the listeners they go to.

    Guarded by the connection's Condition (``cond``): every method but :meth:`deliver`
    is called with it held. Each event gets a sequence number and each listener the
    number of the first event it is owed, so a listener added while older events still
    wait for delivery does not get them: its view starts from the state at the time it
    was added.
    """

    def __init__(self, cond: threading.Condition, log: QuietLog) -> None:
        self._cond = cond
        self._log = log
        self._events: collections.deque[tuple[int, StateChange]] = collections.deque()
        self._delivering = False
        self._sequence = 0  # of the next event
        #: (listener, the sequence number of the first event it is owed)
        self._listeners: list[tuple[Listener, int]] = []
        #: The library's own listeners (metrics): every event, not in ``listeners()``.
        self._observers: list[Listener] = []

    def push(self, change: StateChange) -> None:
        """Queue ``change``. Call with the lock held."""
        self._events.append((self._sequence, change))
        self._sequence += 1

    def add(self, listener: Listener) -> None:
        """Register ``listener`` for the changes queued from now on (lock held)."""
        self._listeners.append((listener, self._sequence))

    def remove(self, listener: Listener) -> None:
        """Unregister ``listener`` (lock held). ``==``, not ``is``: a bound method is a new
        object each time it is looked up."""
        self._listeners = [(f, n) for f, n in self._listeners if f != listener]

    def observe(self, observer: Listener) -> None:
        """Register one of the library's own listeners (lock held)."""
        self._observers.append(observer)

    def listeners(self) -> list[Listener]:
        return [listener for listener, _ in self._listeners]

    def deliver(self) -> None:
        """Deliver the queued changes to the listeners, in order, outside the lock.

        Whoever queues an event calls this; if somebody is already delivering (the
        supervisor inside a listener that calls ``close()``, say), that caller's loop
        delivers the new events too. A listener's exception, whatever it is, is logged and
        goes no further (see ``_log.swallow``).
        """
        cond = self._cond
        while True:
            with cond:
                if self._delivering or not self._events:
                    return
                self._delivering = True
                events = list(self._events)
                self._events.clear()
                listeners = list(self._listeners)
                observers = list(self._observers)
            try:
                for sequence, change in events:
                    # DEBUG: the events that matter (connected, connection_lost,
                    # reconnected, retries_exhausted) are logged by the supervisor, once.
                    self._log.debug(
                        "state_changed",
                        old=change.old.value,
                        new=change.new.value,
                        attempt=change.attempt,
                        delay=change.delay,
                        error=change.error,
                        generation=change.generation,
                        outage=change.outage,
                    )
                    for observer in observers:
                        try:
                            observer(change)
                        except BaseException as exc:
                            swallow(exc)
                            self._log.exception("observer_failed", observer=repr(observer))
                    for listener, first in listeners:
                        if sequence < first:
                            continue
                        try:
                            listener(change)
                        except BaseException as exc:
                            swallow(exc)
                            self._log.exception("listener_failed", listener=repr(listener))
            finally:
                with cond:
                    self._delivering = False

    def reset_after_fork(self, cond: threading.Condition) -> None:
        """In a forked child: the new Condition, nobody delivering."""
        self._cond = cond
        self._delivering = False
