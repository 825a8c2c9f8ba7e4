"""Call objects for calls the connection cannot send right now.

On a ``grpc.Channel``, ``future()`` and streaming calls never raise at the call site: they
return an object that is at once a ``grpc.Future``, a ``grpc.Call``, a ``grpc.RpcError``
and (for streams) an iterator, and report the outcome through it. :class:`CallError` is
that object for the managed channel when the connection has no channel to send on:

- a fail-fast call while not connected, or any call after ``close()``: created finished,
  with ``UNAVAILABLE`` (or ``CANCELLED`` after ``close()``); blocking calls raise it;
- a ``wait_for_ready`` ``future()`` or streaming call while not connected: created
  *pending*. It is sent when the connection comes up, and from then on every method
  delegates to the real gRPC call; if its deadline passes, it is cancelled, or the
  connection gives up or is closed first, it finishes with ``DEADLINE_EXCEEDED``,
  ``CANCELLED`` or ``UNAVAILABLE``.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from ._log import module_log, swallow
from ._timer import Handle, timer
from .errors import ChronicleConnError

if TYPE_CHECKING:
    from ._generation import Generation

__all__ = ["CallError", "Issue"]

#: ``issue(generation, timeout) -> the real call``: sends the call on ``generation`` (which
#: the caller has entered) with what is left of its deadline.
Issue = Callable[["Generation", "float | None"], Any]

_StatusCode = grpc.StatusCode


# grpc.Future is generic only in the type stubs.
if TYPE_CHECKING:
    _Future = grpc.Future[Any]
else:
    _Future = grpc.Future


class CallError(grpc.RpcError, grpc.Call, _Future, ChronicleConnError):
    """A call through a managed channel that the connection could not send (yet).

    It is what gRPC's own failed or pending calls are: a ``grpc.RpcError`` (so ``except
    grpc.RpcError`` catches it), a ``grpc.Call`` (``code()``, ``details()``...), a
    ``grpc.Future`` and, for streaming calls, an iterator; and a ``ChronicleConnError``.
    ``code()`` is ``UNAVAILABLE`` (not connected, or the connection gave up),
    ``DEADLINE_EXCEEDED`` (a ``wait_for_ready`` call's deadline passed while it waited
    for the connection) or ``CANCELLED`` (the connection was closed, or the application
    cancelled it while it waited). As with gRPC's calls, only the application's own
    ``cancel()`` makes ``cancelled()`` true and ``result()`` raise
    ``grpc.FutureCancelledError``; a call ended by ``close()`` is an error like any
    other. A pending call that gets sent behaves, from then on, exactly like the gRPC
    call it became; one the application drops is forgotten, never sent.

    Thread-safe.
    """

    def __init__(
        self,
        code: grpc.StatusCode | None = None,
        details: str = "",
        *,
        issue: Issue | None = None,
        deadline: float | None = None,
    ) -> None:
        super().__init__(details)
        self._cond = threading.Condition(threading.Lock())
        # Guarded by _cond:
        self._code = code  # set when it finished without being sent
        self._details = details
        self._issue = issue  # None once sent or finished
        self._deadline = deadline  # time.monotonic() deadline while pending
        self._real: Any = None
        self._sending = False
        self._cancel_requested = False
        self._user_cancelled = False  # cancel() ended it (not close(): that is an error)
        self._done_callbacks: list[Callable[[_Future], None]] = []
        self._rpc_callbacks: list[Callable[[], None]] = []
        self._timer: Handle | None = None
        if code is None and deadline is not None:
            # Weakly: a pending call the application dropped is garbage, as gRPC's are.
            self._timer = timer.schedule(deadline, functools.partial(_expire, weakref.ref(self)))

    # ------------------------------------------------------------------ life cycle

    @property
    def pending(self) -> bool:
        """Whether it still waits for a connection (neither sent nor finished)."""
        with self._cond:
            return self._code is None and self._real is None

    @property
    def sent(self) -> bool:
        """Whether it was sent: a real gRPC call carries it (else it never left the
        process, and running it again cannot run it twice)."""
        with self._cond:
            return self._real is not None

    def send(self, generation: Generation) -> bool:
        """Send it on ``generation`` (already entered by the caller, who leaves it if
        this returns False). Returns whether it was sent; False if it had finished."""
        with self._cond:
            issue = self._issue
            if issue is None or self._code is not None:
                return False
            self._issue = None
            self._sending = True
            deadline = self._deadline
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            self.finish(_StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", sent=True)
            return False
        try:
            real = issue(generation, timeout)
        except BaseException as exc:
            swallow(exc)
            self.finish(
                _StatusCode.INTERNAL,
                f"chronicle_conn: could not send the call: {exc!r}",
                sent=True,
            )
            return False
        with self._cond:
            self._real = real
            self._sending = False
            cancel = self._cancel_requested
            done_callbacks, rpc_callbacks = self._settled()
        for callback in done_callbacks:
            real.add_done_callback(_Forward(self, callback))
        for rpc_callback in rpc_callbacks:
            if not real.add_callback(rpc_callback):
                _run(rpc_callback)
        if cancel:
            real.cancel()
        return True

    def finish(self, code: grpc.StatusCode, details: str, *, sent: bool = False) -> bool:
        """End it without sending it (``sent``: :meth:`send` had already taken it).
        Returns False if it had already been sent or finished."""
        with self._cond:
            if self._code is not None or self._real is not None:
                return False
            if self._sending and not sent:
                # send() is issuing it right now: let the real call carry the outcome.
                if code is _StatusCode.CANCELLED:
                    self._cancel_requested = True
                return False
            self._code = code
            self._details = details
            self._issue = None
            self.args = (details,)
            done_callbacks, rpc_callbacks = self._settled()
        for rpc_callback in rpc_callbacks:
            _run(rpc_callback)
        for callback in done_callbacks:
            _run(callback, self)
        return True

    def _settled(self) -> tuple[list[Callable[[_Future], None]], list[Callable[[], None]]]:
        """It was just sent or finished (lock held): wake the waiters, drop the deadline,
        and hand over the callbacks added so far (done-callbacks, RPC callbacks)."""
        handle, self._timer = self._timer, None
        if handle is not None:
            handle.cancel()  # lock-free: plain attribute writes
        done_callbacks, self._done_callbacks = self._done_callbacks, []
        rpc_callbacks, self._rpc_callbacks = self._rpc_callbacks, []
        self._cond.notify_all()
        return done_callbacks, rpc_callbacks

    def _wait(self, timeout: float | None) -> Any:
        """Block until sent (return the real call) or finished (return None).

        Raises:
            grpc.FutureTimeoutError: ``timeout`` passed first.
        """
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._code is not None or self._real is not None, timeout
            ):
                raise grpc.FutureTimeoutError()
            return self._real

    # ------------------------------------------------------------------ grpc.RpcContext

    def is_active(self) -> bool:
        with self._cond:
            real = self._real
            if real is None:
                return self._code is None
        return bool(real.is_active())

    def time_remaining(self) -> float | None:  # type: ignore[override]  # grpc's stub is wrong
        with self._cond:
            real, deadline = self._real, self._deadline
            if real is None:
                if self._code is not None:
                    return 0.0
                return None if deadline is None else max(0.0, deadline - time.monotonic())
        return real.time_remaining()  # type: ignore[no-any-return]

    def cancel(self) -> bool:
        with self._cond:
            real = self._real
        if real is not None:
            return bool(real.cancel())
        with self._cond:
            self._user_cancelled = self._code is None
        if self.finish(_StatusCode.CANCELLED, "Locally cancelled by application!"):
            return True
        # Lost a race with send(): being sent right now (it cancels the call once it
        # is), or sent in the meantime (cancel the real call).
        with self._cond:
            real = self._real
            if real is None:
                return self._cancel_requested
        return bool(real.cancel())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._cond:
            real = self._real
            if real is None:
                if self._code is not None:
                    return False
                self._rpc_callbacks.append(callback)
                return True
        return bool(real.add_callback(callback))

    # ------------------------------------------------------------------ grpc.Call

    def initial_metadata(self) -> Any:
        real = self._wait(None)
        return () if real is None else real.initial_metadata()

    def trailing_metadata(self) -> Any:
        real = self._wait(None)
        return () if real is None else real.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        real = self._wait(None)
        return self._code if real is None else real.code()  # type: ignore[return-value]

    def details(self) -> str:
        real = self._wait(None)
        return self._details if real is None else real.details()

    def debug_error_string(self) -> str:
        real = self._wait(None)
        if real is None:
            return f"chronicle_conn: {self._details}"
        return str(real.debug_error_string())

    # ------------------------------------------------------------------ grpc.Future

    def cancelled(self) -> bool:
        with self._cond:
            real = self._real
            if real is None:
                return self._user_cancelled and self._code is _StatusCode.CANCELLED
        return bool(real.cancelled())

    def running(self) -> bool:
        return not self.done()

    def done(self) -> bool:
        with self._cond:
            real = self._real
            if real is None:
                return self._code is not None
        return bool(real.done())

    def _settle(self, timeout: float | None) -> tuple[Any, float | None]:
        """Wait as ``result()`` does: (the real call, what is left of ``timeout``), or
        (None, _) when it finished unsent; ``FutureCancelledError`` if cancelled."""
        started = time.monotonic()
        real = self._wait(timeout)
        if real is None and self.cancelled():
            raise grpc.FutureCancelledError()
        return real, _left(timeout, started)

    def result(self, timeout: float | None = None) -> Any:
        real, left = self._settle(timeout)
        if real is None:
            raise self
        return real.result(left)

    def exception(self, timeout: float | None = None) -> Any:
        real, left = self._settle(timeout)
        return self if real is None else real.exception(left)

    def traceback(self, timeout: float | None = None) -> Any:
        real, left = self._settle(timeout)
        return self.__traceback__ if real is None else real.traceback(left)

    def add_done_callback(self, fn: Callable[[_Future], None]) -> None:
        with self._cond:
            real = self._real
            if real is None and self._code is None:
                self._done_callbacks.append(fn)
                return
        if real is None:
            _run(fn, self)
        else:
            real.add_done_callback(_Forward(self, fn))

    # ------------------------------------------------------------------ streams

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        real = self._wait(None)
        if real is None:
            raise self
        return next(real)

    def next(self) -> Any:
        return self.__next__()

    # ------------------------------------------------------------------ display

    def __str__(self) -> str:
        with self._cond:
            real, code, details = self._real, self._code, self._details
        if real is not None:
            return str(real)
        if code is None:
            return "<CallError pending: waiting for the connection>"
        return (
            "<CallError of RPC that terminated with:\n"
            f'\tstatus = {code}\n\tdetails = "{details}"\n>'
        )

    __repr__ = __str__


class _Forward:
    """A done-callback of the real call that reports the :class:`CallError` instead,
    as the future the user added it to."""

    __slots__ = ("_call", "_fn")

    def __init__(self, call: CallError, fn: Callable[[_Future], None]) -> None:
        self._call = call
        self._fn = fn

    def __call__(self, _real: object) -> None:
        # grpc runs a done-callback added to a finished call at once, on the adding
        # thread (the supervisor's, when it sends a queued call): never let it raise there.
        _run(self._fn, self._call)


def _expire(ref: weakref.ReferenceType[CallError]) -> None:
    call = ref()
    if call is not None:
        call.finish(_StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


def _left(timeout: float | None, started: float) -> float | None:
    return None if timeout is None else max(0.0, timeout - (time.monotonic() - started))


def _run(callback: Callable[..., None], *args: object) -> None:
    try:
        callback(*args)
    except BaseException as exc:
        swallow(exc)
        module_log().exception("call_callback_failed", callback=repr(callback))
