"""chronicle_conn.contrib.django against a real dev kernel: settings, system checks,
get_connection(), a view under Django's test client and under real gunicorn workers,
and the django-health-check check.

Django is set up once for this module from ``tests/django_project/settings.py`` (no
``CHRONICLE_CONNECTIONS`` there); each test gives its own through
``override_settings``, whose exit closes the connections it built. What needs a fresh
process (``manage.py check``, gunicorn, fork) runs in a subprocess.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.importorskip("django")

import django
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from django.test.utils import override_settings

import chronicle_conn as cc
from chronicle_conn.contrib.django import (
    UnknownAliasError,
    _conf,
    connections,
    get_connection,
)
from chronicle_conn.contrib.django.checks import check_connections
from tests.helpers import plaintext, version, wait_state

S = cc.ConnectionState
ROOT = Path(__file__).resolve().parents[1]
MANAGE = ROOT / "tests" / "django_project" / "manage.py"
SETTINGS_MODULE = "tests.django_project.settings"
URLCONF = "tests.django_project.urls"
# Variables of the test project's settings, removed from every child's environment.
PROJECT_VARS = ("CHRONICLE_CONNECTION_STRING", "CHRONICLE_TEST_CONNECTIONS")


@pytest.fixture(scope="module", autouse=True)
def _django() -> Iterator[None]:
    if not settings.configured:
        saved = {name: os.environ.pop(name, None) for name in PROJECT_VARS}
        previous = os.environ.get("DJANGO_SETTINGS_MODULE")
        os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
        try:
            django.setup()
        finally:
            if previous is None:
                del os.environ["DJANGO_SETTINGS_MODULE"]
            else:
                os.environ["DJANGO_SETTINGS_MODULE"] = previous
            os.environ.update({k: v for k, v in saved.items() if v is not None})
    yield
    connections.close_all()


def _alias(address: str, **options: Any) -> dict[str, Any]:
    return {"CONNECTION_STRING": plaintext(address), "OPTIONS": {"retry_attempts": None, **options}}


@pytest.fixture
def configure() -> Iterator[Any]:
    """``configure(value)``: ``CHRONICLE_CONNECTIONS = value`` (and the test project's
    URLs) until the end of the test. Every connection built meanwhile must be closed,
    with no thread left, once the override ends."""
    overrides: list[override_settings] = []
    built: list[cc.Connection] = []

    def apply(value: object) -> None:
        override = override_settings(CHRONICLE_CONNECTIONS=value, ROOT_URLCONF=URLCONF)
        override.enable()
        overrides.append(override)

    yield apply
    built.extend(connections.all(initialized_only=True))
    for override in reversed(overrides):
        override.disable()  # setting_changed: connections.close_all()
    assert connections.all(initialized_only=True) == []
    for conn in built:
        assert conn.state is S.CLOSED
        assert conn._threads() == [], conn._threads()


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_VARS}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(extra)
    return env


# ---------------------------------------------------------------------- manage.py check


BAD_ALIASES = {
    "default": {"CONNECTION_STRING": "chronicle://app:s3cret@127.0.0.1:1?disableTls=maybe"},
    "main": {"OPTIONS": {"retry_attempt": 3}},
}
#: name: (environment, exit code, the needles of each check error line, in order)
CHECK_CASES = {
    "good": ({"CHRONICLE_CONNECTION_STRING": plaintext("127.0.0.1:1")}, 0, []),
    "bad string, unknown option": (
        {"CHRONICLE_TEST_CONNECTIONS": json.dumps(BAD_ALIASES)},
        1,
        [
            ["(chronicle_conn.E004)", "CHRONICLE_CONNECTIONS['default']['CONNECTION_STRING']"],
            ["(chronicle_conn.E005)", "['main']['OPTIONS']", "'retry_attempt'", "'retry_attempts'"],
        ],
    ),
    "not a dict": (
        {"CHRONICLE_TEST_CONNECTIONS": json.dumps(["chronicle://127.0.0.1:1"])},
        1,
        [["(chronicle_conn.E001)", "CHRONICLE_CONNECTIONS must be a dict", "not list"]],
    ),
}


def test_manage_py_check_passes_good_settings_and_names_the_alias_of_bad_ones():
    """Each case in its own ``manage.py check`` process (all at once): exit 0 and no
    issue for a good setting, exit 1 and a one-line error naming the alias and the key
    for a bad one, never a traceback and never the secret. (The other kinds of error
    are checked in this process, below.)"""
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(MANAGE), "check"],
            env=_child_env(**variables),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (variables, _, _) in CHECK_CASES.items()
    }
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=30)
            _, code, needles = CHECK_CASES[name]
            text = out + err
            assert proc.returncode == code, (name, text)
            assert "Traceback" not in text, (name, text)
            assert "s3cret" not in text, (name, text)
            if code == 0:
                assert "System check identified no issues" in text, (name, text)
                continue
            lines = [line for line in text.splitlines() if "(chronicle_conn.E" in line]
            assert len(lines) == len(needles), (name, text)
            for line, line_needles in zip(lines, needles, strict=True):
                for needle in line_needles:
                    assert needle in line, (name, needle, line)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_importing_it_needs_neither_settings_nor_django_health_check():
    """No settings module, django-health-check hidden: the package and its app import
    (and build nothing); only the health module says what it needs."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["health_check"] = None  # as if not installed
        import chronicle_conn.contrib.django as contrib
        import chronicle_conn.contrib.django.apps
        import chronicle_conn.contrib.django.checks
        assert contrib.connections.all(initialized_only=True) == []
        try:
            import chronicle_conn.contrib.django.health
        except ImportError as exc:
            print("RESULT", exc)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "RESULT chronicle_conn.contrib.django.health needs django-health-check >= 4 "
        "(pip install 'django-health-check>=4')"
    ), proc.stdout + proc.stderr


# ---------------------------------------------------------------------- checks in process


def _errors(value: object) -> list[tuple[str, str]]:
    with override_settings(CHRONICLE_CONNECTIONS=value):
        return [(error.id, error.msg) for error in check_connections()]


@pytest.mark.parametrize(
    ("value", "expected_id", "needles"),
    [
        ("chronicle://127.0.0.1:1", "E001", ["not str"]),
        ({3: {}}, "E002", ["alias 3", "non-empty strings"]),
        ({"": {}}, "E002", ["non-empty strings"]),
        ({"x": None}, "E002", ["['x'] must be a dict", "not NoneType"]),
        ({"x": {"connection_string": "y"}}, "E003", ["did you mean 'CONNECTION_STRING'"]),
        ({"x": {"CONNECTION_STRING": 35000}}, "E004", ["must be a str", "not int"]),
        ({"x": {"CONNECTION_STRING": "http://h:1"}}, "E004", ["['x']['CONNECTION_STRING']"]),
        ({"x": {"CONNECTION_STRING": "chronicle://h?caPath=/nope"}}, "E004", ["caPath"]),
        (
            {"x": {"CONNECTION_STRING": "chronicle+srv://kernels?srvNameServer=ns:99999"}},
            "E004",
            ["srvNameServer"],
        ),
        ({"x": {"OPTIONS": [("retry_attempts", 1)]}}, "E005", ["must be a dict", "not list"]),
        ({"x": {"OPTIONS": {"connection_string": "y"}}}, "E005", ["['x']['CONNECTION_STRING']"]),
        ({"x": {"OPTIONS": {"retries": 1}}}, "E005", ["'retries'", "valid keys:"]),
        ({"x": {"OPTIONS": {"retry_attempts": -1}}}, "E006", ["['retry_attempts']", "-1"]),
        ({"x": {"OPTIONS": {"attempt_timeout": "5"}}}, "E006", ["['attempt_timeout']"]),
        ({"x": {"OPTIONS": {"reconnect_base_delay": 60}}}, "E006", ["reconnect_max_delay"]),
        ({"x": {"OPTIONS": {"auto_connect": "no"}}}, "E006", ["['auto_connect']", "'no'"]),
        ({"x": {"OPTIONS": {"name": ""}}}, "E006", ["['name']"]),
        ({"x": {"OPTIONS": {"on_retries_exhausted": "a.b"}}}, "E006", ["on_retries_exhausted"]),
        (
            {"x": {"OPTIONS": {"name": "n"}}, "y": {"OPTIONS": {"name": "n"}}},
            "E007",
            ["['y']['OPTIONS']['name']", "alias 'x'"],
        ),
    ],
)
def test_every_bad_setting_is_one_check_error_on_one_line(value, expected_id, needles):
    errors = _errors(value)
    assert [error_id for error_id, _ in errors] == [f"chronicle_conn.{expected_id}"], errors
    message = errors[0][1]
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_good_settings_pass_the_checks_without_connecting_or_registering():
    # Threads of other tests' connections (and the process-wide deadline timer) may
    # still be ending: only new ones count.
    before = set(threading.enumerate())
    value = {
        "default": {},
        "a": {"CONNECTION_STRING": cc.ConnectionString.parse("chronicle://127.0.0.1:1")},
        "b": {"CONNECTION_STRING": None, "OPTIONS": None},
        "c": _alias("127.0.0.1:1", name="django-c", liveness="health", grpc_options={"x": 1}),
    }
    assert _errors(value) == []
    assert _errors(None) == []  # absent: {"default": {}}
    assert "django-c" not in cc.registry  # the dry run did not take the name
    new = set(threading.enumerate()) - before
    assert [t.name for t in new if t.name.startswith("chronicle_conn-supervisor")] == []
    assert connections.all(initialized_only=True) == []


def test_a_secret_is_never_in_a_check_message():
    errors = _errors({"x": {"CONNECTION_STRING": "chronicle://app:s3cret@h:1?apiKey=k3y&x=1"}})
    assert len(errors) == 1
    assert "s3cret" not in errors[0][1]
    assert "k3y" not in errors[0][1]


# ---------------------------------------------------------------------- get_connection


def test_get_connection_is_lazy_and_returns_the_same_connection(configure, kernel):
    assert connections.all(initialized_only=True) == []  # nothing at import or setup
    configure({"default": _alias(kernel.address)})
    assert connections.all(initialized_only=True) == []
    conn = get_connection()
    assert isinstance(conn, cc.Connection)
    assert get_connection() is conn
    assert get_connection("default") is conn
    assert connections["default"] is conn
    assert list(connections) == ["default"]
    assert "default" in connections
    assert connections.all() == [conn]
    conn.connect(timeout=10)
    assert version(conn.channel())


def test_get_connection_builds_one_connection_for_50_racing_threads(configure, monkeypatch):
    configure({"default": {"CONNECTION_STRING": "chronicle://127.0.0.1:1", "OPTIONS": {}}})
    built: list[cc.Connection] = []

    def counting(*args: Any, **kwargs: Any) -> cc.Connection:
        conn = cc.Connection(*args, **kwargs)
        built.append(conn)
        return conn

    monkeypatch.setattr(_conf, "Connection", counting)
    barrier = threading.Barrier(50)

    def race() -> cc.Connection:
        barrier.wait(10)
        return get_connection()

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: race(), range(50)))
    assert len(built) == 1
    assert all(result is built[0] for result in results)


def test_unknown_and_invalid_aliases_raise_improperly_configured(configure):
    configure({"default": {}, "audit": {"OPTIONS": {"retry_attempts": -1}}})
    with pytest.raises(UnknownAliasError) as info:
        get_connection("reports")
    assert isinstance(info.value, ImproperlyConfigured)
    assert info.value.alias == "reports"
    assert str(info.value) == (
        "no Chronicle connection alias 'reports' in CHRONICLE_CONNECTIONS "
        "(configured: 'default', 'audit')"
    )
    with pytest.raises(ImproperlyConfigured, match=r"\['audit'\]\['OPTIONS'\]\['retry_attempts'\]"):
        get_connection("audit")
    with pytest.raises(ImproperlyConfigured) as info:
        get_connection("audit")  # not cached: every use says so
    assert isinstance(info.value.__cause__, cc.ConfigurationError)
    assert connections.all(initialized_only=True) == []


def test_a_setting_that_is_not_a_dict_raises_improperly_configured(configure):
    configure("chronicle://127.0.0.1:1")
    with pytest.raises(ImproperlyConfigured, match="must be a dict"):
        get_connection()


def test_overriding_the_setting_closes_the_connections_built_before(configure, kernel):
    configure({"default": _alias(kernel.address)})
    first = get_connection()
    configure({"default": _alias(kernel.address, name="django-override")})
    assert first.state is S.CLOSED
    second = get_connection()
    assert second is not first
    assert second.name == "django-override"
    assert cc.registry.get("django-override") is second


def test_a_forked_child_gets_a_fresh_handler_lock(kernel):
    """A thread holds the handler's lock when the process forks: the child can still
    build and use connections (its own lock), with the same connection object."""
    script = textwrap.dedent(
        """
        import os, signal, sys, threading
        from chronicle_conn.contrib.django import ConnectionHandler
        from tests.helpers import version

        handler = ConnectionHandler({"default": {"CONNECTION_STRING": sys.argv[1]}})
        conn = handler["default"]
        conn.connect(timeout=10)
        held, release = threading.Event(), threading.Event()

        def hold():
            with handler._lock:
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(5)
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                signal.alarm(15)
                assert handler["default"] is conn
                assert handler.all(initialized_only=True) == [conn]  # takes the lock
                conn.connect(timeout=10)
                version(conn.channel())
                handler.close_all()
                code = 0
            finally:
                os._exit(code)
        release.set()
        holder.join(5)
        _, status = os.waitpid(pid, 0)
        version(conn.channel())
        handler.close_all()
        print("RESULT child", os.waitstatus_to_exitcode(status))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, plaintext(kernel.address)],
        cwd=ROOT,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert results == ["RESULT child 0"], proc.stdout + proc.stderr


# ---------------------------------------------------------------------- a view


def test_a_view_uses_the_connection_and_fails_fast_while_the_kernel_is_down(configure, kernel):
    configure({"default": _alias(kernel.address)})
    client = Client()
    response = client.get("/version/")
    assert response.status_code == 200, response.content
    conn = get_connection()
    assert response.json()["connection"] == id(conn)
    assert response.json()["version"] == version(conn.channel())

    kernel.kill()
    wait_state(conn, S.RECONNECTING)
    response = client.get("/version/?wait=0")
    assert response.status_code == 503
    assert response.json() == {"error": "ConnectTimeoutError", "state": "reconnecting"}

    kernel.restart()
    response = client.get("/version/")  # waits (at most 5 s) for the reconnect
    assert response.status_code == 200, response.content
    assert response.json()["connection"] == id(conn)
    assert get_connection() is conn


# ---------------------------------------------------------------------- django-health-check


def _health_check() -> Any:
    pytest.importorskip("health_check")
    from chronicle_conn.contrib.django.health import Chronicle

    return Chronicle


def test_the_health_check_is_up_when_connected_and_down_with_the_state_after_a_kill(
    configure, kernel
):
    from health_check.exceptions import ServiceUnavailable

    chronicle = _health_check()
    address = kernel.address
    secret = f"chronicle://{address}?disableTls=true&apiKey=s3cret"  # the kernel ignores it
    configure({"default": {"CONNECTION_STRING": secret, "OPTIONS": {"retry_attempts": None}}})
    check = chronicle(wait=datetime.timedelta(seconds=0.3))
    assert repr(check) == "Chronicle(alias='default')"
    conn = get_connection()
    conn.connect(timeout=10)
    check.run()
    result = asyncio.run(check.get_result())
    assert result.error is None

    kernel.kill()
    wait_state(conn, S.RECONNECTING)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as info:
        check.run()
    assert time.monotonic() - started < 3.0  # about wait (0.3 s); well under the 5 s timeout
    message = str(info.value)
    assert message.startswith("Unavailable: not connected after 0.3 s: state reconnecting;")
    assert "last error:" in message
    assert "s3cret" not in message
    result = asyncio.run(check.get_result())
    assert isinstance(result.error, ServiceUnavailable)

    kernel.restart()
    chronicle(wait=datetime.timedelta(seconds=10)).run()  # its demand redials at once
    assert conn.connected


def test_the_health_check_reports_an_unknown_alias_and_a_kernel_never_up(configure):
    from health_check.exceptions import ServiceUnavailable

    chronicle = _health_check()
    configure({"default": _alias("127.0.0.1:1")})
    with pytest.raises(ServiceUnavailable, match="not configured: no Chronicle connection alias"):
        chronicle(alias="nope").run()
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=r"state (connecting|reconnecting); last error"):
        chronicle(wait=datetime.timedelta(seconds=0.2)).run()
    assert time.monotonic() - started < 3.0


def test_the_health_check_view(configure, kernel):
    _health_check()
    configure({"default": _alias(kernel.address)})
    client = Client()
    response = client.get("/health/?format=json")
    assert response.status_code == 200, response.content
    assert response.json() == {"Chronicle(alias='default')": "OK"}

    kernel.kill()
    wait_state(get_connection(), S.RECONNECTING)
    response = client.get("/health/?format=json")
    assert response.status_code == 500
    [(check, report)] = response.json().items()
    assert check == "Chronicle(alias='default')"
    assert report.startswith("Unavailable: not connected after 1 s: state reconnecting;")


# ---------------------------------------------------------------------- gunicorn


class _Gunicorn:
    """``gunicorn tests.django_project.wsgi`` on a port the OS picks, its output read by
    a thread (lines go to a queue, so that waiting for one never sleeps)."""

    def __init__(self, address: str) -> None:
        import gunicorn.config

        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "tests.django_project.wsgi:application",
            "--workers",
            "2",
            "--threads",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--graceful-timeout",
            "10",
        ]
        if any(s.name == "control_socket_disable" for s in gunicorn.config.KNOWN_SETTINGS):
            argv.append("--no-control-socket")  # gunicorn >= 25: none in ~/.gunicorn
        env = _child_env(
            DJANGO_SETTINGS_MODULE=SETTINGS_MODULE, CHRONICLE_CONNECTION_STRING=plaintext(address)
        )
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: workers and all
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no {pattern!r} from gunicorn:\n{''.join(self.log)}")

    def close(self) -> None:
        """Kill whatever is left of the master and its workers (after a clean stop:
        nothing)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(10)


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_view_under_gunicorn_workers(kernel):
    """Two gthread workers, each with its own connection built on its first request,
    serve 50 requests that each make a real RPC; SIGTERM then stops them cleanly."""
    pytest.importorskip("gunicorn")
    server = _Gunicorn(kernel.address)
    try:
        port = server.wait_for_line(r"Listening at: http://127\.0\.0\.1:(\d+)", 20).group(1)
        base = f"http://127.0.0.1:{port}"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: _get(f"{base}/version/"), range(50)))
        assert [status for status, _ in results] == [200] * 50, results
        with grpc.insecure_channel(kernel.address) as channel:
            expected = version(channel)
        assert {body["version"] for _, body in results} == {expected}
        # One connection per worker process, whichever thread served the request.
        per_worker: dict[int, set[int]] = {}
        for _, body in results:
            per_worker.setdefault(body["pid"], set()).add(body["connection"])
        assert all(len(ids) == 1 for ids in per_worker.values()), per_worker
        status, body = _get(f"{base}/health/?format=json")
        assert (status, body) == (200, {"Chronicle(alias='default')": "OK"})

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0, "".join(server.log)
        server.wait_for_line(r"Shutting down: Master", 5)
        assert "Traceback" not in "".join(server.log), "".join(server.log)
    finally:
        server.close()
