"""A real OAuth2 client-credentials token endpoint for tests (stdlib ``http.server``).

``POST /connect/token`` with ``grant_type=client_credentials&client_id=..&client_secret=..``
answers ``{"access_token", "token_type", "expires_in"}``, 401 ``invalid_client`` or 400
``unsupported_grant_type``. It keeps every token it issued with its expiry, so a gRPC
server's authenticator can check what clients send (:meth:`TokenEndpoint.valid`), and
records every request. Optional TLS; can be stopped and started again on its port.
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class TokenEndpoint:
    def __init__(
        self,
        clients: dict[str, str],
        *,
        lifetime: float = 3600.0,
        port: int = 0,
        tls: tuple[str, str] | None = None,  # (certificate file, key file)
    ) -> None:
        self.clients = dict(clients)
        self.lifetime = lifetime
        self.port = port
        self._tls = tls
        self.cond = threading.Condition()
        self.tokens: dict[str, float] = {}  # token -> expiry (time.monotonic())
        self.requests: list[tuple[str | None, int]] = []  # (client_id, HTTP status)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> TokenEndpoint:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                status, body = endpoint._answer(self.path, form)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self._tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self._tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # -- the endpoint ------------------------------------------------------------

    def _answer(self, path: str, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        client = form.get("client_id", [None])[0]
        secret = form.get("client_secret", [None])[0]
        if path != "/connect/token":
            status, body = 404, {"error": "not_found"}
        elif form.get("grant_type") != ["client_credentials"]:
            status, body = 400, {"error": "unsupported_grant_type"}
        elif client is None or self.clients.get(client) != secret:
            status, body = 401, {"error": "invalid_client"}
        else:
            token = secrets.token_urlsafe(24)
            with self.cond:
                self.tokens[token] = time.monotonic() + self.lifetime
            status = 200
            body = {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self.lifetime,
            }
        with self.cond:
            self.requests.append((client, status))
            self.cond.notify_all()
        return status, body

    def valid(self, authorization: str | None) -> bool:
        """Is ``authorization`` (``Bearer <token>``) a token issued here, unexpired?"""
        if not authorization or not authorization.startswith("Bearer "):
            return False
        with self.cond:
            expires = self.tokens.get(authorization[len("Bearer ") :])
        return expires is not None and time.monotonic() < expires

    def issued(self) -> int:
        with self.cond:
            return sum(1 for _, status in self.requests if status == 200)

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)
