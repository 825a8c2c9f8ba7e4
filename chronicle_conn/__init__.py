"""chronicle_conn: one resilient gRPC channel to a Chronicle kernel, per process.

import chronicle_conn as cc

with cc.Connection("chronicle://localhost:35000?disableTls=true") as conn:
    conn.connect(timeout=10)
    stub = MyServiceStub(conn.channel())   # valid for the life of the connection
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from .config import ConnectionConfig, LivenessMode, ReconnectPolicy
from .connection import Connection
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
    UnknownNameError,
)
from .managed_channel import ManagedChannel, UnavailableError
from .registry import ConnectionRegistry, registry
from .states import ConnectionState, ConnectionStats, StateChange

__all__ = [
    "AuthenticationError",
    "AuthenticationMode",
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
    "UnavailableError",
    "UnknownNameError",
    "__version__",
    "registry",
]
