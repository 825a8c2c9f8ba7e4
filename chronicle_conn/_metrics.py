"""OpenTelemetry metrics (the ``otel`` extra: ``opentelemetry-api`` only).

When ``opentelemetry-api`` is installed, every connection reports through the
application's meter provider (the global one, or ``Connection(meter_provider=...)``),
so whatever exporter the application set up (Prometheus, OTLP, ...) picks them up:

- ``chronicle_conn.connection.state``: an observable gauge, 1 for the state the
  connection is in and 0 for the others (attribute ``chronicle_conn.state``);
- observable counters read from ``stats()``: ``chronicle_conn.connection.attempts``,
  ``.failed_attempts``, ``.connects``, ``.disconnects``, ``.keepalives``,
  ``.health_updates``, ``.probes_answered``;
- ``chronicle_conn.connection.outage.duration``: a histogram (seconds) of how long the
  connection was down, recorded at each recovery.

Every point carries ``chronicle_conn.connection`` (the name, or the label logs use) and
``chronicle_conn.target`` (the redacted target). Counters and the gauge are read when
the exporter collects: nothing is added to a call's path. Without the API installed,
nothing is imported and nothing recorded. With the API but no SDK (no provider set),
OpenTelemetry's own no-op provider makes it cost nothing.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .states import ConnectionState, StateChange

if TYPE_CHECKING:
    from ._core import Core

__all__ = ["OUTAGE_BUCKETS", "attach"]

#: Histogram buckets for outage durations, seconds: a restart takes a second or two, a
#: deploy tens of seconds, an incident minutes.
OUTAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

#: stats() field -> (counter name suffix, unit, description)
_COUNTERS = {
    "attempts": ("attempts", "{attempt}", "Connection attempts made"),
    "failed_attempts": ("failed_attempts", "{attempt}", "Connection attempts that failed"),
    "connects": ("connects", "{connect}", "Times a channel became ready"),
    "disconnects": ("disconnects", "{disconnect}", "Times a ready connection was lost"),
    "keepalives_received": ("keepalives", "{keepalive}", "Keep-alives received"),
    "health_updates_received": (
        "health_updates",
        "{update}",
        "SERVING messages received on the health Watch stream",
    ),
    "probes_answered": ("probes_answered", "{probe}", "Liveness probes answered"),
}

_lock = threading.Lock()
_global: _Instruments | None = None
_by_provider: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()


class _Instruments:
    """The instruments of one meter provider, and the connections reporting to them."""

    def __init__(self, meter: Any) -> None:
        from opentelemetry.metrics import Observation  # noqa: PLC0415 - optional, deferred

        self._observation = Observation
        self._lock = threading.Lock()
        #: core -> its attributes; held weakly: a connection dropped stops reporting.
        self._cores: weakref.WeakKeyDictionary[Core, dict[str, str]] = weakref.WeakKeyDictionary()
        meter.create_observable_gauge(
            "chronicle_conn.connection.state",
            callbacks=[self._states],
            description="1 for the state the connection is in (chronicle_conn.state), "
            "0 for the others",
        )
        for field, (suffix, unit, description) in _COUNTERS.items():
            meter.create_observable_counter(
                f"chronicle_conn.connection.{suffix}",
                callbacks=[self._counter(field)],
                unit=unit,
                description=description,
            )
        self.outages = meter.create_histogram(
            "chronicle_conn.connection.outage.duration",
            unit="s",
            description="How long the connection was down, recorded when it is back",
            explicit_bucket_boundaries_advisory=OUTAGE_BUCKETS,
        )

    def reset_lock(self) -> None:
        self._lock = threading.Lock()

    def add(self, core: Core, attributes: dict[str, str]) -> None:
        with self._lock:
            self._cores[core] = attributes

    def _each(self) -> list[tuple[Core, dict[str, str]]]:
        with self._lock:
            return list(self._cores.items())

    def _states(self, options: Any) -> Iterator[Any]:
        for core, attributes in self._each():
            state = core.state  # one attribute read: no lock needed
            for each in ConnectionState:
                yield self._observation(
                    1 if each is state else 0, {**attributes, "chronicle_conn.state": each.value}
                )

    def _counter(self, field: str) -> Any:
        def observe(options: Any) -> Iterator[Any]:
            for core, attributes in self._each():
                yield self._observation(getattr(core.stats(), field), attributes)

        return observe


def attach(core: Core, provider: Any, *, connection: str, target: str) -> bool:
    """Report ``core``'s metrics to ``provider`` (None: OpenTelemetry's global one;
    False: nowhere). Returns whether metrics are on (``opentelemetry-api`` installed).
    Call it on the constructing thread: the first call imports the API."""
    if provider is False:
        return False
    try:
        from opentelemetry import metrics  # noqa: PLC0415 - optional, deferred
    except ImportError:
        return False
    instruments = _instruments(metrics, provider)
    attributes = {"chronicle_conn.connection": connection, "chronicle_conn.target": target}
    instruments.add(core, attributes)
    outages = instruments.outages

    def record(change: StateChange) -> None:
        if change.outage is not None:
            outages.record(change.outage, attributes)

    with core.cond:
        core.events.observe(record)
    return True


def _instruments(metrics: Any, provider: Any) -> _Instruments:
    """One set of instruments per meter provider: two sets on one provider would be
    duplicates, and the SDK calls back only the first set's observers."""
    global _global
    with _lock:
        current = metrics.get_meter_provider()
        if provider is None or provider is current:
            # The global provider. A set made before the application set its provider
            # was made on OpenTelemetry's proxy, which follows it: that set serves it.
            if _global is not None:
                return _global
            found = _by_provider.get(current)
            if found is None:
                found = _Instruments(metrics.get_meter("chronicle_conn", __version__))
                _by_provider[current] = found
            _global = found
            return found
        found = _by_provider.get(provider)
        if found is None:
            found = _Instruments(provider.get_meter("chronicle_conn", __version__))
            _by_provider[provider] = found
        return found


def _after_fork_in_child() -> None:
    """A fork while another thread held a lock here leaves it held in the child."""
    global _lock
    _lock = threading.Lock()
    for instruments in [_global, *_by_provider.values()]:
        if instruments is not None:
            instruments.reset_lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
