"""The Flask extension (``chronicle_conn.contrib.flask``) against a real dev kernel in a
child process: settings, misconfiguration, several apps, the 503 error handlers (and what
they leave alone), the readiness view across a kernel crash and restart."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import flask
import grpc
import pytest
from werkzeug.exceptions import InternalServerError

import chronicle_conn as cc
from chronicle_conn.contrib.flask import Chronicle
from tests.helpers import plaintext, version, wait_state

S = cc.ConnectionState

FAST: dict[str, Any] = {
    "reconnect_base_delay": 0.1,
    "reconnect_max_delay": 0.5,
    "attempt_timeout": 3.0,
    "keepalive_stale_after": 1.5,
    "retry_attempts": None,
}

UNAVAILABLE_BODY = "chronicle unavailable"


class FakeRpcError(grpc.RpcError):
    """A ``grpc.RpcError`` with a status code, as gRPC's own failed calls have."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(f"fake {code.name}")
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def _library_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("chronicle_conn-")}


@pytest.fixture
def make_app() -> Iterator[Callable[..., flask.Flask]]:
    """``make(name="app", **config)``: a Flask app with ``config``; whatever Chronicle
    connection it ends up with is closed at teardown, and must leave no thread behind."""
    made: list[flask.Flask] = []

    def make(name: str = "app", **config: Any) -> flask.Flask:
        app = flask.Flask(name)
        app.config.update(config)
        made.append(app)
        return app

    yield make
    conns = [app.extensions["chronicle"] for app in made if "chronicle" in app.extensions]
    for conn in conns:
        conn.close()
    for conn in conns:
        assert conn._threads() == [], f"threads left behind by {conn!r}: {conn._threads()}"


def kernel_app(make_app, kernel, ext: Chronicle | None = None, **config: Any) -> flask.Flask:
    """An app on ``kernel`` (fast backoff, retries for ever), initialised with ``ext``."""
    config.setdefault("CHRONICLE_CONNECTION_STRING", plaintext(kernel.address))
    config.setdefault("CHRONICLE_OPTIONS", FAST)
    config.setdefault("TESTING", True)
    app = make_app(**config)
    ext = ext or Chronicle()
    add_views(app, ext, kernel.address)
    ext.init_app(app)
    return app


def add_views(app: flask.Flask, ext: Chronicle, address: str) -> None:
    """Views that reach the kernel in different ways, and fail in different ways."""

    @app.get("/version")
    def version_view() -> Any:
        return {"version": version(ext.connection.channel())}  # NotConnectedError when down

    @app.get("/managed")
    def managed_view() -> Any:
        # Fail-fast call on the managed channel: a CallError (UNAVAILABLE) when down.
        return {"version": version(ext.connection.managed_channel)}

    @app.get("/raw")
    def raw_view() -> Any:
        # gRPC's own UNAVAILABLE, from a plain channel to a dead kernel.
        with grpc.insecure_channel(address) as channel:
            return {"version": version(channel)}

    @app.get("/unimplemented")
    def unimplemented_view() -> Any:
        # A real non-UNAVAILABLE error from the kernel, through the connection.
        call = ext.connection.channel().unary_unary("/nope.Nope/Nope")
        return {"reply": repr(call(b"", timeout=5))}

    @app.get("/invalid")
    def invalid_view() -> Any:
        raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT)

    @app.get("/closed")
    def closed_view() -> Any:
        raise cc.ConnectionClosedError("closed by hand", state=S.CLOSED)


def assert_503(response: Any, state: str) -> None:
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.headers["Retry-After"] == "1"
    assert response.is_json
    assert response.get_json() == {"error": UNAVAILABLE_BODY, "state": state}


# ---------------------------------------------------------------------------- set-up


def test_chronicle_app_and_init_app(make_app, kernel):
    app = make_app(CHRONICLE_CONNECTION_STRING=plaintext(kernel.address), CHRONICLE_OPTIONS=FAST)
    ext = Chronicle(app)
    conn = app.extensions["chronicle"]
    assert isinstance(conn, cc.Connection)
    assert ext.get_connection(app) is conn
    assert conn.connect(timeout=10) is conn
    assert version(conn.channel())

    factory = Chronicle()  # the application-factory pattern
    other = make_app(CHRONICLE_CONNECTION_STRING=plaintext(kernel.address))
    assert "chronicle" not in other.extensions
    factory.init_app(other)
    assert factory.get_connection(other) is other.extensions["chronicle"] is not conn
    assert repr(factory) == "<Chronicle handle_errors=True>"


def test_settings(make_app, kernel):
    options = {"liveness": "health", "retry_attempts": None, "auto_connect": False}
    app = make_app(CHRONICLE_CONNECTION_STRING=plaintext(kernel.address), CHRONICLE_OPTIONS=options)
    conn = Chronicle(app).get_connection(app)
    config = conn.config
    assert config.connection_string == cc.ConnectionString.parse(plaintext(kernel.address))
    assert config.liveness is cc.LivenessMode.HEALTH
    assert config.policy.retry_attempts is None
    assert config.auto_connect is False
    assert conn.state is S.IDLE  # auto_connect=False: init_app did not dial
    assert options == {"liveness": "health", "retry_attempts": None, "auto_connect": False}
    conn.connect(timeout=10)
    assert conn.stats().liveness == "health"

    # A ConnectionString object, and a registry name.
    parsed = cc.ConnectionString.parse(plaintext(kernel.address))
    named = make_app(
        CHRONICLE_CONNECTION_STRING=parsed, CHRONICLE_OPTIONS={"name": "flask-settings"}
    )
    conn = Chronicle(named).get_connection(named)
    assert conn.config.connection_string is parsed
    assert cc.registry.get("flask-settings") is conn
    conn.close()
    with pytest.raises(cc.UnknownNameError):
        cc.registry.get("flask-settings")


def test_default_connection_string(make_app):
    # Nothing dials: the default target (localhost:35000) is not ours to hammer.
    for config in ({}, {"CHRONICLE_CONNECTION_STRING": None}):
        app = make_app(CHRONICLE_OPTIONS={"auto_connect": False}, **config)
        conn = Chronicle(app).get_connection(app)
        assert conn.config.connection_string == cc.ConnectionString.default()
        assert conn.state is S.IDLE


MISCONFIGURATIONS = [
    pytest.param(
        {"CHRONICLE_CONNECTION_STRING": "http://kernel:35000"},
        "CHRONICLE_CONNECTION_STRING: unknown scheme 'http'",
        cc.ConnectionStringError,
        id="bad-scheme",
    ),
    pytest.param(
        {"CHRONICLE_CONNECTION_STRING": "chronicle://me:s3cret@kernel:notaport"},
        "CHRONICLE_CONNECTION_STRING: the port of host 'kernel' is not a number",
        cc.ConnectionStringError,
        id="bad-port-with-secret",
    ),
    pytest.param(
        {"CHRONICLE_CONNECTION_STRING": "chronicle://kernel?bogus=1"},
        "CHRONICLE_CONNECTION_STRING: unknown query key 'bogus'",
        cc.ConnectionStringError,
        id="bad-query-key",
    ),
    pytest.param(
        {"CHRONICLE_CONNECTION_STRING": "chronicle://kernel?caPath=/nonexistent/ca.pem"},
        "CHRONICLE_CONNECTION_STRING: caPath '/nonexistent/ca.pem' does not exist",
        cc.ConfigurationError,
        id="missing-ca-file",
    ),
    pytest.param(
        {"CHRONICLE_CONNECTION_STRING": "chronicle+srv://kernel?srvNameServer=ns:99999"},
        "CHRONICLE_CONNECTION_STRING: query key 'srvNameServer'",
        cc.ConnectionStringError,
        id="bad-srv-name-server",
    ),
    pytest.param(
        {"CHRONICLE_CONNECTION_STRING": 35000},
        "CHRONICLE_CONNECTION_STRING: must be a str or a ConnectionString, not int",
        cc.ConfigurationError,
        id="string-wrong-type",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {"retyr_attempts": 3}},
        "CHRONICLE_OPTIONS: unknown option 'retyr_attempts' (did you mean 'retry_attempts'?)",
        cc.ConfigurationError,
        id="unknown-option",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {"zzz": 3}},
        "CHRONICLE_OPTIONS: unknown option 'zzz'",
        cc.ConfigurationError,
        id="unknown-option-no-hint",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {"retry_attempts": -1}},
        "CHRONICLE_OPTIONS: retry_attempts must be None (retry forever) or an int >= 0",
        cc.ConfigurationError,
        id="bad-retry-attempts",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {"liveness": "sometimes"}},
        "CHRONICLE_OPTIONS: liveness must be one of auto, keepalive, health, transport",
        cc.ConfigurationError,
        id="bad-liveness",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {"reconnect_base_delay": "1"}},
        "CHRONICLE_OPTIONS: reconnect_base_delay must be a number of seconds, not str",
        cc.ConfigurationError,
        id="delay-wrong-type",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {"auto_connect": "yes"}},
        "CHRONICLE_OPTIONS: auto_connect must be a bool",
        cc.ConfigurationError,
        id="auto-connect-wrong-type",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {"grpc_options": 5}},
        "CHRONICLE_OPTIONS: grpc_options must be a sequence",
        cc.ConfigurationError,
        id="grpc-options-wrong-type",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {"clock": "monotonic"}},
        "CHRONICLE_OPTIONS: clock must be callable, not str",
        cc.ConfigurationError,
        id="clock-not-callable",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {"logger": 3}},
        "CHRONICLE_OPTIONS: AttributeError: ",
        cc.ConfigurationError,
        id="logger-wrong-type",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {"connection_string": "chronicle://kernel"}},
        "CHRONICLE_OPTIONS: give the connection string as CHRONICLE_CONNECTION_STRING",
        cc.ConfigurationError,
        id="string-in-options",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {"server_address": "kernel:35000"}},
        "CHRONICLE_OPTIONS: give connection_string or server_address, not both",
        cc.ConfigurationError,
        id="string-and-server-address",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": [("retry_attempts", 3)]},
        "CHRONICLE_OPTIONS: must be a dict of Connection options, not list",
        cc.ConfigurationError,
        id="options-wrong-type",
    ),
    pytest.param(
        {"CHRONICLE_OPTIONS": {1: 3}},
        "CHRONICLE_OPTIONS: option names must be str, got 1",
        cc.ConfigurationError,
        id="option-name-wrong-type",
    ),
    pytest.param(
        {"CHRONICLE_HANDLE_ERRORS": "no"},
        "CHRONICLE_HANDLE_ERRORS: must be True or False, not str",
        cc.ConfigurationError,
        id="handle-errors-wrong-type",
    ),
]


@pytest.mark.parametrize(("config", "message", "error"), MISCONFIGURATIONS)
def test_misconfiguration_fails_at_init_app(make_app, config, message, error):
    config.setdefault("CHRONICLE_CONNECTION_STRING", "chronicle://127.0.0.1:1?disableTls=true")
    app = make_app(**config)
    ext = Chronicle()
    before = _library_threads()
    with pytest.raises(cc.ConfigurationError) as info:
        ext.init_app(app)
    assert type(info.value) is error
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text
    assert "s3cret" not in text
    assert info.value.option
    # Nothing left behind: no connection, no handler, no thread.
    assert "chronicle" not in app.extensions
    assert not app.error_handler_spec.get(None, {}).get(None)
    assert _library_threads() == before
    with pytest.raises(RuntimeError, match="no Chronicle connection"):
        ext.get_connection(app)


def test_unknown_option_names_the_option(make_app):
    app = make_app(CHRONICLE_OPTIONS={"retyr_attempts": 3})
    with pytest.raises(cc.ConfigurationError) as info:
        Chronicle(app)
    assert info.value.option == "retyr_attempts"
    assert not isinstance(info.value, TypeError)


def test_duplicate_registry_name_fails_at_init_app(make_app, kernel):
    config = {
        "CHRONICLE_CONNECTION_STRING": plaintext(kernel.address),
        "CHRONICLE_OPTIONS": {"name": "flask-dup", "auto_connect": False},
    }
    ext = Chronicle(make_app(**config))
    second = make_app("second", **config)
    with pytest.raises(cc.ConfigurationError, match=r"^CHRONICLE_OPTIONS: .*'flask-dup'") as info:
        ext.init_app(second)
    assert info.value.option == "name"
    assert "chronicle" not in second.extensions


def test_bad_constructor_argument():
    with pytest.raises(cc.ConfigurationError, match="handle_errors must be True or False"):
        Chronicle(handle_errors="no")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- several apps


def test_two_apps_get_their_own_connections(make_app, kernel):
    ext = Chronicle()
    one = kernel_app(make_app, kernel, ext)
    two = kernel_app(make_app, kernel, ext)
    conn_one, conn_two = one.extensions["chronicle"], two.extensions["chronicle"]
    assert conn_one is not conn_two
    with one.app_context():
        assert ext.connection is conn_one
        with two.app_context():
            assert ext.connection is conn_two
        assert ext.connection is conn_one
    with two.test_request_context("/"):
        assert ext.connection is conn_two
    assert ext.get_connection(one) is conn_one
    assert ext.get_connection(two) is conn_two

    for app, conn in ((one, conn_one), (two, conn_two)):
        conn.connect(timeout=10)
        response = app.test_client().get("/version")
        assert response.status_code == 200
        assert response.get_json() == {"version": version(conn.channel())}

    # Closing one app's connection leaves the other's alone.
    ext.close(one)
    assert conn_one.state is S.CLOSED
    assert conn_two.connected
    assert two.test_client().get("/version").status_code == 200


def test_connection_outside_an_app_context(make_app, kernel):
    ext = Chronicle()
    app = kernel_app(make_app, kernel, ext)
    assert not flask.has_app_context()
    with pytest.raises(RuntimeError, match="outside of application context"):
        _ = ext.connection
    with pytest.raises(RuntimeError, match="outside of application context"):
        ext.close()
    with pytest.raises(RuntimeError, match="outside of application context"):
        ext.readiness()
    with make_app("bare").app_context(), pytest.raises(RuntimeError, match="'bare'"):
        _ = ext.connection
    assert ext.get_connection(app).connect(timeout=10).connected


def test_init_app_twice_on_one_app(make_app, kernel):
    ext = Chronicle()
    app = kernel_app(make_app, kernel, ext)
    conn = app.extensions["chronicle"]
    before = _library_threads()
    for again in (ext, Chronicle()):
        with pytest.raises(RuntimeError, match="already registered"):
            again.init_app(app)
    assert app.extensions["chronicle"] is conn
    assert _library_threads() == before


# ---------------------------------------------------------------------------- errors


def test_views_and_503_after_the_kernel_dies(make_app, kernel):
    app = kernel_app(make_app, kernel)
    client = app.test_client()
    conn = app.extensions["chronicle"]
    conn.connect(timeout=10)
    for path in ("/version", "/managed", "/raw"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.get_data(as_text=True))
        assert response.get_json()["version"]

    kernel.kill()
    wait_state(conn, S.RECONNECTING, timeout=10)
    assert_503(client.get("/version"), "reconnecting")  # NotConnectedError
    assert_503(client.get("/managed"), "reconnecting")  # CallError, UNAVAILABLE
    assert_503(client.get("/raw"), "reconnecting")  # gRPC's own UNAVAILABLE
    assert_503(client.get("/closed"), "reconnecting")  # a ConnectionClosedError

    kernel.restart()
    conn.connect(timeout=10)
    assert client.get("/version").status_code == 200


def test_503_for_connect_timeout_and_exhausted_retries(make_app, kernel):
    app = kernel_app(make_app, kernel)
    ext_conn = app.extensions["chronicle"]

    @app.get("/timeout")
    def timeout_view() -> Any:
        raise cc.ConnectTimeoutError("no kernel within 2 s")

    @app.get("/exhausted")
    def exhausted_view() -> Any:
        raise cc.RetriesExhaustedError("gave up", attempts=3)

    ext_conn.connect(timeout=10)
    client = app.test_client()
    assert_503(client.get("/timeout"), "connected")
    assert_503(client.get("/exhausted"), "connected")


def test_other_grpc_errors_are_not_turned_into_503(make_app, kernel, caplog):
    app = kernel_app(make_app, kernel, TESTING=False)
    client = app.test_client()
    app.extensions["chronicle"].connect(timeout=10)

    # Not testing, no propagation: Flask logs the original error and answers 500.
    with caplog.at_level(logging.ERROR, logger=app.logger.name):
        for path in ("/invalid", "/unimplemented"):
            response = client.get(path)
            assert response.status_code == 500, path
            assert "Retry-After" not in response.headers
    logged = [
        record.exc_info[1]
        for record in caplog.records
        if record.name == app.logger.name and record.exc_info
    ]
    assert isinstance(logged[0], FakeRpcError)
    assert logged[0].code() is grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(logged[1], grpc.RpcError)
    assert logged[1].code() is grpc.StatusCode.UNIMPLEMENTED

    # Testing (so PROPAGATE_EXCEPTIONS): the very error reaches the test client.
    app.config["TESTING"] = True
    with pytest.raises(FakeRpcError) as info:
        client.get("/invalid")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as real:
        client.get("/unimplemented")
    assert real.value.code() is grpc.StatusCode.UNIMPLEMENTED

    app.config.update(TESTING=False, PROPAGATE_EXCEPTIONS=True)
    with pytest.raises(FakeRpcError):
        client.get("/invalid")


def _misbehaving_app(make_app, ext: Chronicle | None, setup: str, **config: Any) -> flask.Flask:
    """An app whose views raise gRPC errors that are not UNAVAILABLE, with ``setup``'s
    own error handlers, and ``ext`` (if any) initialised after them."""
    app = make_app(
        CHRONICLE_CONNECTION_STRING="chronicle://127.0.0.1:1?disableTls=true",
        CHRONICLE_OPTIONS={"auto_connect": False},
        **config,
    )

    @app.get("/<code>")
    def fail(code: str) -> Any:
        if code == "bare":
            raise grpc.RpcError("no status at all")
        if code == "hand-pending":
            call = cc.CallError(details="pending", issue=lambda generation, timeout: None)
            app.config["PENDING"] = call
            raise call
        raise FakeRpcError(grpc.StatusCode[code.upper()])

    if setup == "exception-handler":

        @app.errorhandler(Exception)
        def any_error(error: Exception) -> Any:
            return {"handled": type(error).__name__, "text": str(error)}, 418

    elif setup == "500-handler":

        @app.errorhandler(500)
        def server_error(error: InternalServerError) -> Any:
            original = error.original_exception
            return {"500": type(original).__name__}, 500

    if ext is not None:
        ext.init_app(app)
    return app


@pytest.mark.parametrize("setup", ["none", "exception-handler", "500-handler"])
@pytest.mark.parametrize("testing", [False, True])
@pytest.mark.parametrize("path", ["/invalid_argument", "/internal", "/not_found", "/bare"])
def test_other_grpc_errors_behave_as_without_the_extension(make_app, setup, testing, path):
    """Whatever Flask does with such an error without the extension, it does with it."""
    outcomes = []
    for ext in (None, Chronicle()):
        app = _misbehaving_app(make_app, ext, setup, TESTING=testing)
        try:
            response = app.test_client().get(path)
        except grpc.RpcError as exc:
            outcomes.append(("raised", type(exc).__name__, str(exc)))
        else:
            outcomes.append((response.status_code, response.get_data(as_text=True)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] != 503


def test_user_handler_still_sees_the_original_error(make_app):
    ext = Chronicle()
    app = _misbehaving_app(make_app, ext, "exception-handler")

    @app.get("/down")
    def down() -> Any:
        raise cc.NotConnectedError("down", state=S.RECONNECTING)

    client = app.test_client()
    response = client.get("/invalid_argument")
    assert response.status_code == 418
    assert response.get_json() == {"handled": "FakeRpcError", "text": "fake INVALID_ARGUMENT"}
    assert_503(client.get("/unavailable"), "idle")  # ours is the narrower handler
    assert_503(client.get("/down"), "idle")


def test_a_pending_call_raised_by_hand_is_not_waited_for(make_app):
    # code() on a pending CallError would block until it is sent: not in a handler.
    app = _misbehaving_app(make_app, Chronicle(), "exception-handler")
    try:
        response = app.test_client().get("/hand-pending")
        assert app.config["PENDING"].pending
    finally:
        app.config["PENDING"].cancel()
    assert response.status_code == 418
    assert response.get_json()["handled"] == "CallError"


def test_the_applications_own_handlers_win(make_app):
    before = make_app("before", TESTING=True)
    before.config["CHRONICLE_OPTIONS"] = {"auto_connect": False}

    @before.errorhandler(grpc.RpcError)
    def mine(error: Exception) -> Any:
        return "mine", 599

    @before.get("/")
    def view() -> Any:
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)

    @before.get("/down")
    def down() -> Any:
        raise cc.NotConnectedError("down")

    Chronicle(before)
    assert before.error_handler_spec[None][None][grpc.RpcError] is mine
    client = before.test_client()
    assert client.get("/").status_code == 599  # kept, though registered first
    assert_503(client.get("/down"), "idle")  # the other classes are still ours

    after = make_app("after", TESTING=True, CHRONICLE_OPTIONS={"auto_connect": False})
    after.add_url_rule("/", view_func=view)
    Chronicle(after)
    after.register_error_handler(grpc.RpcError, mine)
    assert after.test_client().get("/").status_code == 599  # replaces ours


def test_errors_not_handled_when_turned_off(make_app, kernel):
    apps = [
        kernel_app(make_app, kernel, Chronicle(handle_errors=False), TESTING=False),
        kernel_app(make_app, kernel, CHRONICLE_HANDLE_ERRORS=False, TESTING=False),
    ]
    for app in apps:
        assert not app.error_handler_spec.get(None, {}).get(None)
        app.extensions["chronicle"].connect(timeout=10)
    kernel.kill()
    for app in apps:
        wait_state(app.extensions["chronicle"], S.RECONNECTING, timeout=10)
        client = app.test_client()
        for path in ("/version", "/managed", "/closed"):
            response = client.get(path)
            assert response.status_code == 500, path
            assert "Retry-After" not in response.headers

    # The extension-wide switch, and CHRONICLE_HANDLE_ERRORS=True, do not turn it back on.
    on_here = kernel_app(
        make_app, kernel, Chronicle(handle_errors=False), CHRONICLE_HANDLE_ERRORS=True
    )
    assert not on_here.error_handler_spec.get(None, {}).get(None)


# ---------------------------------------------------------------------------- readiness


def test_readiness_across_a_crash_and_a_restart(make_app, kernel):
    ext = Chronicle()
    secret = f"chronicle://{kernel.address}?disableTls=true&apiKey=s3cret"
    app = kernel_app(make_app, kernel, ext, CHRONICLE_CONNECTION_STRING=secret)
    app.register_blueprint(ext.readiness_blueprint())
    client = app.test_client()
    conn = ext.get_connection(app)
    conn.connect(timeout=10)

    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "state": "connected"}
    assert response.headers["Cache-Control"] == "no-store"
    assert client.head("/readyz").status_code == 200

    kernel.kill()
    wait_state(conn, S.RECONNECTING, timeout=10)
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["state"] == "reconnecting"
    assert isinstance(body["last_error"], str)
    assert 0 < len(body["last_error"]) <= 200
    assert "s3cret" not in response.get_data(as_text=True)
    assert "s3cret" not in client.get("/version").get_data(as_text=True)

    kernel.restart()
    conn.connect(timeout=10)
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "state": "connected"}


def test_readiness_rearms_a_connection_that_gave_up(make_app, kernel):
    ext = Chronicle()
    options = {**FAST, "retry_attempts": 0}
    app = kernel_app(make_app, kernel, ext, CHRONICLE_OPTIONS=options)
    app.add_url_rule("/ready", view_func=ext.readiness)
    client = app.test_client()
    conn = ext.get_connection(app)
    conn.connect(timeout=10)
    assert client.get("/ready").status_code == 200

    kernel.kill()
    wait_state(conn, S.FAILED, timeout=10)
    kernel.restart()
    # Nothing else asks for the connection: only the probe can re-arm it.
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.get_json()["state"] == "failed"
    wait_state(conn, S.CONNECTED, timeout=10)
    assert client.get("/ready").get_json() == {"status": "ok", "state": "connected"}


def test_readiness_blueprint_on_two_apps(make_app, kernel):
    ext = Chronicle()
    blueprint = ext.readiness_blueprint("/health/ready", name="probe")
    apps = [kernel_app(make_app, kernel, ext) for _ in range(2)]
    for app in apps:
        app.register_blueprint(blueprint)
        assert "probe.readiness" in app.view_functions
    apps[0].extensions["chronicle"].connect(timeout=10)
    ext.close(apps[1])
    assert apps[0].test_client().get("/health/ready").status_code == 200
    response = apps[1].test_client().get("/health/ready")
    assert response.status_code == 503
    assert response.get_json()["state"] == "closed"


def test_close(make_app, kernel):
    ext = Chronicle()
    app = kernel_app(make_app, kernel, ext)
    app.register_blueprint(ext.readiness_blueprint())
    client = app.test_client()
    conn = ext.get_connection(app)
    conn.connect(timeout=10)

    # Requests and app contexts come and go; the connection stays.
    for _ in range(3):
        assert client.get("/version").status_code == 200
        with app.app_context():
            pass
    assert conn.connected
    assert conn._threads()

    with app.app_context():
        ext.close()
    assert conn.state is S.CLOSED
    assert conn._threads() == []
    ext.close(app)  # idempotent
    assert ext.get_connection(app) is conn
    assert_503(client.get("/version"), "closed")  # ConnectionClosedError
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["state"] == "closed"
