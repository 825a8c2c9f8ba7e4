"""A real etcd member (Debian's ``etcd-server``, a Go gRPC server) in a child process.

etcd is a gRPC implementation nobody on this project wrote: its client port serves
``grpc.health.v1.Health`` (status SERVING for service ``""``) next to etcd's own services,
so it is a second, independent peer for the connection manager. One member runs on
loopback only, on a free client port kept for the life of the object (``restart()``
comes back on it), with a temporary data directory, and logs JSON to stderr at ``warn``
(one line per start). Nothing outside that temporary directory is touched.

Raw-bytes helpers are included for etcd's own RPCs, so tests need no generated etcd
protos: ``STATUS`` (unary, an empty request) and ``WATCH`` (a bidi stream that stays
open, a call that can be in flight when the member dies).

Facts measured with etcd 3.4.23 (grpc-go 1.33.3), grpcio 1.85:

- ``start()`` to a SERVING health check: ~110-150 ms with the fast election used here
  (default election timing: 0.1-0.7 s); ``restart(keep_data=True)``: ~170-250 ms.
- SIGKILL: an open stream ends UNAVAILABLE ``"Stream removed (Socket closed)"`` within a
  few ms; a new fail-fast call is UNAVAILABLE ``"failed to connect to all addresses; ...
  Connection refused"``.
- SIGTERM: etcd logs "received signal; shutting down", sends GOAWAY, then *closes every
  connection* (its cmux listener's close makes it call ``grpc.Server.Stop()``), and exits
  in ~5-12 ms by re-raising SIGTERM (exit code -15). In-flight streams are not drained:
  they end UNAVAILABLE like after SIGKILL.
- etcd enforces a 5 s minimum between client keepalive pings (``--grpc-keepalive-min-time``):
  faster pings get GOAWAY ``too_many_pings``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from .ports import check_loopback, free_port

__all__ = [
    "BINARY_ENV",
    "INSTALL_HINT",
    "PUT",
    "STATUS",
    "WATCH",
    "EtcdError",
    "EtcdProcess",
    "EtcdStartError",
    "decode_fields",
    "encode_put",
    "encode_watch_create",
    "find_etcd",
    "require_etcd",
    "status_version",
]

BINARY_ENV = "CHRONICLE_ETCD_BINARY"  # an explicit etcd binary; else ``etcd`` on PATH
INSTALL_HINT = "apt-get install -y etcd-server"

# etcd's own RPCs, called with raw bytes (no generated protos needed).
STATUS = "/etcdserverpb.Maintenance/Status"  # unary; request b"" (StatusRequest{})
WATCH = "/etcdserverpb.Watch/Watch"  # bidi stream; see encode_watch_create()
PUT = "/etcdserverpb.KV/Put"  # unary; see encode_put()

# The default election timing makes a single member wait up to 1 s to elect itself;
# 10 ms ticks / 100 ms election bring start-up to ~0.1 s. Nothing else to elect with.
_FAST_ELECTION = ("--heartbeat-interval", "10", "--election-timeout", "100")
_BIND_FAILURE = re.compile(r"listen tcp (?P<addr>\S+): bind: address already in use")
_STDERR_TAIL = 6000
_PROBE_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # never share a subchannel with the test's
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 200),
]


class EtcdError(RuntimeError):
    """The etcd process misbehaved; the message carries its command line and stderr."""


class EtcdStartError(EtcdError):
    """etcd exited, or did not answer a health check with SERVING, within the timeout."""


def find_etcd() -> str | None:
    """The etcd binary: ``$CHRONICLE_ETCD_BINARY`` if set (``None`` if that is not an
    executable file), else ``etcd`` on ``PATH``, else ``None``."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    return shutil.which("etcd")


def require_etcd() -> str:
    """The etcd binary, or end the current test: skipped when etcd is missing, but failed
    when ``CI=true`` (CI must install it). Call only inside a test or fixture."""
    import pytest

    binary = find_etcd()
    if binary is None:
        where = os.environ.get(BINARY_ENV) or "etcd on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(f"etcd not found ({where}) and CI=true: CI must run `{INSTALL_HINT}`")
        pytest.skip(f"etcd not found ({where}); install it with `{INSTALL_HINT}`")
    return binary


class EtcdProcess:
    """One single-member etcd in a child process, on a fixed loopback client port.

    The client port is chosen once (``port=None``: a free one) and kept for the life of
    the object. The peer port (needed by etcd, unused by tests) is a free one per start.
    Each start gets a fresh data directory unless ``restart(keep_data=True)``.

    Not thread-safe. Every blocking method has a bounded timeout. ``close()`` (also run
    when the object is garbage collected or the interpreter exits) kills the child and
    removes the temporary directory; the stderr read so far stays available.

    Args:
        port: the client port; ``None`` picks a free one.
        binary: the etcd executable; ``None`` uses ``find_etcd()``.
        host: ``127.0.0.1`` or ``::1``.
        log_level: etcd's ``--log-level`` (``debug``/``info``/``warn``/``error``).
        extra_args: more etcd flags, appended (a repeated flag wins over the default).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | None = None,
        host: str = "127.0.0.1",
        log_level: str = "warn",
        extra_args: Sequence[str] = (),
        tls: tuple[str, str, str] | None = None,
    ) -> None:
        self.host = check_loopback(host)
        #: (certificate file, key file, CA file): serve the client port over TLS.
        self.tls = tls
        self._auto_port = port is None
        self.port = free_port(host) if port is None else int(port)
        found = binary or find_etcd()
        if found is None:
            raise EtcdError(f"etcd not found; install it with `{INSTALL_HINT}`")
        self.binary = found
        self.log_level = log_level
        self.extra_args = tuple(extra_args)
        self.peer_port = 0
        self.starts = 0  # children spawned, including ones that failed to start
        self.bind_failures = 0
        self.last_start_seconds: float | None = None  # spawn to SERVING, last good start
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="chronicle-etcd-"))
        self._stderr_path = self._dir / "stderr"
        self._stderr_path.touch()
        self._stderr_offset = 0
        self._stderr_kept = ""  # the stderr, saved by close() before the directory goes
        self._data_dir: Path | None = None
        self._closed = False
        # Mutated in place so the finalizer (which must not hold self) sees every child.
        self._children: list[subprocess.Popen[bytes]] = []
        self._finalizer = weakref.finalize(self, _cleanup, self._children, self._dir)

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"<EtcdProcess {self.address} pid {self.pid} {state}>"

    # -- properties ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` of the client port, for ``grpc.insecure_channel``."""
        return f"{_bracket(self.host)}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def data_dir(self) -> Path | None:
        """The current (or last) child's data directory."""
        return self._data_dir

    @property
    def stdout_noise(self) -> list[str]:
        """Always empty (etcd's stdout is discarded); lets the failure-report hook in
        ``tests/conftest.py`` treat this object like a ``KernelProcess``."""
        return []

    def build_argv(self) -> list[str]:
        """The child's command line for the current ports and data directory."""
        client = f"{'https' if self.tls else 'http'}://{self.address}"
        peer = f"http://{_bracket(self.host)}:{self.peer_port}"
        tls_args = (f"--cert-file={self.tls[0]}", f"--key-file={self.tls[1]}") if self.tls else ()
        return [
            self.binary,
            "--name=chronicle-test",
            f"--data-dir={self._data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=chronicle-test={peer}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-outputs=stderr",
            f"--log-level={self.log_level}",
            "--enable-grpc-gateway=false",  # else etcd dials its own client port
            *_FAST_ELECTION,
            *tls_args,
            *self.extra_args,
        ]

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> EtcdProcess:
        """Spawn etcd and block until a health check answers SERVING. Returns ``self``.

        A busy peer port is replaced at once; with ``port=None`` so is a busy client port.

        Raises:
            EtcdStartError: etcd exited first, or was not serving within ``timeout`` (it
                is then killed). The message has the command line and etcd's stderr.
        """
        self._check_open()
        if self.running:
            raise EtcdError(f"etcd already running (pid {self.pid}) on {self.address}")
        self._start(timeout, bind_retry=0.0, keep_data=False)
        return self

    def restart(
        self, timeout: float = 15.0, *, bind_retry: float = 5.0, keep_data: bool = False
    ) -> EtcdProcess:
        """SIGKILL the child if it runs, then start a new one on the same client port.

        ``keep_data=False`` (default): a fresh data directory (a new cluster, ~0.12 s).
        ``keep_data=True``: the same one, and the same peer port (~0.2 s; etcd replays
        its log). A client port that is briefly busy is retried for ``bind_retry`` s.
        """
        self._check_open()
        if self.running:
            self.kill()
        self._start(timeout, bind_retry=bind_retry, keep_data=keep_data)
        return self

    def kill(self, timeout: float = 5.0) -> int | None:
        """SIGKILL the child and reap it. Idempotent. Returns its exit code (-9)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        return self._reap(proc, timeout, "SIGKILL")

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM the child (etcd's graceful shutdown) and wait for it to exit.

        etcd re-raises the signal after shutting down, so a clean exit is ``-15``. Note
        that etcd 3.4 does not drain in-flight calls: it sends GOAWAY, then closes every
        connection within a few ms.

        Raises:
            EtcdError: it was never started, or did not exit within ``timeout`` (it is
                then SIGKILLed).
        """
        proc = self._require_proc()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return self._reap(proc, timeout, "SIGTERM")

    def close(self) -> None:
        """Kill the child (if any), keep its stderr, remove the temporary directory.
        Idempotent; safe after a failed start."""
        if self._closed:
            return
        self._closed = True
        try:
            self.kill()
        finally:
            self._stderr_kept = self._read_stderr()
            self._finalizer()

    def __enter__(self) -> EtcdProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stderr_text(self, *, current_only: bool = False) -> str:
        """etcd's stderr so far (all starts, or only the current child's)."""
        text = self._stderr_kept if self._closed else self._read_stderr()
        return text[self._stderr_offset :] if current_only else text

    def wait_serving(self, timeout: float = 5.0) -> None:
        """Block until a health check (``wait_for_ready``, on a private channel with its
        own subchannel) answers SERVING, at most ``timeout`` s.

        Raises:
            EtcdStartError: the child exited, or no SERVING answer in time.
        """
        proc = self._require_proc()
        deadline = time.monotonic() + timeout
        last = "no answer"
        pause = threading.Event()  # never set: a bounded pause after a quick failure
        if self.tls is None:
            channel = grpc.insecure_channel(self.address, options=_PROBE_OPTIONS)
        else:
            roots = Path(self.tls[2]).read_bytes()
            credentials = grpc.ssl_channel_credentials(roots)
            channel = grpc.secure_channel(self.address, credentials, options=_PROBE_OPTIONS)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            while (remaining := deadline - time.monotonic()) > 0:
                if proc.poll() is not None:
                    raise EtcdStartError(self._describe(f"exited with {proc.returncode}"))
                try:
                    reply = stub.Check(request, timeout=min(0.2, remaining), wait_for_ready=True)
                except grpc.RpcError as exc:
                    last = f"{exc.code()}: {exc.details()}"
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        continue  # the whole attempt was spent waiting: no pause
                else:
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = f"health status {reply.status}"
                pause.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        finally:
            channel.close()
        raise EtcdStartError(self._describe(f"not SERVING within {timeout:.1f}s ({last})"))

    # -- internals ----------------------------------------------------------------------

    def _start(self, timeout: float, *, bind_retry: float, keep_data: bool) -> None:
        started = time.monotonic()
        retry_until = started + bind_retry
        reuse = keep_data and self._data_dir is not None and self.peer_port != 0
        pause = threading.Event()  # never set: a bounded pause between bind retries
        while True:
            if not reuse:
                self._new_data_dir()
                self.peer_port = free_port(self.host)
            spawned = time.monotonic()
            self._spawn()
            try:
                self.wait_serving(max(timeout - (spawned - started), 0.5))
            except EtcdStartError:
                self.kill()
                busy = _BIND_FAILURE.search(self.stderr_text(current_only=True))
                if busy is None or time.monotonic() - started >= timeout:
                    raise
                self.bind_failures += 1
                if busy["addr"] != self.address:  # the peer port was taken
                    if reuse:
                        raise  # the kept data dir names that peer port: cannot move
                    continue  # a new peer port (and data dir) on the next spawn
                if self._auto_port and self.last_start_seconds is None:
                    self.port = free_port(self.host)  # never served: any port will do
                    continue
                if time.monotonic() >= retry_until:
                    raise
                pause.wait(0.1)
                continue
            self.last_start_seconds = time.monotonic() - spawned
            return

    def _new_data_dir(self) -> None:
        old = self._data_dir
        if old is not None and not self.running:
            shutil.rmtree(old, ignore_errors=True)  # ~62 MB each (preallocated WAL)
        self._data_dir = self._dir / f"data-{self.starts + 1}"

    def _spawn(self) -> None:
        # etcd reads any ETCD_<FLAG> variable as a flag (and refuses to start when one
        # conflicts with a command-line flag): keep the caller's environment out.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        self._stderr_offset = len(self._read_stderr())
        with open(self._stderr_path, "ab") as stderr:
            self._proc = subprocess.Popen(
                self.build_argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                cwd=str(self._dir),
                # Same session and process group as the test run: a Ctrl-C or a CI
                # runner killing the group takes etcd with it.
                start_new_session=False,
            )
        self._children.append(self._proc)
        self.starts += 1

    def _reap(self, proc: subprocess.Popen[bytes], timeout: float, how: str) -> int:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise EtcdError(
                self._describe(f"did not exit within {timeout}s after {how} (SIGKILLed)")
            ) from None
        return proc.returncode

    def _read_stderr(self) -> str:
        try:
            return self._stderr_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return self._stderr_kept

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise EtcdError(f"etcd on {self.address} was never started")
        return self._proc

    def _check_open(self) -> None:
        if self._closed:
            raise EtcdError(f"etcd on {self.address} is closed")

    def _describe(self, what: str) -> str:
        stderr = self.stderr_text(current_only=True)
        if len(stderr) > _STDERR_TAIL:
            stderr = "...\n" + stderr[-_STDERR_TAIL:]
        return (
            f"etcd {self.address} (pid {self.pid}): {what}"
            f"\n--- argv ---\n{' '.join(self.build_argv())}"
            f"\n--- stderr ---\n{stderr or '(empty)'}"
        )


def _cleanup(children: list[subprocess.Popen[bytes]], directory: Path) -> None:
    """Kill and reap every child, remove the directory. Runs once: from ``close()``, at
    garbage collection, or at interpreter exit (``weakref.finalize``)."""
    for proc in children:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    shutil.rmtree(directory, ignore_errors=True)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- protobuf wire format by hand (etcd's messages, without generated code) -----------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_watch_create(key: bytes) -> bytes:
    """``WatchRequest{create_request: WatchCreateRequest{key}}``: watch one key. etcd
    answers with a ``WatchResponse`` whose field 3 (``created``) is 1, then one response
    per change of the key."""
    return _length_delimited(1, _length_delimited(1, key))


def encode_put(key: bytes, value: bytes) -> bytes:
    """``PutRequest{key, value}``."""
    return _length_delimited(1, key) + _length_delimited(2, value)


def decode_fields(data: bytes) -> dict[int, list[int | bytes]]:
    """The top-level fields of a protobuf message: varints as ``int``, length-delimited
    fields as ``bytes`` (decode nested messages by calling this again).

    Raises:
        ValueError: a wire type other than varint or length-delimited, or truncated data.
    """
    fields: dict[int, list[int | bytes]] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= len(data):
                raise ValueError("truncated varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while pos < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == 0:
            value = varint()
        elif wire_type == 2:
            size = varint()
            if pos + size > len(data):
                raise ValueError("truncated field")
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire_type} (field {number})")
        fields.setdefault(number, []).append(value)
    return fields


def status_version(response: bytes) -> str:
    """The etcd version (field 2) of a raw ``StatusResponse``."""
    value = decode_fields(response)[2][0]
    assert isinstance(value, bytes)
    return value.decode()
