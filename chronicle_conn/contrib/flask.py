"""Flask integration: one :class:`~chronicle_conn.Connection` per Flask app.

::

    from chronicle_conn.contrib.flask import Chronicle

    chronicle = Chronicle()                 # extensions.py: no app yet

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["CHRONICLE_CONNECTION_STRING"] = "chronicle://kernel:35000"
        app.config["CHRONICLE_OPTIONS"] = {"retry_attempts": None}
        chronicle.init_app(app)             # builds the connection; it starts dialing
        app.register_blueprint(chronicle.readiness_blueprint())    # GET /readyz
        return app

    @app.get("/version")
    def version():
        stub = ServerStub(chronicle.connection.channel())
        return {"version": stub.GetVersionInfo(Empty(), timeout=5).Version}

``Chronicle(app)`` does the same as ``Chronicle()`` then ``init_app(app)``. One
``Chronicle`` may be initialised on several apps; each app gets its own connection,
stored in ``app.extensions["chronicle"]``.

**Settings** (``app.config``, read once, by ``init_app``):

- ``CHRONICLE_CONNECTION_STRING``: a ``str`` or a
  :class:`~chronicle_conn.ConnectionString`; absent or None:
  ``ConnectionString.default()``.
- ``CHRONICLE_OPTIONS``: a dict of :class:`~chronicle_conn.Connection` keyword options,
  e.g. ``{"liveness": "health", "retry_attempts": None}``.
- ``CHRONICLE_HANDLE_ERRORS``: ``False`` turns the error handlers off for this app
  (default True; ``Chronicle(handle_errors=False)`` turns them off for every app).

A misconfiguration fails in ``init_app``, never later: a
:class:`~chronicle_conn.ConfigurationError` (a ``ConnectionStringError`` for a string
that does not parse) whose one-line message starts with the setting at fault, e.g.
``CHRONICLE_OPTIONS: unknown option 'retyr_attempts' (did you mean
'retry_attempts'?)``, and whose ``.option`` names the option (else the setting). No
message contains a secret.

**The connection** is process-wide: ``init_app`` builds it (with ``auto_connect``, the
default, it starts dialing in the background; nothing blocks), and no request or
app-context teardown closes it. Under ``gunicorn --preload`` each forked worker starts
over on a channel of its own (see ``Connection``). ``chronicle.connection`` is the current
app's connection (``RuntimeError`` outside an application context, as Flask's
``current_app``); ``chronicle.get_connection(app)`` any app's. ``chronicle.close(app)``
closes an app's connection (idempotent); it stays in ``app.extensions``, closed, so
views and the readiness probe answer 503 from then on.

**Errors.** Unless turned off, ``init_app`` registers app-level error handlers that turn
a view (or a ``before_request`` function) that raises

- :class:`~chronicle_conn.NotConnectedError` (so also ``ConnectionClosedError``),
  :class:`~chronicle_conn.ConnectTimeoutError` or
  :class:`~chronicle_conn.RetriesExhaustedError`, or
- a ``grpc.RpcError`` whose ``code()`` is ``UNAVAILABLE`` (gRPC's own, or a
  :class:`~chronicle_conn.CallError` from a fail-fast call while not connected)

into ``503 Service Unavailable``, ``Retry-After: 1``, with the JSON body
``{"error": "chronicle unavailable", "state": "<the app's connection state>"}``. Any other
``grpc.RpcError`` goes on exactly as if no handler were registered for it: to your own
app-level handler for a base class of it (``Exception``, say) if there is one, else to
Flask's unhandled-exception path (raised under ``TESTING`` or ``PROPAGATE_EXCEPTIONS``,
else logged and turned into a 500). Your handlers win: an app-level handler you
registered for one of those classes before ``init_app`` is kept, one registered after
replaces ours, and blueprint handlers and handlers for narrower classes are found first,
as usual in Flask.

**Readiness.** ``chronicle.readiness`` is a view function for the current app's
connection: ``200 {"status": "ok", "state": "connected"}`` while connected, else ``503
{"status": "unavailable", "state": "<state>", "last_error": "<redacted, short>" or
null}``. ``chronicle.readiness_blueprint(url="/readyz")`` serves it as ``GET <url>``; or
``app.add_url_rule("/readyz", view_func=chronicle.readiness)``. It never blocks: it reads
the state, the supervisor does the dialing. A probe of an IDLE or FAILED connection
counts as demand, as a call would: a connection whose retry budget ran out is re-armed,
so an instance taken out of rotation (and so getting no traffic) comes back by itself
once the kernel does.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Mapping
from typing import Any, Final, cast

import grpc

try:
    import flask
    from flask.typing import ResponseReturnValue
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "chronicle_conn.contrib.flask needs Flask: pip install 'chronicle-conn[flask]'"
    ) from exc

from chronicle_conn import (
    ConfigurationError,
    Connection,
    ConnectionState,
    ConnectionString,
    ConnectionStringError,
    ConnectTimeoutError,
    NotConnectedError,
    RegistryError,
    RetriesExhaustedError,
)

__all__ = [
    "CONNECTION_STRING_SETTING",
    "EXTENSION_KEY",
    "HANDLE_ERRORS_SETTING",
    "OPTIONS_SETTING",
    "Chronicle",
]

#: The key of ``app.extensions`` that holds the app's :class:`~chronicle_conn.Connection`.
EXTENSION_KEY: Final = "chronicle"
CONNECTION_STRING_SETTING: Final = "CHRONICLE_CONNECTION_STRING"
OPTIONS_SETTING: Final = "CHRONICLE_OPTIONS"
HANDLE_ERRORS_SETTING: Final = "CHRONICLE_HANDLE_ERRORS"

#: What a client is told to wait before it tries again after a 503, seconds.
_RETRY_AFTER: Final = "1"
#: The longest ``last_error`` the readiness view reports, characters.
_LAST_ERROR_MAX: Final = 200

# Options that Connection takes but does not check at construction: a wrong value would
# only fail on the supervisor thread, later.
_CALLABLE_OPTIONS: Final = ("clock", "delay_factory")


class Chronicle:
    """The Flask extension: a :class:`~chronicle_conn.Connection` per app.

    Holds no per-app state itself (each app's connection lives in
    ``app.extensions["chronicle"]``), so one instance serves any number of apps.

    Args:
        app: initialise this app at once (else call :meth:`init_app` later).
        handle_errors: register the 503 error handlers (see the module docstring) on
            every app this is initialised on; an app's ``CHRONICLE_HANDLE_ERRORS =
            False`` turns them off for that app alone.

    Raises:
        ConfigurationError: ``handle_errors`` is not a bool, or as :meth:`init_app`.
    """

    def __init__(self, app: flask.Flask | None = None, *, handle_errors: bool = True) -> None:
        if not isinstance(handle_errors, bool):
            raise ConfigurationError(
                f"handle_errors must be True or False, not {type(handle_errors).__name__}",
                option="handle_errors",
            )
        self.handle_errors = handle_errors
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Build ``app``'s connection from its settings and register the error handlers.

        Non-blocking: the connection dials in the background (with ``auto_connect``).
        Nothing is registered, and no connection is left behind, when it raises.

        Raises:
            ConfigurationError: a setting is invalid (``ConnectionStringError`` for a
                connection string that does not parse); the message starts with the
                setting's name.
            RuntimeError: ``app`` already has a Chronicle connection.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"a Chronicle connection is already registered on the Flask app {app.name!r}"
            )
        handle_errors = _handle_errors_setting(app.config) and self.handle_errors
        conn = _build_connection(app.config)
        try:
            if handle_errors:
                _register_error_handlers(app)
            app.extensions[EXTENSION_KEY] = conn
        except BaseException:
            # Flask refuses new handlers once the app has served a request.
            conn.close()
            raise

    @property
    def connection(self) -> Connection:
        """The current app's connection (``flask.current_app``).

        Raises:
            RuntimeError: outside an application context, or the app was not initialised.
        """
        return self.get_connection()

    def get_connection(self, app: flask.Flask | None = None) -> Connection:
        """Return ``app``'s connection (default: the current app's).

        Raises:
            RuntimeError: no ``app`` and no application context, or ``app`` was not
                initialised.
        """
        if app is None:
            if not flask.has_app_context():
                raise RuntimeError(
                    "Working outside of application context: Chronicle.connection is the "
                    "current Flask app's connection. Push a context with "
                    "'with app.app_context():', or call get_connection(app)."
                )
            app = flask.current_app
        conn = app.extensions.get(EXTENSION_KEY)
        if not isinstance(conn, Connection):
            raise RuntimeError(
                f"no Chronicle connection on the Flask app {app.name!r}: "
                "call Chronicle(app) or init_app(app) first"
            )
        return conn

    def close(self, app: flask.Flask | None = None) -> None:
        """Close ``app``'s connection (default: the current app's). Idempotent.

        It stays in ``app.extensions``, closed: views that use it get
        ``ConnectionClosedError`` (a 503 with the error handlers) and the readiness view
        answers 503 ``closed``.

        Raises:
            RuntimeError: as :meth:`get_connection`.
        """
        self.get_connection(app).close()

    def readiness(self) -> flask.Response:
        """A view function: the current app's readiness, as JSON. Never blocks.

        ``200 {"status": "ok", "state": "connected"}`` while connected; else ``503
        {"status": "unavailable", "state": ..., "last_error": ...}`` (``last_error``: the
        redacted description of the last failure, shortened, or null). An IDLE or
        FAILED connection is asked for, as a call would (a spent retry budget is
        re-armed). Register it with ``app.add_url_rule("/readyz",
        view_func=chronicle.readiness)``, or use :meth:`readiness_blueprint`.

        Raises:
            RuntimeError: as :meth:`get_connection`.
        """
        return _readiness_response(self.get_connection())

    def readiness_blueprint(
        self, url: str = "/readyz", *, name: str = "chronicle_readiness"
    ) -> flask.Blueprint:
        """A new blueprint serving :meth:`readiness` at ``GET url`` (endpoint
        ``<name>.readiness``), for ``app.register_blueprint()``; it may be registered on
        several apps."""
        blueprint = flask.Blueprint(name, __name__)
        blueprint.add_url_rule(url, "readiness", self.readiness, methods=["GET"])
        return blueprint

    def __repr__(self) -> str:
        return f"<Chronicle handle_errors={self.handle_errors}>"


# ---------------------------------------------------------------------------- settings


def _build_connection(config: Mapping[str, Any]) -> Connection:
    """The connection the settings describe; every failure a ``ConfigurationError``."""
    connection_string = _connection_string_setting(config.get(CONNECTION_STRING_SETTING))
    options = _options_setting(config.get(OPTIONS_SETTING))
    try:
        return Connection(connection_string, **options)
    except ConfigurationError as exc:
        # What the string parsed into can still be refused (caPath missing, srv...).
        option = exc.option
        setting = (
            OPTIONS_SETTING if option is None or option in options else CONNECTION_STRING_SETTING
        )
        raise _prefixed(setting, exc) from exc
    except RegistryError as exc:  # the name is taken (by another app's connection?)
        raise ConfigurationError(f"{OPTIONS_SETTING}: {_one_line(exc)}", option="name") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        # A value of the wrong kind that Connection does not check itself (a logger
        # without bind(), say): it would fail later, or with an unhelpful error.
        raise ConfigurationError(
            f"{OPTIONS_SETTING}: {type(exc).__name__}: {_one_line(exc)}",
            option=OPTIONS_SETTING,
        ) from exc


def _connection_string_setting(value: object) -> ConnectionString | None:
    if value is None or isinstance(value, ConnectionString):
        return value
    if not isinstance(value, str):
        raise ConfigurationError(
            f"{CONNECTION_STRING_SETTING}: must be a str or a ConnectionString, "
            f"not {type(value).__name__}",
            option=CONNECTION_STRING_SETTING,
        )
    try:
        return ConnectionString.parse(value)
    except ConfigurationError as exc:
        raise _prefixed(CONNECTION_STRING_SETTING, exc) from exc


def _options_setting(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{OPTIONS_SETTING}: must be a dict of Connection options, not {type(value).__name__}",
            option=OPTIONS_SETTING,
        )
    known = _connection_options()
    options: dict[str, Any] = {}
    for key, option in value.items():
        if not isinstance(key, str):
            raise ConfigurationError(
                f"{OPTIONS_SETTING}: option names must be str, got {key!r}",
                option=OPTIONS_SETTING,
            )
        if key == "connection_string":
            raise ConfigurationError(
                f"{OPTIONS_SETTING}: give the connection string as {CONNECTION_STRING_SETTING}",
                option=key,
            )
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(f"{OPTIONS_SETTING}: unknown option {key!r}{hint}", option=key)
        if key in _CALLABLE_OPTIONS and not callable(option):
            raise ConfigurationError(
                f"{OPTIONS_SETTING}: {key} must be callable, not {type(option).__name__}",
                option=key,
            )
        options[key] = option
    return options


def _connection_options() -> frozenset[str]:
    """The keyword options of ``Connection`` (read from its signature, so never stale)."""
    parameters = inspect.signature(Connection.__init__).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _handle_errors_setting(config: Mapping[str, Any]) -> bool:
    value = config.get(HANDLE_ERRORS_SETTING, True)
    if not isinstance(value, bool):
        raise ConfigurationError(
            f"{HANDLE_ERRORS_SETTING}: must be True or False, not {type(value).__name__}",
            option=HANDLE_ERRORS_SETTING,
        )
    return value


def _prefixed(setting: str, exc: ConfigurationError) -> ConfigurationError:
    """``exc`` again (same class), its message on one line and prefixed by ``setting``."""
    cls = ConnectionStringError if isinstance(exc, ConnectionStringError) else ConfigurationError
    return cls(f"{setting}: {_one_line(exc)}", option=exc.option or setting)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n"))


# ---------------------------------------------------------------------------- errors

#: The classes the 503 handler is registered for (a grpc.RpcError only when UNAVAILABLE).
_HANDLED: Final[tuple[type[Exception], ...]] = (
    NotConnectedError,
    ConnectTimeoutError,
    RetriesExhaustedError,
    grpc.RpcError,
)


def _register_error_handlers(app: flask.Flask) -> None:
    """Register :func:`_handle_unavailable` app-wide, except where the application has
    its own handler for that very class already."""
    existing = app.error_handler_spec.get(None, {}).get(None, {})
    for cls in _HANDLED:
        if cls not in existing:
            app.register_error_handler(cls, _handle_unavailable)


def _handle_unavailable(error: Exception) -> ResponseReturnValue:
    """503 for an unavailable kernel; anything else goes on as if this were not here."""
    if not _is_unavailable(error):
        return _fall_through(error)
    conn = flask.current_app.extensions.get(EXTENSION_KEY)
    state = conn.state.value if isinstance(conn, Connection) else "unknown"
    response = flask.jsonify(error="chronicle unavailable", state=state)
    response.status_code = 503
    response.headers["Retry-After"] = _RETRY_AFTER
    return response


def _is_unavailable(error: Exception) -> bool:
    if isinstance(error, (NotConnectedError, ConnectTimeoutError, RetriesExhaustedError)):
        return True
    if not isinstance(error, grpc.RpcError):
        return False
    if isinstance(error, grpc.Future) and not error.done():
        return False  # an RPC still running (raised by hand): code() would block
    code = getattr(error, "code", None)
    if not callable(code):
        return False  # a bare grpc.RpcError() has no status
    try:
        return code() is grpc.StatusCode.UNAVAILABLE
    except Exception:
        return False


def _fall_through(error: Exception) -> ResponseReturnValue:
    """What Flask would have done had :func:`_handle_unavailable` not been registered.

    Flask picked this handler as the first app-level match in ``type(error).__mro__``
    (blueprint handlers are tried before any app-level one), so the next app-level
    handler along that MRO is the one it would have picked; with none, re-raising sends
    the error down Flask's unhandled-exception path (``handle_exception``) unchanged.
    """
    app = flask.current_app
    handlers = app.error_handler_spec.get(None, {}).get(None, {})
    for cls in type(error).__mro__:
        handler = handlers.get(cls)
        if handler is not None and handler is not _handle_unavailable:
            return cast("ResponseReturnValue", app.ensure_sync(handler)(error))
    raise error


# ---------------------------------------------------------------------------- readiness


def _readiness_response(conn: Connection) -> flask.Response:
    if conn.connected:
        response = flask.jsonify(status="ok", state=ConnectionState.CONNECTED.value)
    else:
        stats = conn.stats()
        if stats.state in (ConnectionState.IDLE, ConnectionState.FAILED):
            # Demand, as a call would be: re-arms a connection that gave up. Non-blocking.
            with contextlib.suppress(NotConnectedError):
                conn.channel()
        last_error = None if stats.last_error is None else " ".join(stats.last_error.split())
        if last_error is not None and len(last_error) > _LAST_ERROR_MAX:
            last_error = last_error[: _LAST_ERROR_MAX - 3] + "..."
        response = flask.jsonify(
            status="unavailable", state=stats.state.value, last_error=last_error
        )
        response.status_code = 503
    response.headers["Cache-Control"] = "no-store"
    return response
