"""The generated modules are fresh, and the protos say what the kernel's contract says."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2 as official_health_pb2  # type: ignore[import-untyped]

from chronicle_conn import devserver
from chronicle_conn._proto import clients_pb2, health_pb2, host_pb2

REPO = Path(__file__).resolve().parents[1]
GENERATED = Path("chronicle_conn") / "_proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
REGENERATE = "run `python setup.py build_protos` and commit the result"

FD = _descriptor.FieldDescriptor
STRING, BOOL, INT32, MESSAGE, ENUM = (
    FD.TYPE_STRING,
    FD.TYPE_BOOL,
    FD.TYPE_INT32,
    FD.TYPE_MESSAGE,
    FD.TYPE_ENUM,
)


def _generated_files(root: Path) -> dict[str, Path]:
    folder = root / GENERATED
    return {
        path.name: path
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES)
    }


@pytest.mark.timeout(120)
def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "setup.py", "build_protos", "--out", str(tmp_path)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, f"build_protos failed:\n{result.stdout}\n{result.stderr}"
    fresh = _generated_files(tmp_path)
    committed = _generated_files(REPO)
    assert fresh, "build_protos wrote nothing"
    problems = []
    for name in sorted(fresh.keys() - committed.keys()):
        problems.append(f"{GENERATED / name} is missing")
    for name in sorted(committed.keys() - fresh.keys()):
        problems.append(f"{GENERATED / name} is not generated from any .proto (stale?)")
    for name in sorted(fresh.keys() & committed.keys()):
        if not filecmp.cmp(fresh[name], committed[name], shallow=False):
            problems.append(f"{GENERATED / name} differs from what protoc generates")
    assert not problems, "stale generated protos: " + "; ".join(problems) + f" — {REGENERATE}"


def test_devserver_embeds_clients_proto_verbatim() -> None:
    source = REPO / "protos" / GENERATED / "clients.proto"
    assert source.read_text(encoding="utf-8") == devserver.CLIENTS_PROTO, (
        f"chronicle_conn.devserver.CLIENTS_PROTO differs from {source.relative_to(REPO)}: "
        "copy the file's text into it"
    )


# -- the contract: the kernel's wire names and field numbers ------------------------------

CLIENTS = "Cratis.Chronicle.Contracts.Clients"
HOST = "Cratis.Chronicle.Contracts.Host"

CONTRACT_MESSAGES: dict[str, list[tuple[int, str, int, str | None]]] = {
    # full name: [(number, name, type, message type for MESSAGE fields)]
    f"{CLIENTS}.ConnectRequest": [
        (1, "ConnectionId", STRING, None),
        (2, "ClientVersion", STRING, None),
        (3, "IsRunningWithDebugger", BOOL, None),
        (4, "ProcessId", INT32, None),
        (5, "ProcessPath", STRING, None),
        (6, "MachineName", STRING, None),
        (7, "ClientType", STRING, None),
    ],
    f"{CLIENTS}.ConnectionKeepAlive": [(1, "ConnectionId", STRING, None)],
    f"{CLIENTS}.DescriptorSetResponse": [(1, "SchemaDefinition", STRING, None)],
    f"{CLIENTS}.ConnectedClient": [
        (1, "ConnectionId", STRING, None),
        (2, "Version", STRING, None),
        (3, "LastSeen", MESSAGE, f"{CLIENTS}.SerializableDateTimeOffset"),
        (4, "IsRunningWithDebugger", BOOL, None),
        (5, "SiloAddress", STRING, None),
        (6, "ProcessId", INT32, None),
        (7, "ProcessPath", STRING, None),
        (8, "MachineName", STRING, None),
        (9, "ClientType", STRING, None),
    ],
    f"{CLIENTS}.IEnumerable_ConnectedClient": [(1, "items", MESSAGE, f"{CLIENTS}.ConnectedClient")],
    f"{CLIENTS}.SerializableDateTimeOffset": [(1, "Value", STRING, None)],
    f"{HOST}.ServerVersionInfo": [(1, "Version", STRING, None), (2, "CommitSha", STRING, None)],
}

CONTRACT_METHODS = [
    # path, server streaming, request type, response type
    (f"/{CLIENTS}.ConnectionService/Connect", True, f"{CLIENTS}.ConnectRequest",
     f"{CLIENTS}.ConnectionKeepAlive"),
    (f"/{CLIENTS}.ConnectionService/ConnectionKeepAlive", False,
     f"{CLIENTS}.ConnectionKeepAlive", "google.protobuf.Empty"),
    (f"/{CLIENTS}.ConnectionService/GetConnectedClients", False, "google.protobuf.Empty",
     f"{CLIENTS}.IEnumerable_ConnectedClient"),
    (f"/{CLIENTS}.ConnectionService/GetDescriptorSet", False, "google.protobuf.Empty",
     f"{CLIENTS}.DescriptorSetResponse"),
    (f"/{CLIENTS}.ConnectionService/ObserveConnectedClients", True, "google.protobuf.Empty",
     f"{CLIENTS}.IEnumerable_ConnectedClient"),
    (f"/{HOST}.Server/GetVersionInfo", False, "google.protobuf.Empty",
     f"{HOST}.ServerVersionInfo"),
]  # fmt: skip


def _message(full_name: str) -> _descriptor.Descriptor:
    for module in (clients_pb2, host_pb2):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            if message.full_name == full_name:
                found: _descriptor.Descriptor = message
                return found
    raise AssertionError(f"no message {full_name} in the generated modules")


@pytest.mark.parametrize("full_name", sorted(CONTRACT_MESSAGES))
def test_message_fields_match_the_contract(full_name: str) -> None:
    message = _message(full_name)
    actual = [
        (
            field.number,
            field.name,
            field.type,
            field.message_type.full_name if field.message_type is not None else None,
        )
        for field in sorted(message.fields, key=lambda f: f.number)
    ]
    assert actual == CONTRACT_MESSAGES[full_name]
    for field in message.fields:
        assert field.is_repeated is (field.name == "items"), field.name
    assert descriptor_pb2.FileDescriptorProto.FromString(message.file.serialized_pb).syntax == (
        "proto3"
    )


def test_no_messages_beyond_the_contract() -> None:
    names = {
        message.full_name
        for module in (clients_pb2, host_pb2)
        for message in module.DESCRIPTOR.message_types_by_name.values()
    }
    assert names == set(CONTRACT_MESSAGES)


def test_methods_match_the_contract() -> None:
    methods = {}
    for module in (clients_pb2, host_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                methods[f"/{service.full_name}/{method.name}"] = method
    assert sorted(methods) == sorted(path for path, *_ in CONTRACT_METHODS)
    for path, server_streaming, request, response in CONTRACT_METHODS:
        method = methods[path]
        assert not method.client_streaming, path
        assert method.server_streaming is server_streaming, path
        assert method.input_type.full_name == request, path
        assert method.output_type.full_name == response, path


def test_health_messages_are_wire_compatible_with_grpc_health_v1() -> None:
    ours, theirs = health_pb2.HealthCheckResponse, official_health_pb2.HealthCheckResponse
    assert dict(ours.ServingStatus.items()) == dict(theirs.ServingStatus.items())
    for value in ours.ServingStatus.values():
        assert theirs.FromString(ours(status=value).SerializeToString()).status == value
        assert ours.FromString(theirs(status=value).SerializeToString()).status == value
    request = health_pb2.HealthCheckRequest(service="some.Service")
    wire = request.SerializeToString()
    assert official_health_pb2.HealthCheckRequest.FromString(wire).service == "some.Service"
    assert (
        wire == official_health_pb2.HealthCheckRequest(service="some.Service").SerializeToString()
    )
    assert health_pb2.DESCRIPTOR.package == "chronicle_conn.health"
    assert not health_pb2.DESCRIPTOR.services_by_name


def test_importing_the_library_does_not_register_grpc_health_v1() -> None:
    # In a fresh interpreter: this test process has grpc_health imported already.
    script = textwrap.dedent(
        """
        import sys
        import chronicle_conn, chronicle_conn.devserver, chronicle_conn.cli
        from google.protobuf import descriptor_pool
        # (grpc itself imports the empty grpc_health package, to alias it as grpc.health)
        assert not any(name.startswith("grpc_health.") for name in sys.modules), "imported"
        try:
            descriptor_pool.Default().FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
        except KeyError:
            pass
        else:
            raise AssertionError("grpc.health.v1 registered in the default pool")
        import grpc_health.v1.health_pb2  # and grpcio-health-checking still imports
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
