"""A minimal xDS control plane in the test process, and a client process that dials
``xds:///<listener>`` through it with gRPC's own xDS client (built into grpcio).

:class:`XdsServer` serves ``envoy.service.discovery.v3.AggregatedDiscoveryService``
(state-of-the-world ADS, v3) on ``127.0.0.1``, port 0, with one fixed configuration:

- LDS: a Listener named after the target (``kernel`` for ``xds:///kernel``) whose
  ``api_listener`` is an ``HttpConnectionManager`` with an inline ``RouteConfiguration``
  (one virtual host, domains ``["*"]``, prefix ``""`` to the cluster) and the router
  HTTP filter: no RDS;
- CDS: the cluster (``kernel-cluster``), type EDS, its endpoints over ADS, round robin;
- EDS: the cluster's ``ClusterLoadAssignment``: ``127.0.0.1:<port>`` for each port given,
  in one locality of weight 1. :meth:`XdsServer.set_endpoints` replaces them and pushes
  the update to every open stream.

Each response carries the resource type's version (``"1"``, ``"2"``... one counter per
type) and a nonce of its own stream. A type is sent again only when the client asks for
other resource names or its resources changed: an ACK (the version and nonce just sent)
or a NACK gets no response. NACKs (requests with ``error_detail``) are recorded.

gRPC reads its xDS bootstrap once per process, so the client runs in a child process
(:class:`XdsClientProcess`, ``python -m tests.harness.xds``) with
``GRPC_XDS_BOOTSTRAP_CONFIG`` set to :meth:`XdsServer.bootstrap`. The child holds one
``chronicle_conn.Connection(server_address=target, tls=False)`` and answers commands on
its stdin, one JSON object a line on its stdout (see :func:`main`).

The generated protos come from ``xds-protos`` (the ``test`` extra); see
:func:`require_xds_protos`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, wrappers_pb2

try:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
    from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
    from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
    from envoy.config.route.v3 import route_components_pb2, route_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
except ImportError as exc:  # the test extra's xds-protos is not installed
    _PROTOS_MISSING: ImportError | None = exc
else:
    _PROTOS_MISSING = None

from .kernel import EOF, pump_lines, spawn_child

__all__ = [
    "CLUSTER",
    "ENDPOINTS",
    "INSTALL_HINT",
    "LISTENER",
    "ROUTES",
    "Nack",
    "XdsClientProcess",
    "XdsServer",
    "main",
    "require_xds_protos",
]

INSTALL_HINT = "pip install 'xds-protos>=1.85.0'"  # in the test extra

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"  # LDS
ROUTES = _PREFIX + "envoy.config.route.v3.RouteConfiguration"  # RDS (not served: inline)
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"  # CDS
ENDPOINTS = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"  # EDS

_WAKE = 0.5  # a stream's loop looks at its call at least this often (seconds)


def require_xds_protos() -> None:
    """Return if ``xds-protos`` is importable, else end the current test: skipped, but
    failed when ``CI=true`` (the test extra installs it there). Call only inside a test
    or fixture."""
    if _PROTOS_MISSING is None:
        return
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"xds-protos is not importable ({_PROTOS_MISSING}) and CI=true: {INSTALL_HINT}")
    pytest.skip(f"xds-protos is not importable ({_PROTOS_MISSING}); {INSTALL_HINT}")


@dataclasses.dataclass(frozen=True)
class Nack:
    """A request that rejected a response: its type, the version it still holds, the
    nonce of the rejected response, and gRPC's reason."""

    type_url: str
    version_info: str
    nonce: str
    message: str


@dataclasses.dataclass
class _Stream:
    """One ADS stream: requests not handled yet, and what was sent, per type."""

    number: int
    pending: collections.deque[Any] = dataclasses.field(default_factory=collections.deque)
    closed: bool = False
    wanted: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # type_url -> (version, nonce, resource names) of the latest response of that type
    sent: dict[str, tuple[int, str, tuple[str, ...]]] = dataclasses.field(default_factory=dict)
    nonces: Iterator[int] = dataclasses.field(default_factory=lambda: itertools.count(1))


class XdsServer:
    """A state-of-the-world ADS server for one listener, one cluster, its endpoints.

    Thread-safe. Use as a context manager, or :meth:`start` and :meth:`close`.

    Args:
        ports: the endpoints' ports (on ``127.0.0.1``).
        listener: the Listener's name: the ``xds:///`` target's path.
        cluster: the cluster's name (also its EDS resource's name).
    """

    def __init__(
        self, ports: Sequence[int], *, listener: str = "kernel", cluster: str = "kernel-cluster"
    ) -> None:
        if _PROTOS_MISSING is not None:
            raise RuntimeError(f"xds-protos is not importable: {INSTALL_HINT}") from _PROTOS_MISSING
        self.listener = listener
        self.cluster = cluster
        self.port = 0
        self._cond = threading.Condition()
        self._versions = {LISTENER: 1, CLUSTER: 1, ENDPOINTS: 1}
        self._resources: dict[str, dict[str, any_pb2.Any]] = {
            LISTENER: {listener: _pack(self._listener())},
            CLUSTER: {cluster: _pack(self._cluster())},
            ENDPOINTS: {cluster: _pack(self._assignment(ports))},
        }
        self._requests: collections.Counter[str] = collections.Counter()
        self._acked: dict[str, str] = {}  # type_url -> the latest version ACKed
        self._nacks: list[Nack] = []
        self._open = 0
        self._streams = itertools.count(1)
        self._stopping = False
        self._executor = futures.ThreadPoolExecutor(8, thread_name_prefix="xds-server")
        self._server = grpc.server(self._executor, options=[("grpc.so_reuseport", 0)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Ads(self), self._server)

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> XdsServer:
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving: every stream ends, within ``timeout`` s. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._server.stop(0).wait(timeout)
        with self._cond:
            self._cond.wait_for(lambda: self._open == 0, timeout)
        self._executor.shutdown(wait=False)

    def __enter__(self) -> XdsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def bootstrap(self) -> str:
        """The JSON for ``GRPC_XDS_BOOTSTRAP_CONFIG``: this server, plaintext, xDS v3."""
        return json.dumps(
            {
                "xds_servers": [
                    {
                        "server_uri": self.address,
                        "channel_creds": [{"type": "insecure"}],
                        "server_features": ["xds_v3"],
                    }
                ],
                "node": {"id": "chronicle-conn-test", "locality": {}},
            }
        )

    # -- configuration --------------------------------------------------------------------

    def set_endpoints(self, ports: Sequence[int]) -> None:
        """Make the cluster's endpoints ``127.0.0.1:<port>`` for ``ports`` (a new EDS
        version), and push it to every open stream that asked for the cluster."""
        with self._cond:
            self._resources[ENDPOINTS][self.cluster] = _pack(self._assignment(ports))
            self._versions[ENDPOINTS] += 1
            self._cond.notify_all()

    # -- what the clients did -------------------------------------------------------------

    def requests(self, type_url: str) -> int:
        """How many DiscoveryRequests of ``type_url`` arrived (every stream)."""
        with self._cond:
            return self._requests[type_url]

    def nacks(self) -> list[Nack]:
        """Every request that carried an ``error_detail``, oldest first."""
        with self._cond:
            return list(self._nacks)

    def version(self, type_url: str) -> str:
        """The current version of ``type_url``'s resources."""
        with self._cond:
            return str(self._versions[type_url])

    def acked(self, type_url: str) -> str | None:
        """The version a client last ACKed for ``type_url`` (None: none yet)."""
        with self._cond:
            return self._acked.get(type_url)

    def wait_acked(self, type_url: str, timeout: float) -> bool:
        """Block until a client has ACKed the current version of ``type_url``, at most
        ``timeout`` s; ``False`` if not (see :meth:`nacks` for why)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._acked.get(type_url) == str(self._versions[type_url]), timeout
            )

    # -- the resources --------------------------------------------------------------------

    def _listener(self) -> Any:
        routes = route_pb2.RouteConfiguration(
            name=f"{self.listener}-routes",
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name=f"{self.listener}-host",
                    domains=["*"],
                    routes=[
                        route_components_pb2.Route(
                            match=route_components_pb2.RouteMatch(prefix=""),
                            route=route_components_pb2.RouteAction(cluster=self.cluster),
                        )
                    ],
                )
            ],
        )
        manager = hcm_pb2.HttpConnectionManager(
            route_config=routes,
            http_filters=[
                hcm_pb2.HttpFilter(name="router", typed_config=_pack(router_pb2.Router()))
            ],
        )
        return listener_pb2.Listener(
            name=self.listener,
            api_listener=api_listener_pb2.ApiListener(api_listener=_pack(manager)),
        )

    def _cluster(self) -> Any:
        return cluster_pb2.Cluster(
            name=self.cluster,
            type=cluster_pb2.Cluster.EDS,
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
                eds_config=config_source_pb2.ConfigSource(
                    ads=config_source_pb2.AggregatedConfigSource()
                )
            ),
            lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        )

    def _assignment(self, ports: Sequence[int]) -> Any:
        endpoints = [
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(
                        socket_address=address_pb2.SocketAddress(
                            address="127.0.0.1", port_value=int(port)
                        )
                    )
                )
            )
            for port in ports
        ]
        return endpoint_pb2.ClusterLoadAssignment(
            cluster_name=self.cluster,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    locality=base_pb2.Locality(region="test", zone="loopback"),
                    lb_endpoints=endpoints,
                    load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
                )
            ],
        )

    # -- the ADS stream -------------------------------------------------------------------

    def _stream(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """One StreamAggregatedResources call: responses as requests and updates ask."""
        with self._cond:
            stream = _Stream(next(self._streams))
            self._open += 1
        reader = threading.Thread(
            target=self._read,
            args=(requests, stream),
            name=f"xds-server-stream-{stream.number}",
            daemon=True,
        )
        reader.start()
        try:
            while context.is_active():
                with self._cond:
                    self._cond.wait_for(
                        lambda: (
                            stream.pending
                            or stream.closed
                            or self._stopping
                            or bool(self._due(stream))
                        ),
                        _WAKE,
                    )
                    if stream.closed or self._stopping:
                        return
                    if stream.pending:
                        while stream.pending:
                            self._take(stream, stream.pending.popleft())
                        self._cond.notify_all()  # for wait_acked()
                    responses = [self._response(stream, type_url) for type_url in self._due(stream)]
                yield from responses
        finally:
            with self._cond:
                self._open -= 1
                self._cond.notify_all()

    def _read(self, requests: Iterator[Any], stream: _Stream) -> None:
        try:
            for request in requests:
                with self._cond:
                    stream.pending.append(request)
                    self._cond.notify_all()
        except Exception:  # the call was cancelled or failed: the stream is over
            pass
        finally:
            with self._cond:
                stream.closed = True
                self._cond.notify_all()

    def _take(self, stream: _Stream, request: Any) -> None:
        """Account for one request (with the lock held)."""
        type_url = request.type_url
        self._requests[type_url] += 1
        if request.error_detail.code or request.error_detail.message:
            self._nacks.append(
                Nack(
                    type_url,
                    request.version_info,
                    request.response_nonce,
                    request.error_detail.message,
                )
            )
        elif request.response_nonce:
            sent = stream.sent.get(type_url)
            if sent is not None and sent[1] == request.response_nonce:
                self._acked[type_url] = request.version_info
        stream.wanted[type_url] = tuple(sorted(request.resource_names))

    def _due(self, stream: _Stream) -> list[str]:
        """The types this stream must be sent now: asked for by other names than last
        sent, or changed since (with the lock held). Types not served get nothing."""
        due = []
        for type_url, names in stream.wanted.items():
            if type_url not in self._versions or not names:
                continue
            sent = stream.sent.get(type_url)
            if sent is None or sent[2] != names or sent[0] != self._versions[type_url]:
                due.append(type_url)
        return due

    def _response(self, stream: _Stream, type_url: str) -> Any:
        version = self._versions[type_url]
        names = stream.wanted[type_url]
        nonce = str(next(stream.nonces))
        stream.sent[type_url] = (version, nonce, names)
        have = self._resources[type_url]
        return discovery_pb2.DiscoveryResponse(
            version_info=str(version),
            type_url=type_url,
            nonce=nonce,
            resources=[have[name] for name in names if name in have],
        )


def _pack(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


if _PROTOS_MISSING is None:

    class _Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
        def __init__(self, server: XdsServer) -> None:
            self._server = server

        def StreamAggregatedResources(self, request_iterator, context):
            return self._server._stream(request_iterator, context)


# -- the client process ----------------------------------------------------------------------


class XdsClientError(RuntimeError):
    """The client process did not answer, or answered ``ok: false``; with its stderr."""


class XdsClientProcess:
    """``python -m tests.harness.xds --target TARGET`` in a child process, with gRPC's
    xDS bootstrap in its environment. Its stderr goes to a file (:meth:`stderr_text`).

    Args:
        target: what the child's ``Connection(server_address=...)`` dials.
        bootstrap: the JSON for ``GRPC_XDS_BOOTSTRAP_CONFIG`` (:meth:`XdsServer.bootstrap`).
        env: more environment variables (``GRPC_TRACE=xds_client`` to see gRPC's side).
    """

    def __init__(self, target: str, bootstrap: str, env: dict[str, str] | None = None) -> None:
        self.target = target
        self._env = {"GRPC_XDS_BOOTSTRAP_CONFIG": bootstrap, **(env or {})}
        self._lines: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        fd, name = tempfile.mkstemp(prefix="xds-client-", suffix=".stderr")
        os.close(fd)
        self._stderr_path = Path(name)

    def start(self, timeout: float = 15.0) -> XdsClientProcess:
        """Spawn the child and wait for its ready line."""
        argv = [sys.executable, "-m", "tests.harness.xds", "--target", self.target]
        self._proc = spawn_child(argv, self._stderr_path, self._env)
        assert self._proc.stdout is not None
        self._reader = threading.Thread(
            target=pump_lines, args=(self._proc.stdout, self._lines), name="xds-client-stdout"
        )
        self._reader.daemon = True
        self._reader.start()
        self._answer("start", timeout)
        return self

    def command(self, cmd: str, timeout: float = 30.0) -> dict[str, Any]:
        """Send one command line; return the child's JSON answer (``ok`` must be true)."""
        if self._proc is None or self._proc.stdin is None:
            raise XdsClientError("the client process was not started")
        with self._lock:
            try:
                self._proc.stdin.write(cmd + "\n")
                self._proc.stdin.flush()
            except OSError as exc:
                raise XdsClientError(self._describe(f"cannot send {cmd!r}: {exc}")) from exc
            return self._answer(cmd, timeout)

    def close(self, timeout: float = 10.0) -> list[str] | None:
        """Close the connection (the ``close`` command), then make sure the child is
        gone (killed if it does not exit in time). Idempotent. Returns the threads the
        closed connection left behind (``[]``), or None if the child did not answer."""
        proc = self._proc
        if proc is None:
            return None
        left: list[str] | None = None
        try:
            if proc.poll() is None:
                with contextlib.suppress(XdsClientError):
                    left = self.command("close", timeout)["threads"]
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        finally:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if self._reader is not None:
                self._reader.join(5)
            if proc.stdout is not None:
                proc.stdout.close()
        return left

    def remove_files(self) -> None:
        self._stderr_path.unlink(missing_ok=True)

    def stderr_text(self) -> str:
        try:
            return self._stderr_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> XdsClientProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.close()
        finally:
            self.remove_files()

    def _answer(self, cmd: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise XdsClientError(
                    self._describe(f"no answer to {cmd!r} in {timeout}s")
                ) from None
            if line is EOF:
                self._lines.put(EOF)
                raise XdsClientError(self._describe(f"the client exited during {cmd!r}"))
            try:
                answer = json.loads(line)
            except ValueError:
                continue  # not ours (a library's print): skipped
            if not isinstance(answer, dict):
                continue
            if answer.get("ok") is not True:
                raise XdsClientError(self._describe(f"{cmd!r} answered {answer!r}"))
            return answer

    def _describe(self, what: str) -> str:
        tail = self.stderr_text()[-6000:]
        return f"xds client {self.target}: {what}\n--- stderr ---\n{tail or '(empty)'}"


# -- the child: one Connection, driven over stdin ----------------------------------------------


def _calls(conn: Any, count: int, prefix: str) -> dict[str, Any]:
    from tests.harness.appserver import WorkStub, work_request, work_response

    stub = WorkStub(conn.channel())
    answers, failures = [], []
    for i in range(count):
        call_id = f"{prefix}-{i}"
        started = time.monotonic()
        try:
            reply = stub.unary(work_request(call_id), timeout=10, wait_for_ready=True)
        except grpc.RpcError as exc:
            failures.append({"id": call_id, "code": exc.code().name, "details": exc.details()})
        else:
            took = round(time.monotonic() - started, 3)
            answers.append({"id": call_id, "pid": work_response(reply)["pid"], "took": took})
    return {"answers": answers, "failures": failures}


def _serve_commands(conn: Any, changes: list[list[str]], heard: threading.Condition) -> None:
    write = sys.stdout.write
    for line in sys.stdin:
        if not line.strip():
            continue
        name, *args = line.split()
        answer: dict[str, Any]
        try:
            if name == "connect" and len(args) == 1:
                conn.connect(timeout=float(args[0]))
                with heard:  # listeners run on the supervisor: wait until they heard it
                    heard.wait_for(lambda: bool(changes) and changes[-1][1] == "CONNECTED", 5)
                answer = {"state": conn.state.name}
            elif name == "calls" and len(args) == 2:
                answer = _calls(conn, int(args[0]), args[1])
            elif name == "changes" and not args:
                with heard:
                    answer = {"changes": list(changes)}
            elif name == "stats" and not args:
                stats = conn.stats()
                answer = {
                    "target": stats.target,
                    "state": stats.state.name,
                    "generation": stats.generation,
                    "liveness": stats.liveness,
                    "backends_ready": stats.backends_ready,
                }
            elif name == "close" and not args:
                conn.close()
                answer = {"threads": [repr(t) for t in conn._threads()]}
            else:
                answer = {"ok": False, "error": f"unknown command {line.strip()!r}"}
        except Exception as exc:  # answered, not raised: the test reads it
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        write(json.dumps({"ok": True, **answer}) + "\n")
        sys.stdout.flush()
        if name == "close":
            return


def main(argv: Sequence[str] | None = None) -> int:
    """The client child: one ``Connection(server_address=TARGET, tls=False)``, made
    with ``auto_connect=False`` so that its listener hears every change.

    Commands, one a line, each answered by one JSON object with ``ok``:

    - ``connect TIMEOUT``: ``connect()``; answered once the listener heard CONNECTED;
    - ``calls N PREFIX``: N unary work calls, one after the other, ids ``PREFIX-0``...,
      ``wait_for_ready=True``, 10 s deadline each: ``answers`` (id, pid of the server
      that ran it), ``failures`` (id, code, details);
    - ``changes``: every state change so far, ``[old, new]`` names;
    - ``stats``: ``target``, ``state``, ``generation``, ``liveness``, ``backends_ready``;
    - ``close``: close the connection, answer the threads it left, exit.

    End of input closes the connection and exits too."""
    parser = argparse.ArgumentParser(prog="python -m tests.harness.xds")
    parser.add_argument("--target", required=True, help="e.g. xds:///kernel")
    args = parser.parse_args(argv)
    import chronicle_conn as cc

    changes: list[list[str]] = []
    heard = threading.Condition()

    def record(change: cc.StateChange) -> None:
        with heard:
            changes.append([change.old.name, change.new.name])
            heard.notify_all()

    conn = cc.Connection(
        server_address=args.target,
        tls=False,
        reconnect_base_delay=0.05,
        reconnect_max_delay=0.5,
        keepalive_stale_after=3.0,
        retry_attempts=None,
        auto_connect=False,
    )
    try:
        conn.add_listener(record)
        sys.stdout.write(json.dumps({"ok": True, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        _serve_commands(conn, changes, heard)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
