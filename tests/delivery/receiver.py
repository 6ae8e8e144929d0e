"""Webhook receivers on 127.0.0.1: one that records what it gets and can fail or
redirect on purpose, and hostile ones that drip their answer or send an endless one."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import tempfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class WebhookReceiver:
    """`fail_first[key] = n`: answer 500 to the first n attempts of each event whose type,
    session id or shop id is `key` ('*' for every event). `redirect_to`: answer every
    POST with a 302 to that URL (and record nothing as received)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[dict[str, Any]] = []  # accepted (2xx) deliveries, in order
        self.attempts: Counter[str] = Counter()  # per delivery id
        self.fail_first: dict[str, int] = {}
        self.redirect_to: str | None = None
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with outer.lock:
                    delivery_id = headers.get("x-autosession-delivery", "")
                    outer.attempts[delivery_id] += 1
                    if outer.redirect_to is not None:
                        self.send_response(302)
                        self.send_header("Location", outer.redirect_to)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    shop = (body.get("data") or {}).get("shop_id") or ""
                    limit = max(outer.fail_first.get(body.get("session_id") or "", 0),
                                outer.fail_first.get(shop, 0),
                                outer.fail_first.get(body.get("type"), 0),
                                outer.fail_first.get("*", 0))
                    failing = outer.attempts[delivery_id] <= limit
                    if not failing:
                        outer.received.append({"raw": raw, "body": body, "headers": headers})
                status = 500 if failing else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/hooks/auto-session"

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r["body"] for r in self.received]

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def tls_contexts(hostname: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throw-away CA and a certificate for `hostname`: (server context, a client
    context that trusts only that CA). Needs the `cryptography` package."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: str, signer, *, ca: bool):  # type: ignore[no-untyped-def]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("test CA", ca_key, "test CA", ca_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = certificate(hostname, leaf_key, "test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    with tempfile.TemporaryDirectory() as tmp:
        chain, key_file = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
        chain.write_bytes(leaf_cert.public_bytes(pem))
        key_file.write_bytes(leaf_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(chain, key_file)
    client = ssl.create_default_context(cadata=ca_cert.public_bytes(pem).decode())
    return server, client


class HostileReceiver:
    """Reads a POST, then answers slowly or endlessly, counting what it managed to send.

    - ``drip_status``: the status line and headers, one byte every `interval` seconds;
    - ``drip_body``: "200 OK" with a Content-Length at once, then the body one byte
      every `interval` seconds;
    - ``endless``: a 500 whose body is `endless_bytes` long, written as fast as the
      client takes it.

    Each read of a drip arrives well within any per-read timeout, so only a deadline for
    the whole attempt ends it."""

    def __init__(self, mode: str, *, interval: float = 0.5, drip_bytes: int = 60,
                 endless_bytes: int = 256 * 1024 * 1024) -> None:
        self.mode = mode
        self.interval = interval
        self.drip_bytes = drip_bytes
        self.endless_bytes = endless_bytes
        self.requests = 0
        self.sent = 0  # bytes of the answer written before the client hung up
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # the accept loop looks at `stop` this often
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/hooks/hostile"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            body += chunk
        self.requests += 1

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._read_request(conn)
                if self.mode == "endless":
                    conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\n"
                                 b"Content-Length: %d\r\n\r\n" % self.endless_bytes)
                    block = b"x" * 65536
                    while self.sent < self.endless_bytes and not self.stop.is_set():
                        conn.sendall(block)
                        self.sent += len(block)
                    return
                if self.mode == "drip_status":
                    answer = b"HTTP/1.1 204 No Content\r\nX-Pad: " + b"a" * self.drip_bytes
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                 % self.drip_bytes)
                    answer = b"b" * self.drip_bytes
                for byte in answer:
                    if self.stop.wait(self.interval):
                        return
                    conn.sendall(bytes([byte]))
                    self.sent += 1
            except OSError:
                return  # the client hung up, as it should

    def __enter__(self) -> HostileReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.listener.close()
