"""The exceptions raised by chronicle_conn.

Every exception derives from :class:`ChronicleConnError`, so ``except
cc.ChronicleConnError`` catches anything the library raises on purpose.
Intermediate bases carry context (the offending option, the connection state),
and causes are chained with ``raise ... from cause``. No message contains a
secret: connection strings are always shown redacted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .states import ConnectionState

__all__ = [
    "AuthenticationError",
    "ChronicleConnError",
    "ConfigurationError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ConnectionStringError",
    "DuplicateNameError",
    "NotConnectedError",
    "RegistryError",
    "RetriesExhaustedError",
    "TlsError",
    "UnknownNameError",
]


class ChronicleConnError(Exception):
    """Root of every exception chronicle_conn raises on purpose."""


class ConfigurationError(ChronicleConnError, ValueError):
    """An option or setting is invalid.

    Attributes:
        option: the name of the offending option, when there is one.
    """

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class ConnectionStringError(ConfigurationError):
    """A connection string could not be parsed, or holds an invalid value.

    The message names the offending part and never contains a secret.
    """


class NotConnectedError(ChronicleConnError):
    """The connection is not CONNECTED, so there is no channel to hand out.

    Attributes:
        state: the :class:`~chronicle_conn.ConnectionState` at the time of the call.
    """

    def __init__(self, message: str, *, state: ConnectionState | None = None) -> None:
        super().__init__(message)
        self.state = state


class ConnectTimeoutError(ChronicleConnError, TimeoutError):
    """``connect()`` reached its deadline before the connection was established."""


class RetriesExhaustedError(ChronicleConnError):
    """The bounded reconnect budget (``retry_attempts``) ran out.

    The last attempt's failure is chained as ``__cause__``.

    Attributes:
        attempts: how many attempts were made before giving up.
    """

    def __init__(self, message: str, *, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class ConnectionClosedError(NotConnectedError):
    """The connection was closed (or closed while the caller waited).

    A :class:`NotConnectedError` too: ``except NotConnectedError`` covers both.
    """


class AuthenticationError(ChronicleConnError):
    """The server or the token endpoint refused the configured credentials.

    Retrying cannot fix that: the connection goes FAILED at once and ``connect()``
    raises this (a later ``connect()`` tries again, in case the credentials were fixed).
    """


class TlsError(ChronicleConnError):
    """A TLS connection cannot be made as configured: the server speaks plaintext (or
    TLS to a plaintext client), its certificate is not trusted or is for another name,
    or it refused the client certificate. The message says what to change.

    Like :class:`AuthenticationError`, the connection goes FAILED at once; a server
    that is merely down is retried as usual.
    """


class RegistryError(ChronicleConnError):
    """Base of the connection registry's errors.

    Attributes:
        name: the registry name involved.
    """

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class DuplicateNameError(RegistryError, ValueError):
    """A connection is already registered under that name."""


class UnknownNameError(RegistryError, KeyError):
    """No connection is registered under that name."""

    def __str__(self) -> str:
        # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""
