"""The ``chronicle-conn`` command line (also ``python -m chronicle_conn``).

Subcommands:

``check``
    Connect to a server with the library and report (see :mod:`chronicle_conn._check`):
    exit 0 ready, 1 not reachable in time, 2 bad input, 3 credentials refused.

``watch``
    Watch one connection live until Ctrl-C or SIGTERM (see :mod:`chronicle_conn._watch`):
    every state change as a line (``--json``: a JSON object), on a terminal also a status
    line updated in place; at the end a summary (time connected, outages, the longest).
    Exit 0 when stopped, 2 bad input.

``dev-server``
    Run the embedded stand-in kernel (:class:`~chronicle_conn.devserver.DevServer`)
    until SIGTERM or SIGINT, then stop cleanly and exit 0. Prints one line to stdout,
    ``chronicle-conn dev-server listening on HOST:PORT``; logs go to stderr. With TLS
    (``--tls``, ``--tls-cert``) or ``--auth`` (the OAuth token endpoint and the
    development client), a second line follows: ``chronicle-conn dev-server connect
    with: <connection string>``, redacted (the client secret shows as ``***``).
    With ``--control-stdin`` it also reads one command per line from stdin and answers
    each with one JSON line on stdout (see :data:`CONTROL_COMMANDS`); end of input
    means the controlling process is gone, and stops the server (no orphans).

``demo``
    Run the embedded kernel in a child process and show a managed connection riding
    out a SIGKILL, a restart on the same port and a kernel that stops its keep-alives,
    printing every state change as it happens.

``selfcheck``
    Start the dev server in-process on a free port, talk to it over a plain gRPC
    channel (keep-alives, their answers, version, health), print a short report.

Each subcommand is one ``_add_<name>(subparsers)`` function in :data:`_SUBCOMMANDS`
that declares its options and sets ``handler``; add a subcommand by adding one.

Bad input to any of them (an unknown subcommand or option, a bad value) is one line on
stderr, ``chronicle-conn <command>: <what is wrong> (see '... --help')``, and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeAlias

import grpc
import structlog
from google.protobuf import empty_pb2

from . import __version__, _health
from ._proto import clients_pb2, clients_pb2_grpc, host_pb2_grpc
from .connection_string import ConnectionString
from .devserver import TOKEN_PATH, DevServer, DevServerBindError, ServerTls

__all__ = ["CONTROL_COMMANDS", "main"]

_PROG = "chronicle-conn"

if TYPE_CHECKING:
    _SubParsers: TypeAlias = argparse._SubParsersAction["_Parser"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = _build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # blamed on the subcommand they were given to
        owner: argparse.ArgumentParser = getattr(args, "parser", parser)
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:  # Ctrl-C where a subcommand does not handle it: no traceback
        return 130


def _wrap(text: str) -> str:
    """A description wrapped for ``RawDescriptionHelpFormatter`` (which keeps the
    epilog's examples as written, but does not wrap the description either)."""
    return textwrap.fill(text, width=80)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports bad input in one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG,
        description=_wrap(
            "chronicle_conn tools: check or watch a connection to a Chronicle kernel, run a "
            "stand-in kernel."
        ),
        epilog=(
            "examples:\n"
            "  chronicle-conn check chronicle://kernel:35000 --json\n"
            "  chronicle-conn check --timeout 3 || exit 1    # a container health check\n"
            "  CHRONICLE_CONNECTION_STRING=... chronicle-conn watch\n"
            "  chronicle-conn dev-server --port 35000"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_subcommand in _SUBCOMMANDS:
        add_subcommand(subparsers)
    for subparser in subparsers.choices.values():
        subparser.set_defaults(parser=subparser)
    return parser


def _stderr_logger(level: int) -> Any:
    """A structlog logger that writes to stderr (stdout belongs to the protocol).

    Built with ``wrap_logger`` rather than ``structlog.configure``: the library never
    configures structlog, not even from its own command line.
    """
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(level),
    )


# -- dev-server -------------------------------------------------------------------------


def _add_dev_server(subparsers: _SubParsers) -> None:
    parser = subparsers.add_parser(
        "dev-server",
        help="run the embedded stand-in Chronicle kernel",
        description=(
            "Run the embedded stand-in Chronicle kernel until SIGTERM or Ctrl-C. Prints "
            "'chronicle-conn dev-server listening on HOST:PORT' on stdout once it listens; "
            "with TLS or --auth, then 'chronicle-conn dev-server connect with: "
            "<connection string>', the client secret shown as ***."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=35000, help="port (0: any free port)")
    parser.add_argument(
        "--keepalive-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between keep-alives on each Connect stream (default 1.0)",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=1024,
        metavar="N",
        help="server threads, made as needed: every open stream (each client's Connect) "
        "holds one, so at most N clients are served at once; more wait (default 1024)",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help=f"serve the OAuth token endpoint (POST {TOKEN_PATH}) on the same port and "
        "require its bearer tokens, for the development client chronicle-dev-client "
        "(the kernel's development credentials)",
    )
    parser.add_argument(
        "--token-lifetime",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="with --auth: how long an issued token is valid (default 3600)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve TLS with a self-signed certificate made at start (for localhost, the "
        "loopback addresses and --host; needs the cryptography package); clients use "
        "skipTlsValidation=true, or caPath with --tls-cert-out",
    )
    parser.add_argument(
        "--tls-cert-out",
        metavar="PEM",
        help="with --tls: write the self-signed certificate to this file (a client's caPath)",
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    parser.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    parser.add_argument(
        "--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA"
    )
    parser.add_argument(
        "--control-stdin",
        action="store_true",
        help="read control commands from stdin, answer each with a JSON line on stdout: "
        + ", ".join(CONTROL_COMMANDS),
    )
    parser.set_defaults(handler=_run_dev_server, parser=parser)


def _dev_server_tls(args: argparse.Namespace) -> ServerTls | None:
    """The TLS material the options ask for (parser errors for contradictions)."""
    parser: argparse.ArgumentParser = args.parser
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls and args.tls_cert is not None:
        parser.error("--tls makes its own certificate: drop --tls-cert/--tls-key, or --tls")
    if args.tls_client_ca is not None and not (args.tls or args.tls_cert is not None):
        parser.error("--tls-client-ca needs --tls, or --tls-cert and --tls-key")
    if args.tls_cert_out is not None and not args.tls:
        parser.error("--tls-cert-out writes the certificate --tls makes: add --tls")
    if args.tls:
        client_ca = None
        if args.tls_client_ca is not None:
            with open(args.tls_client_ca, "rb") as handle:
                client_ca = handle.read()
        tls = ServerTls.self_signed([args.host], client_ca=client_ca)
        if args.tls_cert_out is not None:
            with open(args.tls_cert_out, "wb") as handle:
                handle.write(tls.certificate_chain)
        return tls
    if args.tls_cert is not None:
        return ServerTls.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    return None


def _connect_hint(server: DevServer) -> str:
    """The connection string to use, redacted, and where its secret comes from."""
    text = ConnectionString.parse(server.connection_string).redacted()
    if server.oauth_client_ids:
        text += (
            " (*** is the development client secret: DEVELOPMENT_CLIENT_SECRET in "
            "chronicle_conn.connection_string)"
        )
    return text


def _run_dev_server(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    try:
        tls = _dev_server_tls(args)
        server = DevServer(
            args.host,
            args.port,
            keepalive_interval=args.keepalive_interval,
            tls=tls,
            auth=True if args.auth else None,
            token_lifetime=args.token_lifetime,
            max_workers=args.max_workers,
            logger=_stderr_logger(logging.INFO),
        )
    except (OSError, ValueError, ImportError) as exc:
        parser.error(str(exc))

    stop = _Wakeup()
    previous_handlers = {}
    previous_wakeup_fd = None
    if threading.current_thread() is threading.main_thread():  # else signal.signal fails
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[signum] = signal.signal(signum, stop.set)
        # A signal delivered to one of grpc's threads does not interrupt the main thread's
        # read, and Python runs the handler only once that returns: have the C-level
        # handler write to the pipe itself, from whichever thread gets the signal.
        previous_wakeup_fd = stop.install_as_wakeup_fd()
    output = _LineWriter(sys.stdout)
    try:
        try:
            server.start()
        except DevServerBindError as exc:
            print(f"{_PROG} dev-server: {exc}", file=sys.stderr)
            return 1
        output.write(f"{_PROG} dev-server listening on {server.address}")
        if tls is not None or args.auth:
            output.write(f"{_PROG} dev-server connect with: {_connect_hint(server)}")
        if args.control_stdin:
            threading.Thread(
                target=_control_loop,
                args=(server, stop, output),
                name="chronicle-conn-control-stdin",
                daemon=True,
            ).start()
        stop.wait()
    finally:
        # Nothing more on stdout once stopping: the reader may be gone.
        output.close()
        server.stop()
        if previous_wakeup_fd is not None:
            signal.set_wakeup_fd(previous_wakeup_fd)
        for signum, previous in previous_handlers.items():
            signal.signal(signum, previous)
    return 0


CONTROL_COMMANDS = (
    "pause-keepalives",
    "resume-keepalives",
    "not-serving",
    "serving",
    "stats",
    "auth-stats",
    "expire-tokens",
    "tls-certificate",
    "stop",
)
"""The ``--control-stdin`` commands, one per line; each is answered with one JSON line."""


def _control(server: DevServer, command: str) -> dict[str, object]:
    """Carry out one control command; return the JSON object to answer with."""
    if command == "pause-keepalives":
        server.pause_keepalives()
    elif command == "resume-keepalives":
        server.resume_keepalives()
    elif command == "not-serving":
        server.set_serving(False)
    elif command == "serving":
        server.set_serving(True)
    elif command == "stats":
        return {
            "ok": True,
            "connect_requests": len(server.connect_requests),
            "keepalive_answers": len(server.keepalive_answers),
            "keepalives_sent": server.keepalives_sent,
            "connection_ids": server.connection_ids,
        }
    elif command == "auth-stats":
        outcomes: dict[str, int] = {}
        for _, outcome, _ in server.token_requests:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        kinds: dict[str, int] = {}
        for _, kind in server.authorized_calls:
            kinds[kind] = kinds.get(kind, 0) + 1
        return {"ok": True, "token_requests": outcomes, "authorized_calls": kinds}
    elif command == "expire-tokens":
        server.expire_tokens()
    elif command == "tls-certificate":
        pem = server.tls_certificate_pem
        return {"ok": True, "pem": pem.decode("ascii") if pem is not None else None}
    elif command != "stop":  # stop: the control loop wakes the main thread
        known = ", ".join(CONTROL_COMMANDS)
        return {"ok": False, "error": f"unknown command {command!r} (known: {known})"}
    return {"ok": True}


def _control_loop(server: DevServer, stop: _Wakeup, output: _LineWriter) -> None:
    for line in _stdin_lines():
        command = line.strip()
        if not command:
            continue
        output.write(json.dumps(_control(server, command)))
        if command == "stop":
            break
    # "stop", or end of input: whoever controlled this server is gone (a test run that
    # was killed, say), so do not outlive it.
    stop.set()


def _stdin_lines() -> Iterator[str]:
    """Lines from stdin until end of input.

    Reads the file descriptor directly: a daemon thread blocked inside ``sys.stdin``'s
    buffered reader holds its lock, and the interpreter aborts at exit when it cannot
    take that lock.
    """
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stdin (tests, embedding)
        yield from sys.stdin if sys.stdin is not None else ()
        return
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            if pending:
                yield pending.decode("utf-8", "replace")
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace")


class _LineWriter:
    """Whole lines to a text stream, flushed, from any thread; silent once closed."""

    def __init__(self, stream: TextIO) -> None:
        self._lock = threading.Lock()
        self._stream: TextIO | None = stream  # guarded by _lock; None once closed

    def write(self, line: str) -> None:
        with self._lock:
            if self._stream is None:
                return
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError):  # the reader went away
                self._stream = None

    def close(self) -> None:
        with self._lock:
            self._stream = None


class _Wakeup:
    """A one-shot wake-up that a signal handler may set (a self-pipe: it takes no lock).

    ``threading.Event.set`` from a signal handler can deadlock: the handler runs in the
    main thread, possibly while that thread holds the event's own lock inside ``wait``.
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def set(self, *_: object) -> None:
        # BlockingIOError: the pipe is full, so it is set already.
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"\0")

    def install_as_wakeup_fd(self) -> int:
        """Make this the signal wake-up fd (main thread only); returns the previous one."""
        return signal.set_wakeup_fd(self._write_fd)

    def wait(self) -> None:
        os.read(self._read_fd, 1)

    def __del__(self) -> None:
        # Not an explicit close(): a late set() (a signal, the control thread) would
        # write to a closed, perhaps reused, descriptor. Nothing can call set() once
        # this object is unreachable.
        os.close(self._read_fd)
        os.close(self._write_fd)


# -- selfcheck --------------------------------------------------------------------------


def _add_selfcheck(subparsers: _SubParsers) -> None:
    parser = subparsers.add_parser(
        "selfcheck",
        help="check this installation against an in-process dev server",
        description=(
            "Start the embedded kernel in-process on a free port and exercise it over a "
            "plain gRPC channel: keep-alives and their answers, version, health."
        ),
    )
    parser.add_argument(
        "--keepalive-interval",
        type=float,
        default=0.2,
        metavar="SECONDS",
        help="keep-alive interval of the in-process server (default 0.2)",
    )
    parser.add_argument(
        "--keepalives",
        type=int,
        default=3,
        metavar="N",
        help="how many keep-alives to read and answer (default 3)",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="overall deadline"
    )
    parser.set_defaults(handler=_run_selfcheck)


def _run_selfcheck(args: argparse.Namespace) -> int:
    print(f"{_PROG} {__version__} selfcheck (grpcio {grpc.__version__})")
    try:
        for line in _selfcheck(args.keepalive_interval, max(1, args.keepalives), args.timeout):
            print(f"  {line}", flush=True)
    except Exception as exc:  # every failure is reported, not raised
        print(f"selfcheck FAILED: {exc}", file=sys.stderr)
        return 1
    print("ok")
    return 0


def _selfcheck(interval: float, keepalives: int, timeout: float) -> Iterator[str]:
    """Run the checks; yield one report line per step; raise on the first failure."""
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        return max(0.0, deadline - time.monotonic())

    with DevServer(
        port=0, keepalive_interval=interval, logger=_stderr_logger(logging.WARNING)
    ) as server:
        yield f"dev server    listening on {server.address}"
        channel = grpc.insecure_channel(
            server.address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        try:
            started = time.monotonic()
            try:
                grpc.channel_ready_future(channel).result(timeout=remaining())
            except grpc.FutureTimeoutError:
                raise RuntimeError(f"the channel to {server.address} never became ready") from None
            yield f"channel       ready in {(time.monotonic() - started) * 1000:.1f} ms"
            yield _check_keepalives(server, channel, interval, keepalives, remaining)
            info = host_pb2_grpc.ServerStub(channel).GetVersionInfo(
                empty_pb2.Empty(), timeout=remaining()
            )
            if info.Version != server.version:
                raise RuntimeError(f"GetVersionInfo said {info.Version!r}, not {server.version!r}")
            yield f"version       {info.Version} (commit {info.CommitSha})"
            status = _health.check(channel, timeout=remaining())
            if status != _health.SERVING:
                name = _health.HealthCheckResponse.ServingStatus.Name(status)
                raise RuntimeError(f"health says {name}")
            yield "health        SERVING"
        finally:
            channel.close()


def _check_keepalives(
    server: DevServer,
    channel: grpc.Channel,
    interval: float,
    wanted: int,
    remaining: Callable[[], float],
) -> str:
    stub = clients_pb2_grpc.ConnectionServiceStub(channel)
    connection_id = str(uuid.uuid4())
    request = clients_pb2.ConnectRequest(
        ConnectionId=connection_id,
        ClientVersion=__version__,
        ProcessId=os.getpid(),
        ProcessPath=sys.executable,
        MachineName=socket.gethostname(),
        ClientType="Python",
    )
    started = time.monotonic()
    arrivals: list[float] = []
    stream = stub.Connect(request, timeout=remaining())
    try:
        for keepalive in stream:
            arrivals.append(time.monotonic())
            if keepalive.ConnectionId != connection_id:
                raise RuntimeError(
                    f"keep-alive for {keepalive.ConnectionId!r}, expected {connection_id!r}"
                )
            stub.ConnectionKeepAlive(keepalive, timeout=remaining())
            if len(arrivals) >= wanted:
                break
    finally:
        stream.cancel()
    if len(arrivals) < wanted:
        raise RuntimeError(f"the Connect stream ended after {len(arrivals)} keep-alive(s)")
    if not server.wait_for(lambda: len(server.keepalive_answers) >= wanted, remaining()):
        raise RuntimeError("the server did not record the keep-alive answers")
    first_ms = (arrivals[0] - started) * 1000
    text = f"keep-alives   {wanted} received and answered, first after {first_ms:.1f} ms"
    if wanted > 1:
        gap = (arrivals[-1] - arrivals[0]) / (wanted - 1)
        text += f", then every {gap:.3f} s (configured {interval:g} s)"
    return text


# -- demo -------------------------------------------------------------------------------


def _add_demo(subparsers: _SubParsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="show a managed connection through a kernel crash and a hung kernel",
        description=(
            "Start the embedded kernel in a child process, connect, SIGKILL the kernel, "
            "restart it on the same port, then make it stop its keep-alives; every state "
            "change is printed as it happens. Exits 0 when each was noticed and recovered."
        ),
    )
    parser.add_argument(
        "--verbose", action="store_true", help="also show the library's log events (stderr)"
    )
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo  # noqa: PLC0415 - only this subcommand needs a Connection

    return run_demo(verbose=args.verbose)


# -- check ------------------------------------------------------------------------------


def _add_check(subparsers: _SubParsers) -> None:
    parser = subparsers.add_parser(
        "check",
        help="connect to a server and report (exit 0 ready, 1 not, 2 bad input, 3 auth)",
        description=_wrap(
            "Connect to a Chronicle kernel (or any gRPC server) with the library and report "
            "the redacted target, TLS and auth mode, time to ready, liveness mode, kernel "
            "version, a call's round trip and health. Exit codes: 0 ready; 1 not reachable "
            "within --timeout (or TLS cannot work as configured); 2 a bad connection "
            "string or option; 3 credentials refused. Usable as a container health check."
        ),
        epilog=(
            "examples:\n"
            "  chronicle-conn check chronicle://kernel:35000 --json\n"
            "  chronicle-conn check 'chronicle://127.0.0.1:35000?disableTls=true'\n"
            "  CHRONICLE_CONNECTION_STRING=... chronicle-conn check --json --timeout 3\n"
            "  chronicle-conn check --timeout 3 || exit 1    # a container health check"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "connection_string",
        nargs="?",
        metavar="CONNECTION_STRING",
        help="default: $CHRONICLE_CONNECTION_STRING, else chronicle://localhost:35000",
    )
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="default 10")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.set_defaults(handler=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    from ._check import run_check  # noqa: PLC0415 - only this subcommand needs a Connection

    return run_check(args.connection_string, args.timeout, args.json)


# -- watch ------------------------------------------------------------------------------


def _add_watch(subparsers: _SubParsers) -> None:
    from ._watch import MAX_DELAY, REARM_INTERVAL  # noqa: PLC0415 - like its handler

    parser = subparsers.add_parser(
        "watch",
        help="watch a connection live: every state change, a summary at Ctrl-C",
        description=_wrap(
            "Watch one connection with the library until Ctrl-C or SIGTERM, retrying for "
            f"ever (backoff up to {MAX_DELAY:g} s): a first line saying what is watched, "
            "then one line per state change with its time, attempt, next delay and reason. "
            "On a terminal, also a status line updated in place (countdown to the next "
            "attempt, time up, keep-alives), coloured unless NO_COLOR is set. TLS or "
            f"credentials refused (FAILED) is tried again every {REARM_INTERVAL:g} s. On "
            "exit: a summary (time watched, time connected, outages, the longest) and "
            "exit 0. Exit 2: a bad connection string or option."
        ),
        epilog=(
            "examples:\n"
            "  chronicle-conn watch 'chronicle://127.0.0.1:35000?disableTls=true'\n"
            "  CHRONICLE_CONNECTION_STRING=... chronicle-conn watch\n"
            "  chronicle-conn watch chronicle://kernel:35000 --json > connection.jsonl"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "connection_string",
        nargs="?",
        metavar="CONNECTION_STRING",
        help="default: $CHRONICLE_CONNECTION_STRING, else chronicle://localhost:35000",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per line, a summary object last"
    )
    parser.set_defaults(handler=_run_watch)


def _run_watch(args: argparse.Namespace) -> int:
    from ._watch import run_watch  # noqa: PLC0415 - only this subcommand needs a Connection

    return run_watch(args.connection_string, args.json)


_SUBCOMMANDS: tuple[Callable[[_SubParsers], None], ...] = (
    _add_check,
    _add_demo,
    _add_dev_server,
    _add_selfcheck,
    _add_watch,
)
"""Every subcommand's ``_add_<name>(subparsers)``, in ``--help`` order."""
