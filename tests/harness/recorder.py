"""A thread-safe event sink that tests wait on instead of sleeping."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["EventRecorder"]


class EventRecorder:
    """Collects events from any thread; tests wait for the ones they expect.

    Call the recorder with an event (``recorder(event)``) to append it: it can be passed
    wherever a callback is wanted (``conn.add_listener(recorder)``,
    ``channel.subscribe(recorder)``). Appending takes a lock briefly and never blocks on
    anything else, so it is safe to call from a library's internal threads.

    Every method is thread-safe. Waiting uses ``threading.Condition.wait_for``: no sleeps.

    Args:
        name: shown in failure messages.
    """

    def __init__(self, name: str = "events") -> None:
        self.name = name
        self._cond = threading.Condition()
        # guarded by _cond:
        self._events: list[Any] = []

    def __call__(self, event: Any) -> None:
        """Append ``event`` and wake every waiter. Non-blocking."""
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    @property
    def events(self) -> list[Any]:
        """A copy of the events so far, oldest first."""
        with self._cond:
            return list(self._events)

    def __len__(self) -> int:
        with self._cond:
            return len(self._events)

    def clear(self) -> None:
        with self._cond:
            self._events.clear()

    def wait_for(self, predicate: Callable[[Sequence[Any]], bool], timeout: float) -> bool:
        """Block until ``predicate(events)`` is true or ``timeout`` seconds pass.

        ``predicate`` gets the live list of events (read it, do not keep or mutate it) and
        runs under the recorder's lock every time an event arrives, so it must be quick.

        Returns:
            The final value of the predicate: ``False`` means the timeout expired.
        """
        with self._cond:
            return bool(self._cond.wait_for(lambda: predicate(self._events), timeout))

    def wait_for_count(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` events were recorded; ``False`` on timeout."""
        return self.wait_for(lambda events: len(events) >= count, timeout)

    def wait_for_event(
        self, predicate: Callable[[Any], bool], timeout: float, *, since: int = 0
    ) -> Any:
        """Return the first event (at index ``since`` or later) that matches ``predicate``.

        Blocks until one arrives or ``timeout`` seconds pass. Pass ``since=len(recorder)``
        to ignore everything recorded before a point in the test.

        Raises:
            AssertionError: no matching event within ``timeout``; the message lists the
                events that were seen.
        """
        found: list[Any] = []
        cursor = since  # events before it were already checked

        def match() -> bool:
            nonlocal cursor
            while cursor < len(self._events):
                event = self._events[cursor]
                cursor += 1
                if predicate(event):
                    found.append(event)
                    return True
            return False

        started = time.monotonic()
        with self._cond:
            if self._cond.wait_for(match, timeout):
                return found[0]
            seen = list(self._events)
        raise AssertionError(
            f"{self.name}: no matching event after {time.monotonic() - started:.2f}s "
            f"(timeout {timeout}s, since index {since}); {len(seen)} seen: {seen!r}"
        )

    def __repr__(self) -> str:
        with self._cond:
            return f"<EventRecorder {self.name!r} events={len(self._events)}>"
