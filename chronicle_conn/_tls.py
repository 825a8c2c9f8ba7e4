"""TLS for the library's channels: the material, skipTlsValidation, and what went wrong.

* :func:`load_material` reads and checks ``caPath``, ``certificatePath`` / ``keyPath``
  (PEM) or a PKCS#12 ``certificatePath`` with ``certificatePassword`` (needs the
  ``cryptography`` package, extra ``pkcs12``), on the constructing thread: a file that
  cannot be read, parsed or decrypted, or a key that does not belong to its
  certificate, is a ``ConfigurationError`` naming the file, never a failure later in a
  thread.
* :func:`fetch_certificate` asks a server for its certificate, for
  ``skipTlsValidation``: the channel then trusts exactly that certificate (pinned as its
  only root) under one of the names it carries.
* :func:`diagnose` turns a failed TLS attempt into one plain sentence that says what
  is wrong and what to change, or None when the failure may go away by itself (the
  server is merely down). It reads grpc's reason and, where grpc's is vague
  ("Socket closed"), asks the server itself with a handshake of the stdlib's ``ssl``.

Imported on a constructing thread when a connection uses TLS, so that the background
thread that later diagnoses imports nothing (see ``_channel_factory``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

from .errors import ConfigurationError

__all__ = [
    "CertificateInfo",
    "Diagnosis",
    "TlsMaterial",
    "diagnose",
    "fetch_certificate",
    "load_material",
]

_PKCS12_EXTRA = "pip install 'chronicle-conn[pkcs12]'"

# An HTTP/2 client preface and an empty SETTINGS frame: makes a gRPC server answer (or
# a server that refused our certificate send its alert) without waiting for a timeout.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@dataclasses.dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes for ``grpc.ssl_channel_credentials`` (None: grpc's default)."""

    root_certificates: bytes | None = None
    private_key: bytes | None = dataclasses.field(default=None, repr=False)
    certificate_chain: bytes | None = None

    @property
    def has_client_certificate(self) -> bool:
        return self.certificate_chain is not None


@dataclasses.dataclass(frozen=True)
class CertificateInfo:
    """A server's certificate as :func:`fetch_certificate` found it."""

    pem: bytes
    names: tuple[str, ...]  # DNS names and IP addresses (subjectAltName), else the CN


# ------------------------------------------------------------------------ material


def _read(path: str, option: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(
            f"{option} {path!r} cannot be read ({reason}): point {option} at {what}",
            option=option,
        ) from None
    if not data.strip():
        raise ConfigurationError(f"{option} {path!r} is empty: it must hold {what}", option=option)
    return data


def _is_pem(data: bytes) -> bool:
    return b"-----BEGIN " in data


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc.args[-1] if exc.args else exc)


def _load_ca(path: str) -> bytes:
    what = "a PEM file of CA certificates"
    data = _read(path, "caPath", what)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        reason = _ssl_reason(exc) if isinstance(exc, ssl.SSLError) else str(exc)
        raise ConfigurationError(
            f"caPath {path!r} holds no usable PEM certificate ({reason}): point caPath at {what}",
            option="caPath",
        ) from None
    return data


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    """A file only this user can read, holding ``data``, removed afterwards (the ssl
    module loads keys from files only)."""
    fd, path = tempfile.mkstemp(prefix="chronicle_conn-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _check_pair(chain: bytes, key: bytes, cert_path: str, key_path: str | None) -> None:
    """The certificate parses and the key belongs to it (the check grpc only makes when
    it handshakes, in a thread, as "Invalid private key")."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with _private_file(chain) as chain_file, _private_file(key) as key_file:
        try:
            context.load_cert_chain(chain_file, key_file, password=_no_password)
        except ssl.SSLError as exc:
            reason = _ssl_reason(exc)
            if "KEY_VALUES_MISMATCH" in reason.upper():
                raise ConfigurationError(
                    f"keyPath {key_path!r} is not the key of certificatePath {cert_path!r}: "
                    "give the key that belongs to that certificate",
                    option="keyPath",
                ) from None
            raise ConfigurationError(
                f"certificatePath {cert_path!r} (with keyPath {key_path!r}) is not a PEM "
                f"certificate and unencrypted key ({reason}): give PEM files, or a PKCS#12 "
                "file with certificatePassword",
                option="certificatePath",
            ) from None
        except _EncryptedKey:
            raise ConfigurationError(
                f"the key in {key_path or cert_path!r} is encrypted: give an unencrypted PEM "
                "key, or a PKCS#12 file with certificatePassword",
                option="keyPath" if key_path else "certificatePath",
            ) from None


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    raise _EncryptedKey


def _load_pkcs12(path: str, password: str | None) -> tuple[bytes, bytes]:
    """(key PEM, certificate chain PEM) from a PKCS#12 file."""
    data = _read(path, "certificatePath", "a PKCS#12 file")
    try:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.serialization import pkcs12  # noqa: PLC0415
    except ImportError:
        raise ConfigurationError(
            f"certificatePath {path!r} is a PKCS#12 file, which needs the cryptography "
            f"package: {_PKCS12_EXTRA}",
            option="certificatePassword",
        ) from None
    secret = password.encode() if password else None
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, secret)
    except (ValueError, TypeError):
        hint = "wrong certificatePassword" if password else "no certificatePassword given"
        raise ConfigurationError(
            f"certificatePath {path!r} cannot be opened as PKCS#12 ({hint}, or not a "
            "PKCS#12 file): check certificatePassword",
            option="certificatePassword",
        ) from None
    if key is None or cert is None:
        raise ConfigurationError(
            f"certificatePath {path!r} holds no private key and certificate: export the "
            "client certificate with its key",
            option="certificatePath",
        )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *extra))
    return key_pem, chain


def load_material(
    *,
    ca_path: str | None,
    certificate_path: str | None,
    key_path: str | None,
    certificate_password: str | None,
) -> TlsMaterial:
    """Read and check the TLS files of a connection string.

    ``certificatePath`` is PEM (with ``keyPath``, or holding its key itself) or, with
    ``certificatePassword`` or when it is not PEM, PKCS#12.

    Raises:
        ConfigurationError: a file cannot be read, parsed or decrypted, or the key does
            not belong to the certificate. The message names the file, never the password.
    """
    roots = _load_ca(ca_path) if ca_path is not None else None
    if certificate_path is None:
        return TlsMaterial(root_certificates=roots)
    if key_path is not None:
        chain = _read(certificate_path, "certificatePath", "a PEM certificate")
        key = _read(key_path, "keyPath", "a PEM private key")
        _check_pair(chain, key, certificate_path, key_path)
        return TlsMaterial(roots, key, chain)
    if certificate_password is None:
        data = _read(certificate_path, "certificatePath", "a PEM or PKCS#12 certificate")
        if _is_pem(data):
            if b"PRIVATE KEY-----" not in data:
                raise ConfigurationError(
                    f"certificatePath {certificate_path!r} holds no private key: set keyPath "
                    "to the certificate's key",
                    option="keyPath",
                )
            _check_pair(data, data, certificate_path, None)
            return TlsMaterial(roots, data, data)
    key, chain = _load_pkcs12(certificate_path, certificate_password)
    return TlsMaterial(roots, key, chain)


# ------------------------------------------------------------------------ certificates


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _handshake(
    host: str,
    port: int,
    context: ssl.SSLContext,
    timeout: float,
    *,
    server_name: str | None = None,
) -> ssl.SSLSocket:
    """A TLS connection to ``host:port`` (the caller closes it)."""
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        name = server_name if server_name is not None else (None if _is_ip(host) else host)
        sock = context.wrap_socket(raw, server_hostname=name)
    except BaseException:
        raw.close()
        raise
    return sock


def _unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    return context


def _names(der: bytes) -> tuple[str, ...]:
    """The names a DER certificate is for: its subjectAltName DNS names and IP
    addresses, else its common name. Empty when they cannot be read."""
    with _private_file(ssl.DER_cert_to_PEM_cert(der).encode()) as path:
        try:
            decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
        except Exception:  # a private helper of CPython's: names are only a courtesy
            return ()
    alt = tuple(
        str(value).strip()
        for kind, value in decoded.get("subjectAltName", ())
        if kind in ("DNS", "IP Address")
    )
    if alt:
        return alt
    for rdn in decoded.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return (str(value),)
    return ()


def fetch_certificate(
    host: str, port: int, timeout: float, *, material: TlsMaterial | None = None
) -> CertificateInfo:
    """The certificate ``host:port`` presents, unverified (for ``skipTlsValidation``),
    presenting the client certificate of ``material`` if there is one.

    Raises:
        OSError: the server cannot be reached or does not speak TLS (``ssl.SSLError``).
    """
    context = _unverified_context()
    if material is not None:
        load_client_certificate(context, material)
    with _handshake(host, port, context, timeout) as sock:
        der = sock.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    return CertificateInfo(ssl.DER_cert_to_PEM_cert(der).encode("ascii"), _names(der))


def target_name(host: str, names: tuple[str, ...]) -> str | None:
    """The name to check a pinned certificate against: ``host`` if the certificate is
    for it, else the first DNS name, else the first address it names."""
    if not names or host in names:
        return host if names else None
    dns = [n for n in names if not _is_ip(n)]
    return dns[0] if dns else names[0]


# ------------------------------------------------------------------------ diagnosis


def _verifying_context(material: TlsMaterial) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if material.root_certificates is not None:
        context.load_verify_locations(cadata=material.root_certificates.decode("ascii", "replace"))
    else:
        _load_grpc_roots(context)
    context.set_alpn_protocols(["h2"])
    return context


def _load_grpc_roots(context: ssl.SSLContext) -> None:
    """The roots grpc trusts by default: ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``, else the
    bundle shipped with grpcio, else the system's."""
    import grpc  # noqa: PLC0415 - imported long since by the package

    path = os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH") or os.path.join(
        os.path.dirname(grpc.__file__), "_cython", "_credentials", "roots.pem"
    )
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError):
        context.load_default_certs()


def load_client_certificate(context: ssl.SSLContext, material: TlsMaterial) -> None:
    if material.certificate_chain is None or material.private_key is None:
        return
    with (
        _private_file(material.certificate_chain) as chain,
        _private_file(material.private_key) as key,
    ):
        context.load_cert_chain(chain, key)


def _shown(names: tuple[str, ...]) -> str:
    if not names:
        return "other names"
    shown = ", ".join(names[:4])
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _peer_names(host: str, port: int, timeout: float) -> tuple[str, ...]:
    try:
        return fetch_certificate(host, port, timeout).names
    except (OSError, ValueError):
        return ()


class Diagnosis(NamedTuple):
    """What is wrong. ``definite``: retrying cannot fix it (the connection gives up);
    else a likely reason, added to the failure while it is retried."""

    message: str
    definite: bool


def diagnose(
    details: str,
    *,
    host: str,
    port: int,
    tls: bool,
    material: TlsMaterial,
    ca_path: str | None,
    server_name: str | None,
    timeout: float,
    shown: str | None = None,
    pinned: bool = False,
    several: bool = False,
) -> Diagnosis | None:
    """What is wrong, and what to change, when an attempt to ``host:port`` failed with
    grpc's ``details``; None when nothing is known to be wrong with the configuration
    (the server may merely be down, and retrying is right). ``shown``: how to name
    the server in the message (the connection string's ``host:port``). ``pinned``:
    ``skipTlsValidation`` (a certificate that fails is one that changed since it was
    fetched: fetch it again). ``several``: the string has several hosts.

    Blocks for at most a few handshakes bounded by ``timeout`` each.
    """
    where = shown or f"{host}:{port}"
    text = details.upper()
    if not tls:
        if "SOCKET CLOSED" in text or "CONNECTION RESET" in text:
            return _plaintext_to_tls(host, port, timeout, where)
        return None
    if "WRONG_VERSION_NUMBER" in text or "HTTP_REQUEST" in text:
        return Diagnosis(_PLAINTEXT.format(where=where), definite=True)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        reason = _after(details, "CERTIFICATE_VERIFY_FAILED")
        if pinned:
            return Diagnosis(
                f"the certificate of {where} changed since it was fetched ({reason})", False
            )
        names = _peer_names(host, port, timeout)
        cert = f"the certificate of {where}" + (f" (for {_shown(names)})" if names else "")
        if "EXPIRED" in reason.upper() or "NOT YET VALID" in reason.upper():
            return Diagnosis(
                f"{cert} is not valid now ({reason}): renew the server's certificate "
                "(or check this machine's clock)",
                definite=True,
            )
        trusted_by = f"caPath {ca_path!r}" if ca_path else "the default root certificates"
        change = (
            "set caPath to the CA that signed it"
            if not ca_path
            else "point caPath at the CA that signed it"
        )
        return Diagnosis(
            f"{cert} is not trusted by {trusted_by}"
            + (f" ({reason})" if reason else "")
            + f": {change}, or set skipTlsValidation=true for a development kernel",
            definite=True,
        )
    if "HOSTNAME VERIFICATION" in text or "PEER NAME" in text:
        if pinned:
            return Diagnosis(f"the certificate of {where} changed since it was fetched", False)
        names = _peer_names(host, port, timeout)
        expected = server_name or host
        message = (
            f"name mismatch: the certificate of {where} is for {_shown(names)}, not "
            f"{expected}: connect by one of its names, or set skipTlsValidation=true for a "
            "development kernel"
        )
        # With several hosts grpc checks every server against one name (issue: many
        # kernels); say what is seen, but do not give up on it.
        return Diagnosis(message, definite=not several)
    if "SOCKET CLOSED" in text or "CONNECTION RESET" in text or "HANDSHAKE" in text:
        refused = _client_certificate_refused(host, port, material, server_name, timeout, where)
        if refused is not None:
            return refused
        if _speaks_plaintext_h2(host, port, timeout):
            # Some servers (grpc-go behind cmux, as etcd) close a TLS connection at once.
            return Diagnosis(_PLAINTEXT.format(where=where), definite=True)
    return None


_PLAINTEXT = (
    "the server at {where} speaks plaintext, not TLS: add disableTls=true to the "
    "connection string (or enable TLS on the server)"
)


def _speaks_plaintext_h2(host: str, port: int, timeout: float) -> bool:
    """Does ``host:port`` answer an HTTP/2 preface in plaintext with a SETTINGS frame?"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_H2_PREFACE)
            header = b""
            while len(header) < 9:
                chunk = sock.recv(9 - len(header))
                if not chunk:
                    return False
                header += chunk
    except OSError:
        return False
    return header[3] == 0x04  # the frame type: SETTINGS


def _after(details: str, marker: str) -> str:
    """The reason grpc gives after ``marker`` ("unable to get local issuer certificate")."""
    index = details.upper().find(marker)
    rest = details[index + len(marker) :].lstrip(": ")
    reason = rest.split(":")[0].strip()
    return reason if reason and reason.upper() != "OK" else ""


def _plaintext_to_tls(host: str, port: int, timeout: float, where: str) -> Diagnosis | None:
    """A plaintext channel whose connection was closed at once: does the server speak TLS?"""
    try:
        with _handshake(host, port, _unverified_context(), timeout):
            pass
    except (OSError, ValueError):
        return None  # not TLS (or not there): nothing known
    return Diagnosis(
        f"the server at {where} speaks TLS, not plaintext: remove disableTls=true "
        "(and set caPath, or skipTlsValidation=true, if its certificate is self-signed)",
        definite=True,
    )


def _client_certificate_refused(
    host: str,
    port: int,
    material: TlsMaterial,
    server_name: str | None,
    timeout: float,
    where: str,
) -> Diagnosis | None:
    """A TLS connection closed during or right after the handshake: did the server
    want (another) client certificate? Asks with the connection's own material.

    Definite only when the server says so with an alert about certificates
    (``certificate_required``, ``bad_certificate``, ``unknown_ca``). A server that
    closes the connection right after the handshake (as grpc's does without a client
    certificate), or a ``handshake_failure`` alert (also a cipher or version
    mismatch), is only a likely reason: TLS terminators close connections that way
    while their backend restarts.
    """
    context = _unverified_context()
    try:
        load_client_certificate(context, material)
        with _handshake(host, port, context, timeout, server_name=server_name) as sock:
            sock.sendall(_H2_PREFACE)
            answer = sock.recv(1)
    except ssl.SSLError as exc:
        reason = _ssl_reason(exc)
        upper = reason.upper()
        about_us = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE")
        if any(alert in upper for alert in about_us) or (
            "UNKNOWN_CA" in upper and material.has_client_certificate
        ):
            definite = True
        elif "HANDSHAKE_FAILURE" in upper:
            definite = False
        else:
            return None
        how = f"it refused the handshake: {reason}"
    except (OSError, ValueError):
        return None
    else:
        if answer:
            return None  # it talks to us: nothing wrong with our certificate
        definite = False
        how = "it closed the connection right after the TLS handshake"
    if not material.has_client_certificate:
        lead = "requires a client certificate" if definite else "may require a client certificate"
        return Diagnosis(
            f"the server at {where} {lead} ({how}): set certificatePath and keyPath (or a "
            "PKCS#12 certificatePath with certificatePassword)",
            definite,
        )
    lead = "does not accept" if definite else "may not accept"
    return Diagnosis(
        f"the server at {where} {lead} the client certificate in certificatePath ({how}): "
        "give a certificate signed by a CA the server trusts",
        definite,
    )
