"""What credentials cost per call: the library's channel (an interceptor on plaintext,
grpc call credentials on TLS) raced against a raw channel that passes the same header
as ``metadata=`` on each call, in the same run against the same in-process kernel.

Run: ``python tests/benchmarks/bench_auth.py [--rounds 7] [--seconds 2]`` (about a
minute). Each row: the median over rounds of (ours / raw) completed unary calls, 4
threads each, both at once; a raw/raw control shows what "no difference" looks like.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc
import trustme
from google.protobuf import empty_pb2

import chronicle_conn as cc
from chronicle_conn._proto import host_pb2_grpc
from chronicle_conn.devserver import DevServer, ServerTls
from tests.harness.tokens import TokenEndpoint

Call = Callable[[], object]


def _caller(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] | None) -> Call:
    stub = host_pb2_grpc.ServerStub(channel)
    request = empty_pb2.Empty()
    return lambda: stub.GetVersionInfo(request, timeout=10, metadata=metadata)


def race(calls: dict[str, Call], threads: int, seconds: float) -> dict[str, int]:
    counts = {name: [0] * threads for name in calls}
    stop = threading.Event()
    start = threading.Barrier(threads * len(calls) + 1)

    def work(name: str, call: Call, index: int) -> None:
        start.wait()
        done = 0
        while not stop.is_set():
            call()
            done += 1
        counts[name][index] = done

    workers = [
        threading.Thread(target=work, args=(name, call, i))
        for name, call in calls.items()
        for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    start.wait()
    stop.wait(seconds)
    stop.set()
    for worker in workers:
        worker.join(30)
    return {name: sum(c) for name, c in counts.items()}


def row(name: str, ours: Call, raw: Call, other: Call, rounds: int, seconds: float) -> str:
    race({"ours": ours, "raw": raw}, 4, 0.5)  # warm up
    ratios, control, rates = [], [], []
    for _ in range(rounds):
        counts = race({"ours": ours, "raw": raw}, 4, seconds)
        ratios.append(counts["ours"] / counts["raw"])
        rates.append(counts["ours"] / seconds)
        counts = race({"other": other, "raw": raw}, 4, seconds)
        control.append(counts["other"] / counts["raw"])
    return (
        f"| {name} | {statistics.median(rates):,.0f}/s | {statistics.median(ratios):.3f} | "
        f"{statistics.median(control):.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    tmp = Path(__file__).resolve().parent / ".bench_auth_ca.pem"
    ca.cert_pem.write_to_path(str(tmp))
    tls = ServerTls(
        certificate_chain=b"".join(b.bytes() for b in cert.cert_chain_pems),
        private_key=cert.private_key_pem.bytes(),
    )
    cert_file, key_file = tmp.with_suffix(".cert"), tmp.with_suffix(".key")
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    endpoints = {
        False: TokenEndpoint({"bench": "secret"}).start(),
        True: TokenEndpoint({"bench": "secret"}, tls=(str(cert_file), str(key_file))).start(),
    }
    key = "bench-key"

    def allowed(method: str, metadata: object) -> bool:
        md = dict(metadata)  # type: ignore[call-overload]
        token = md.get("authorization")
        return md.get("api-key") == key or any(e.valid(token) for e in endpoints.values())

    print("| credentials, transport | ours | ours / raw with metadata= | control raw / raw |")
    print("| --- | --- | --- | --- |")
    try:
        for secure in (False, True):
            endpoint = endpoints[secure]
            with DevServer(authenticator=allowed, tls=tls if secure else None) as server:
                address = f"127.0.0.1:{server.port}"
                query = f"caPath={tmp}" if secure else "disableTls=true"

                def channel(secure: bool = secure, address: str = address) -> grpc.Channel:
                    if not secure:
                        return grpc.insecure_channel(address)
                    creds = grpc.ssl_channel_credentials(tmp.read_bytes())
                    return grpc.secure_channel(address, creds)

                for label, userinfo, extra in (
                    ("apiKey", "", f"&apiKey={key}"),
                    ("bearer token", "bench:secret@", f"&authPort={endpoint.port}"),
                ):
                    text = f"chronicle://{userinfo}{address}?{query}{extra}"
                    with cc.Connection(text) as conn:
                        conn.connect(timeout=10)
                        if label == "apiKey":
                            header = (("api-key", key),)
                        else:
                            token = conn._supervisor.dialer.factory.token_source.header()
                            header = (("authorization", token),)
                        raw, other = channel(), channel()
                        try:
                            print(
                                row(
                                    f"{label}, {'TLS' if secure else 'plaintext'}",
                                    _caller(conn.channel(), None),
                                    _caller(raw, header),
                                    _caller(other, header),
                                    args.rounds,
                                    args.seconds,
                                ),
                                flush=True,
                            )
                        finally:
                            raw.close()
                            other.close()
    finally:
        for endpoint in endpoints.values():
            endpoint.stop()
        for path in (tmp, cert_file, key_file):
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
