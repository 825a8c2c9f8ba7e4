"""Credentials on every call: an ``api-key``, or an OAuth2 client-credentials token.

* :class:`TokenSource` gets a token from the kernel's ``/connect/token`` endpoint (the
  standard library's HTTP client: no new dependency), keeps it, and renews it on its
  own thread before it expires, so no call ever waits for a token or fails while one
  turns over. The supervisor asks for the first one in each attempt
  (:meth:`TokenSource.ensure`); an endpoint that refuses the credentials (400/401/403) is
  :class:`~chronicle_conn.errors.AuthenticationError`, one that is down is retried.
* :class:`MetadataInterceptor` puts the header on every call, the library's own
  liveness calls included, on plaintext channels (where grpc refuses call credentials)
  and TLS channels alike: grpc's call credentials run a Python plugin on another thread
  for each call, which halved the throughput of 4 calling threads over TLS
  (``tests/benchmarks/bench_auth.py``), for nothing a TLS channel needs.

The token and the secrets never reach a log event, a ``repr()`` or a message.
Imported on a constructing thread when a connection has credentials (urllib is not
worth importing for every connection).
"""

from __future__ import annotations

import http.client
import json
import math
import random
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grpc

from ._log import QuietLog
from .errors import AuthenticationError

__all__ = [
    "MetadataInterceptor",
    "TokenSource",
    "TokenUnavailable",
]

#: Renew this long before the token expires...
REFRESH_MARGIN = 60.0
#: ...or at half its life when that is sooner (short-lived tokens).
_MIN_LIFETIME = 1.0
_RETRY_FIRST = 0.5
_RETRY_MAX = 30.0


class TokenUnavailable(Exception):
    """The token endpoint could not be asked (down, timed out, a 5xx): try again."""


class _Token(NamedTuple):
    header: str  # "Bearer <token>"
    expires_at: float  # monotonic
    refresh_at: float  # monotonic

    def __repr__(self) -> str:
        return f"_Token(header='Bearer ***', expires_at={self.expires_at:.1f})"


def _refresh_at(now: float, expires_in: float) -> float:
    """60 s before expiry, or at half-life for a token that lives less than 2 minutes."""
    if expires_in >= 2 * REFRESH_MARGIN:
        return now + expires_in - REFRESH_MARGIN
    return now + expires_in / 2


class TokenSource:
    """The OAuth2 client-credentials token of one connection.

    Args:
        urls: the token endpoint (``https://host:port/connect/token``) of each host, in
            order: asked from the one that answered last, the others when it is down.
        client_id, client_secret: the client's credentials (the secret is never shown).
        context: the TLS context for https (None for http).
        timeout: bound on one request, seconds.
        log: the connection's logger.
        label: the connection's label, for the refresher thread's name.
    """

    def __init__(
        self,
        urls: Sequence[str],
        client_id: str,
        client_secret: str | None,
        *,
        context: ssl.SSLContext | None,
        timeout: float,
        log: Any = None,
        label: str = "",
    ) -> None:
        if not urls:
            raise ValueError("no token endpoint")
        self.urls = tuple(urls)
        self.url = self.urls[0]  # the one asked first (the last that answered)

        self.client_id = client_id
        self._secret = client_secret
        self._context = context
        self._timeout = timeout
        self.log: Any = log if log is not None else QuietLog(None)
        self._label = label
        self._cond = threading.Condition()
        self._token: _Token | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        #: Set when the endpoint refused the credentials while renewing: the connection
        #: is then given up (FAILED with this error).
        self.refused: AuthenticationError | None = None
        #: Called (with no lock held) when ``refused`` is set.
        self.on_refused: Callable[[], None] | None = None
        self.fetches = 0  # requests made to the endpoint(s)

    def set_urls(self, urls: Sequence[str]) -> None:
        """The endpoints changed (an SRV look-up named other kernels). Keeps asking the
        one that answered last while it is still among them."""
        if not urls:
            return
        self.urls = tuple(urls)
        if self.url not in self.urls:
            self.url = self.urls[0]

    def __repr__(self) -> str:
        return f"<TokenSource {self.url} client_id={self.client_id!r} secret=***>"

    # -- the calling side ----------------------------------------------------------

    def header(self) -> str | None:
        """``Bearer <token>`` for a call, at once (no I/O): the latest token, or None."""
        token = self._token
        return token.header if token is not None else None

    def needs_fetch(self) -> bool:
        """Whether :meth:`ensure` would ask the endpoint (no token, or it expired)."""
        token = self._token
        return token is None or time.monotonic() >= token.expires_at

    def ensure(self, deadline: float, *, fresh: bool = False) -> bool:
        """Make sure a token is at hand; fetch one (blocking until ``deadline``, a
        ``time.monotonic()`` value) if there is none, it has expired, or ``fresh`` (the
        server refused the one we have: a restarted kernel forgets its tokens). Starts
        the renewing thread. Called by the supervisor in every attempt. Returns whether
        it fetched a new token.

        Raises:
            AuthenticationError: the endpoint refused the credentials.
            TokenUnavailable: the endpoint could not be asked; try again later.
        """
        with self._cond:
            token = self._token
            self.refused = None  # a new attempt asks again: the credentials may be fixed
        fetched = fresh or token is None or time.monotonic() >= token.expires_at
        if fetched:
            self._store(self._fetch(max(0.05, deadline - time.monotonic())))
        self._start()
        return fetched

    def close(self, timeout: float = 1.0) -> None:
        """Stop renewing, and wait up to ``timeout`` for the thread to end (a renewal
        in progress finishes first, within the request timeout)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def fork_child(self) -> None:
        """In a forked child: a fresh lock, and no thread (a new one starts on demand)."""
        self._cond = threading.Condition()
        self._thread = None

    # -- fetching --------------------------------------------------------------------

    def _store(self, token: _Token) -> None:
        with self._cond:
            self._token = token
            self._cond.notify_all()

    def _fetch(self, timeout: float) -> _Token:
        """A new token from the endpoint that answered last, else the next ones."""
        deadline = time.monotonic() + timeout
        urls = (self.url, *(u for u in self.urls if u != self.url))
        for index, url in enumerate(urls):
            remaining = deadline - time.monotonic()
            try:
                token = self._fetch_from(url, max(0.05, remaining))
            except TokenUnavailable:
                if index == len(urls) - 1 or deadline - time.monotonic() <= 0.05:
                    raise
                continue
            self.url = url
            return token
        raise TokenUnavailable("no token endpoint")  # not reached: urls is never empty

    def _fetch_from(self, url: str, timeout: float) -> _Token:
        form = {"grant_type": "client_credentials", "client_id": self.client_id}
        if self._secret is not None:
            form["client_secret"] = self._secret
        body = urllib.parse.urlencode(form).encode("ascii")
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
        )
        self.fetches += 1
        started = time.monotonic()
        try:
            with urllib.request.urlopen(
                request, timeout=min(timeout, self._timeout), context=self._context
            ) as response:
                payload = response.read(65536)
        except urllib.error.HTTPError as exc:
            status = exc.code
            error = _oauth_error(exc)
            exc.close()
            if status in (400, 401, 403):
                raise AuthenticationError(
                    f"the token endpoint {url} refused client {self.client_id!r} "
                    f"(HTTP {status}{': ' + error if error else ''}): check the client id "
                    "and secret"
                ) from None
            if status in (404, 405):
                raise AuthenticationError(_no_endpoint(url, f"HTTP {status}")) from None
            raise TokenUnavailable(f"token endpoint {url}: HTTP {status}") from None
        except http.client.RemoteDisconnected:
            raise TokenUnavailable(f"token endpoint {url}: closed without an answer") from None
        except http.client.BadStatusLine as exc:
            line = str(exc.args[0] if exc.args else "")
            if line.startswith("\x00\x00") and len(line) > 3 and line[3] == "\x04":
                # An HTTP/2 SETTINGS frame: a gRPC-only port (a server without OAuth).
                raise AuthenticationError(_no_endpoint(url, "it speaks only HTTP/2")) from None
            raise TokenUnavailable(f"token endpoint {url}: not an HTTP answer") from None
        except http.client.HTTPException as exc:
            raise TokenUnavailable(f"token endpoint {url}: {type(exc).__name__}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise TokenUnavailable(f"token endpoint {url}: {reason}") from None
        try:
            answer = json.loads(payload)
            access = answer["access_token"]
            if not isinstance(access, str) or not access:
                raise ValueError("empty access_token")
            expires_in = float(answer.get("expires_in", 3600))
            if not math.isfinite(expires_in):
                raise ValueError("expires_in is not finite")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TokenUnavailable(
                f"token endpoint {url}: the answer is not an OAuth token (JSON with access_token)"
            ) from None
        expires_in = max(_MIN_LIFETIME, expires_in)
        self.log.debug(
            "token_fetched",
            url=url,
            expires_in=expires_in,
            took_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return _Token(f"Bearer {access}", started + expires_in, _refresh_at(started, expires_in))

    # -- renewing --------------------------------------------------------------------

    def _start(self) -> None:
        with self._cond:
            if self._closing or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(
                target=self._run, name=f"chronicle_conn-token[{self._label}]", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        delay = _RETRY_FIRST
        failures = 0
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        return
                    token = self._token
                    due = token.refresh_at if token is not None else time.monotonic()
                    remaining = due - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            try:
                fresh = self._fetch(self._timeout)
            except AuthenticationError as exc:
                self.log.error("token_refused", url=self.url, error=str(exc))
                with self._cond:
                    self._token = None  # the next attempt asks again
                self.refused = exc
                callback = self.on_refused
                if callback is not None:
                    callback()
                with self._cond:  # wait for the next attempt's ensure() to restart it
                    self._thread = None
                return
            except TokenUnavailable as exc:
                now = time.monotonic()
                expires_at = token.expires_at if token is not None else now
                # Backing off, but trying once more before a token that is still good
                # expires (a failed renewal of a good token is no outage yet).
                wait = delay
                if expires_at > now:
                    wait = min(wait, max(0.1, (expires_at - now) / 2))
                wait *= 0.9 + 0.2 * random.random()
                delay = min(delay * 2, _RETRY_MAX)
                failures += 1
                if failures == 1:
                    self.log.warning("token_refresh_failed", error=str(exc))
                else:
                    self.log.debug(
                        "token_refresh_failed", error=str(exc), failures=failures, retry_in=wait
                    )
                with self._cond:
                    if not self._closing and self._token is token:
                        self._token = token._replace(refresh_at=now + wait) if token else None
                continue
            except Exception:  # never let the renewal thread die silently
                self.log.exception("token_refresh_crashed")
                with self._cond:
                    self._cond.wait(_RETRY_MAX)
                continue
            if failures:
                self.log.info("token_refreshed", after_failures=failures)
            delay = _RETRY_FIRST
            failures = 0
            self._store(fresh)


def _no_endpoint(url: str, why: str) -> str:
    return (
        f"no OAuth token endpoint at {url} ({why}): a kernel before v16 serves tokens on "
        "its management port (authPort=8080); a server without authentication needs no "
        "client credentials (remove them, or auth=none)"
    )


def _oauth_error(exc: urllib.error.HTTPError) -> str:
    """The ``error`` field of an OAuth error answer (``invalid_client``), if any."""
    try:
        answer = json.loads(exc.read(4096))
        error = answer.get("error")
    except Exception:  # not JSON: the status says enough
        return ""
    return error if isinstance(error, str) and error.isascii() and len(error) < 64 else ""


# ------------------------------------------------------------------------ attaching

Headers = Callable[[], Sequence[tuple[str, str]]]


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``headers()`` to every call. A header the caller already set on a call is
    left as it is."""

    def __init__(self, headers: Headers) -> None:
        self._headers = headers

    def _with_headers(self, details: Any) -> Any:
        extra = self._headers()
        given = tuple(details.metadata or ())
        names = {key for key, _ in given}
        metadata = given + tuple(h for h in extra if h[0] not in names)
        return _Details(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_headers(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_headers(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_headers(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_headers(details), requests)
