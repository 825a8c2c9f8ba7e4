"""When to attempt next: the exponential schedule (from ``backoff``) and the demand cadence.

``backoff`` imports ``asyncio`` (most of its import cost), so it is not imported with the
package: :func:`load` imports it on the thread that constructs a connection, before that
connection's supervisor thread exists. A module imported lazily by a background thread
while another thread forks is left half-initialised in the child.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from types import ModuleType

from .config import ReconnectPolicy

__all__ = ["DEMAND_DELAY", "DelayFactory", "DelaySchedule", "exponential", "load"]

#: The least and most time between the starts of two attempts while a caller wants the
#: connection now: at most 10 attempts a second per connection, jittered so that many
#: clients do not hit a returning server in lockstep. A refused connect costs the server
#: microseconds; a cold connect here takes ~2.4 ms.
DEMAND_DELAY = (0.1, 0.125)

DelayFactory = Callable[[ReconnectPolicy], Iterator[float]]

_backoff: ModuleType | None = None


def load() -> ModuleType:
    """Import ``backoff`` (once). Call it on a constructing thread, not in a background one."""
    global _backoff
    if _backoff is None:
        import backoff  # noqa: PLC0415 - deliberately deferred, see the module docstring

        _backoff = backoff
    return _backoff


def exponential(policy: ReconnectPolicy) -> Iterator[float]:
    """The default delay factory: the policy's own ``backoff`` schedule."""
    return policy.delays()


class DelaySchedule:
    """When to attempt next within one retry budget, and which attempts it counts.

    The budget (``retry_attempts``) counts the attempts made on the exponential schedule.
    While there is demand (a caller wants the connection now: ``connect()``, a
    ``wait_for_ready`` call, recent fail-fast calls), the next attempt also comes at most
    :data:`DEMAND_DELAY` after the start of the previous one; those early attempts do not
    advance the schedule nor spend the budget, so demand never makes the connection give
    up sooner. Pure: the caller passes the clock readings, so tests drive it without
    sleeping. Not thread-safe (the supervisor's).
    """

    def __init__(
        self,
        policy: ReconnectPolicy,
        delays: Iterator[float],
        rng: random.Random | None = None,
    ) -> None:
        self._policy = policy
        self._delays = delays
        self._rng = rng or random.Random()
        self.counted = 0  # attempts that spent the budget
        self.delay: float | None = None  # the current exponential delay
        self._due: float | None = None  # when the next counted attempt is due (None: now)
        self._started_at = 0.0
        self._failed_at = 0.0
        self._cadence = DEMAND_DELAY[0]
        self._counting = False

    def start(self, now: float) -> bool:
        """An attempt begins at ``now``; return whether it counts toward the budget."""
        self._counting = self._due is None or now >= self._due
        if self._counting:
            self.counted += 1
        self._started_at = now
        return self._counting

    def failed(self, now: float) -> None:
        """The attempt that began last failed at ``now``."""
        if self._counting:
            self.delay = next(self._delays)
            self._due = now + self.delay
        self._failed_at = now
        self._cadence = self._rng.uniform(*DEMAND_DELAY)

    def interrupted(self) -> None:
        """The attempt that began last was cut short by a ``fork()``: it neither counts
        nor delays the next one."""
        if self._counting:
            self.counted -= 1
            self._counting = False

    @property
    def exhausted(self) -> bool:
        """Whether the last failure spent the last counted attempt."""
        limit = self._policy.max_attempts
        return self._counting and limit is not None and self.counted >= limit

    def wake_at(self, demand: bool) -> float:
        """When the next attempt should start, with or without demand now."""
        due = self._due if self._due is not None else self._failed_at
        if demand:
            return min(due, max(self._failed_at, self._started_at + self._cadence))
        return due
