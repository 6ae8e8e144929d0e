"""One webhook POST: to a checked address, with one deadline, reading a bounded answer
(SPEC §6, webhook policy).

httpx's timeouts are per socket operation, so a receiver that drips a byte every few
seconds keeps one attempt alive for as long as it likes, and a check of the URL before
`httpx.post` resolves the name once for the check and again for the connect (DNS
rebinding). Both are closed here, one level down, on httpcore (httpx's own engine):

- the network backend resolves the host itself, refuses it unless every address passes
  `urlpolicy`, and connects to one of exactly those addresses; TLS still verifies the
  certificate for the URL's host name, and the Host header is the URL's;
- every connect, TLS handshake, send and receive gets at most the time left until the
  attempt's deadline (a TLS handshake is bounded as a whole by CPython), so the attempt
  ends by `WEBHOOK_TIMEOUT` whatever the receiver does;
- redirects are not followed (httpcore never does), proxies from the environment are
  not used (the connection must go where the check looked), nothing is decompressed,
  and at most `MAX_ANSWER_BYTES` of the answer are read.
"""

from __future__ import annotations

import functools
import ssl
import time
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import httpcore
import httpx

from app.delivery import urlpolicy

MAX_ANSWER_BYTES = 64 * 1024
ERROR_TEXT_CHARS = 300

_HTTPCORE_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
                    httpcore.ConnectionNotAvailable, httpcore.ProxyError, OSError)


@dataclass(frozen=True)
class PostOutcome:
    status_code: int | None  # None when no answer came back
    error: str | None  # None when the receiver answered 2xx


class AttemptDeadline:
    """A monotonic deadline; every socket operation asks it how long it may block."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def bound(self, timeout: float | None, expired: type[httpcore.TimeoutException]) -> float:
        """`timeout` cut to the time left; raises `expired` once there is none."""
        left = self.remaining()
        if left <= 0:
            raise expired(f"the attempt's {self.seconds:g} s deadline (WEBHOOK_TIMEOUT) passed")
        return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadline: AttemptDeadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.bound(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.bound(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname,
                                    self._deadline.bound(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _CheckedBackend(httpcore.NetworkBackend):
    """Connects only to addresses the policy allowed, resolved once, under the deadline."""

    def __init__(self, deadline: AttemptDeadline, *, allow_private: bool) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline
        self._allow_private = allow_private

    def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = urlpolicy.allowed_addresses(
            host, port, allow_private=self._allow_private,
            timeout=self._deadline.bound(timeout, httpcore.ConnectTimeout),
        )
        failure: httpcore.ConnectError | None = None
        for address in addresses:  # the resolver's order, like socket.create_connection
            try:
                stream = self._inner.connect_tcp(
                    str(address), port,
                    timeout=self._deadline.bound(timeout, httpcore.ConnectTimeout),
                    local_address=local_address, socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                failure = exc
                continue
            return _DeadlineStream(stream, self._deadline)
        raise failure or httpcore.ConnectError(f"no address to connect to for {host}")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.UnsupportedProtocol("webhooks are delivered over TCP only")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """The same trust store httpx uses (certifi), built once per process."""
    return httpx.create_ssl_context()


def post_webhook(
    url: str, *, body: bytes, headers: Mapping[str, str], timeout: float, allow_private: bool,
) -> PostOutcome:
    """POST `body` to `url` once, within `timeout` seconds end to end; never raises for
    anything the receiver, the network or the URL policy does."""
    deadline = AttemptDeadline(timeout)
    try:
        parsed = urlpolicy.check_url_form(url)
    except urlpolicy.UrlRefused as exc:
        return PostOutcome(None, f"refused by the webhook URL policy: URL {exc}")
    target = httpcore.URL(scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port,
                          target=parsed.raw_path)
    request_headers = [(b"Host", parsed.netloc), (b"Accept-Encoding", b"identity"),
                       *((k.encode(), v.encode()) for k, v in headers.items())]
    pool = httpcore.ConnectionPool(
        ssl_context=_ssl_context(), max_connections=1, retries=0, http1=True, http2=False,
        network_backend=_CheckedBackend(deadline, allow_private=allow_private),
    )
    per_operation = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    try:
        with pool, pool.stream("POST", target, headers=request_headers, content=body,
                               extensions={"timeout": per_operation}) as response:
            status = response.status
            answer = bytearray()
            for chunk in response.iter_stream():
                answer += chunk
                if len(answer) >= MAX_ANSWER_BYTES:
                    break  # enough to explain a failure; the rest is never read
    except urlpolicy.UrlRefused as exc:
        return PostOutcome(None, f"refused by the webhook URL policy: {exc}")
    except urlpolicy.ResolutionFailed as exc:
        return PostOutcome(None, f"ResolutionFailed: {exc}")
    except httpcore.TimeoutException as exc:
        return PostOutcome(None, f"{exc.__class__.__name__}: no complete answer within "
                                 f"{timeout:g} s (WEBHOOK_TIMEOUT): {exc}"[:1000])
    except _HTTPCORE_ERRORS as exc:
        return PostOutcome(None, f"{exc.__class__.__name__}: {exc}"[:1000])
    if 200 <= status < 300:
        return PostOutcome(status, None)
    text = bytes(answer[: ERROR_TEXT_CHARS * 4]).decode("utf-8", "replace")[:ERROR_TEXT_CHARS]
    note = " (redirects are not followed)" if 300 <= status < 400 else ""
    return PostOutcome(status, f"HTTP {status}{note}: {text}")
