"""``Connection(server_address="xds:///kernel", tls=False)`` against a real xDS control
plane, resolved by gRPC's own xDS client (built into grpcio).

The control plane (:class:`tests.harness.xds.XdsServer`, state-of-the-world ADS) runs in
the test process; the connection runs in a child process with the control plane as its
xDS bootstrap (gRPC reads the bootstrap once per process); the kernels are app servers in
child processes, whose answers name the process that ran them.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from tests.harness.xds import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    ROUTES,
    XdsClientProcess,
    XdsServer,
    require_xds_protos,
)

TARGET = "xds:///kernel"


@pytest.fixture
def control_plane() -> Iterator[Callable[[Sequence[int]], XdsServer]]:
    """``make(ports)``: a started xDS server whose cluster's endpoints are
    ``127.0.0.1:<port>``; closed at teardown. Skipped without xds-protos (failed when
    ``CI=true``)."""
    require_xds_protos()
    made: list[XdsServer] = []

    def make(ports: Sequence[int]) -> XdsServer:
        server = XdsServer(ports)
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.close()


@pytest.fixture
def xds_client() -> Iterator[Callable[[XdsServer], XdsClientProcess]]:
    """``make(control)``: a started client process dialing ``xds:///kernel`` through
    ``control``; closed at teardown, where its connection must close without leaving a
    thread (the child's stderr is printed then: shown if the test failed)."""
    made: list[XdsClientProcess] = []

    def make(control: XdsServer) -> XdsClientProcess:
        client = XdsClientProcess(TARGET, control.bootstrap())
        made.append(client)
        return client.start()

    yield make
    for client in made:
        try:
            left = client.close()
            print(f"--- xds client stderr ---\n{client.stderr_text() or '(empty)'}")
        finally:
            client.remove_files()
        assert left == [], f"the connection left threads behind (None: no answer): {left}"


def _calls(client: XdsClientProcess, count: int, prefix: str) -> list[dict]:
    """``count`` work calls in the client; every one must succeed. Their answers."""
    result = client.command(f"calls {count} {prefix}")
    assert result["failures"] == [], result["failures"]
    return result["answers"]


def _executions(*servers) -> collections.Counter:
    ran: collections.Counter = collections.Counter()
    for server in servers:
        ran.update(server.log.read().executions())
    return ran


@pytest.mark.timeout(60)
def test_xds_target_round_robins_over_the_cluster_endpoints(
    app_server_factory, control_plane, xds_client
):
    """gRPC's xDS client resolves ``xds:///kernel`` through the control plane (listener
    with an inline route, cluster, endpoints), the connection gets CONNECTED on it, and
    calls spread over both kernels of the cluster by round robin, each run once."""
    servers = [app_server_factory("kernel", keepalive_interval=0.2) for _ in range(2)]
    control = control_plane([s.port for s in servers])
    client = xds_client(control)

    assert client.command("connect 20")["state"] == "CONNECTED"
    assert client.command("stats")["target"] == TARGET
    answers = _calls(client, 30, "rr")

    pids = [s.stats()["pid"] for s in servers]
    spread = collections.Counter(answer["pid"] for answer in answers)
    assert set(spread) == set(pids), spread
    assert min(spread.values()) >= 5, spread
    ran = _executions(*servers)
    assert {a["id"]: ran[a["id"]] for a in answers if ran[a["id"]] != 1} == {}
    for server, pid in zip(servers, pids, strict=True):  # each call ran where it was answered
        here = server.log.read().executions()
        assert all(a["id"] in here for a in answers if a["pid"] == pid)

    assert client.command("stats")["backends_ready"] == 2  # gRPC's channelz, through xDS
    for type_url in (LISTENER, CLUSTER, ENDPOINTS):
        assert control.requests(type_url) >= 1, type_url
        assert control.wait_acked(type_url, 5), (type_url, control.nacks())
    assert control.requests(ROUTES) == 0  # the route is inline in the listener: no RDS
    assert control.nacks() == []
    changes = client.command("changes")["changes"]
    assert changes[0] == ["IDLE", "CONNECTING"], changes
    assert changes[-1] == ["CONNECTING", "CONNECTED"], changes
    assert [c for c in changes if c[0] == "CONNECTED"] == [], changes


@pytest.mark.timeout(60)
def test_an_endpoint_update_moves_calls_to_the_new_kernel_while_connected(
    app_server_factory, control_plane, xds_client
):
    """The control plane moves the cluster from kernel A to kernel B while the
    connection is up: gRPC follows the EDS update, calls made afterwards reach B, no
    call fails, and the connection never leaves CONNECTED."""
    a, b = (app_server_factory("kernel", keepalive_interval=0.2) for _ in range(2))
    a_pid, b_pid = a.stats()["pid"], b.stats()["pid"]
    control = control_plane([a.port])
    client = xds_client(control)
    assert client.command("connect 20")["state"] == "CONNECTED"
    before = _calls(client, 10, "before")
    assert {answer["pid"] for answer in before} == {a_pid}
    mark = len(client.command("changes")["changes"])

    control.set_endpoints([b.port])
    assert control.wait_acked(ENDPOINTS, 10), control.nacks()
    assert control.version(ENDPOINTS) == "2"
    moving: list[dict] = []
    deadline = time.monotonic() + 15
    for i in range(300):  # until a call reaches B (one call at a time, bounded)
        moving += _calls(client, 1, f"moving{i}")
        if moving[-1]["pid"] == b_pid:
            break
        assert time.monotonic() < deadline, f"no call reached B in 15 s: {moving[-5:]}"
    else:
        pytest.fail(f"no call reached B in {len(moving)} calls: {moving[-5:]}")
    after = _calls(client, 20, "after")

    assert {answer["pid"] for answer in after} == {b_pid}
    assert client.command("changes")["changes"][mark:] == []
    assert client.command("stats")["state"] == "CONNECTED"
    assert control.nacks() == []
    ran_a, ran_b = a.log.read().executions(), b.log.read().executions()
    for answer in before + moving + after:
        where = ran_b if answer["pid"] == b_pid else ran_a
        assert where.get(answer["id"]) == 1, answer
        assert answer["id"] not in (ran_a if where is ran_b else ran_b), answer
