"""chronicle_conn: one resilient gRPC channel to a Chronicle kernel, per process.

import chronicle_conn as cc

with cc.Connection("chronicle://localhost:35000?disableTls=true") as conn:
    conn.connect(timeout=10)
    stub = MyServiceStub(conn.channel())   # valid for the life of the connection
"""

from __future__ import annotations

import os as _os
import sys as _sys

# grpc prints a line on stderr for every failed TLS handshake (INFO: "Handshake failed
# ...") unless GRPC_VERBOSITY says otherwise; the library reports the reason itself, in
# one event and in the exception. Set to ERROR only when nobody chose a level and grpc,
# which reads it once, is not imported yet (README: Security).
if "grpc" not in _sys.modules:
    _os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from ._calls import CallError
from ._version import __version__
from .config import ConnectionConfig, LivenessMode, ReconnectPolicy
from .connection import Connection, registry
from .connection_string import AuthenticationMode, ConnectionString, Endpoint
from .errors import (
    AuthenticationError,
    ChronicleConnError,
    ConfigurationError,
    ConnectionClosedError,
    ConnectionStringError,
    ConnectTimeoutError,
    DuplicateNameError,
    NotConnectedError,
    RegistryError,
    RetriesExhaustedError,
    TlsError,
    UnknownNameError,
)
from .managed_channel import ManagedChannel
from .registry import ConnectionRegistry
from .states import ConnectionState, ConnectionStats, StateChange

__all__ = [
    "AuthenticationError",
    "AuthenticationMode",
    "CallError",
    "ChronicleConnError",
    "ConfigurationError",
    "ConnectTimeoutError",
    "Connection",
    "ConnectionClosedError",
    "ConnectionConfig",
    "ConnectionRegistry",
    "ConnectionState",
    "ConnectionStats",
    "ConnectionString",
    "ConnectionStringError",
    "DuplicateNameError",
    "Endpoint",
    "LivenessMode",
    "ManagedChannel",
    "NotConnectedError",
    "ReconnectPolicy",
    "RegistryError",
    "RetriesExhaustedError",
    "StateChange",
    "TlsError",
    "UnknownNameError",
    "__version__",
    "registry",
]
