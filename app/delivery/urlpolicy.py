"""Where a webhook may be sent (SPEC §6, webhook policy): the guard against SSRF.

A webhook URL is chosen by an API client, and the server POSTs to it from inside the
deployment's network, so an unchecked URL lets any client reach the metadata service
(169.254.169.254), the database or an admin port on loopback. The policy:

- the URL is `http` or `https`, names a host, and carries no userinfo
  (``http://user:pass@host``): always, whatever the settings;
- every address the host is, or resolves to, is a global unicast address: not
  loopback, private (RFC 1918, fc00::/7), shared (CGNAT 100.64/10), link-local,
  unspecified, multicast, broadcast, documentation or otherwise reserved, and not an
  IPv6 form that tunnels to IPv4 (mapped ``::ffff:127.0.0.1``, compatible, 6to4,
  Teredo). A NAT64 address (64:ff9b::/96) is judged by the IPv4 address it embeds.
  `WEBHOOK_ALLOW_PRIVATE=true` turns these address checks off (tests, closed networks).

Hosts are resolved with `socket.getaddrinfo`, which reads the odd IPv4 spellings
(``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``) the way the kernel's
connect would; the networks are listed here rather than taken from `ipaddress`'s
`is_private`/`is_global`, whose answers differ between Python releases.

The check runs at registration and again at every delivery, inside the connection
itself (`app.delivery.transport`), on the very addresses that are then connected to.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Sequence

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = ("http", "https")

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# First match wins: narrower entries come before the wider ones that contain them.
FORBIDDEN_IPV4: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/8"), "an unspecified ('this network') address"),
    (_V4("10.0.0.0/8"), "a private address"),
    (_V4("100.64.0.0/10"), "a shared (CGNAT) address"),
    (_V4("127.0.0.0/8"), "a loopback address"),
    (_V4("169.254.0.0/16"), "a link-local address"),
    (_V4("172.16.0.0/12"), "a private address"),
    (_V4("192.0.0.0/24"), "a reserved (IETF protocol assignment) address"),
    (_V4("192.0.2.0/24"), "a documentation address"),
    (_V4("192.88.99.0/24"), "a reserved (6to4 relay) address"),
    (_V4("192.168.0.0/16"), "a private address"),
    (_V4("198.18.0.0/15"), "a reserved (benchmarking) address"),
    (_V4("198.51.100.0/24"), "a documentation address"),
    (_V4("203.0.113.0/24"), "a documentation address"),
    (_V4("224.0.0.0/4"), "a multicast address"),
    (_V4("255.255.255.255/32"), "the broadcast address"),
    (_V4("240.0.0.0/4"), "a reserved address"),
)

NAT64_WELL_KNOWN = _V6("64:ff9b::/96")  # judged by the IPv4 address in its last 32 bits
GLOBAL_UNICAST_V6 = _V6("2000::/3")  # anything outside it (and not listed) is reserved

FORBIDDEN_IPV6: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "an unspecified address"),
    (_V6("::1/128"), "a loopback address"),
    (_V6("::ffff:0:0/96"), "an IPv4-mapped IPv6 address"),
    (_V6("::/96"), "an IPv4-compatible IPv6 address"),
    (_V6("::ffff:0:0:0/96"), "an IPv4-translated IPv6 address"),
    (_V6("64:ff9b:1::/48"), "a local-use NAT64 address"),
    (_V6("100::/64"), "a discard-only address"),
    (_V6("2001::/32"), "a Teredo tunnel address"),
    (_V6("2001:2::/48"), "a reserved (benchmarking) address"),
    (_V6("2001:db8::/32"), "a documentation address"),
    (_V6("2002::/16"), "a 6to4 tunnel address"),
    (_V6("3fff::/20"), "a documentation address"),
    (_V6("fc00::/7"), "a private (unique local) address"),
    (_V6("fe80::/10"), "a link-local address"),
    (_V6("fec0::/10"), "a site-local address"),
    (_V6("ff00::/8"), "a multicast address"),
)


class UrlRefused(ValueError):
    """The URL, or an address its host resolves to, is not a place webhooks may go."""


class ResolutionFailed(OSError):
    """The host did not resolve (in time)."""


def address_problem(address: IPAddress) -> str | None:
    """Why webhooks may not go to `address` (e.g. "a loopback address"), or None."""
    if isinstance(address, ipaddress.IPv4Address):
        for network, reason in FORBIDDEN_IPV4:
            if address in network:
                return reason
        return None
    plain = ipaddress.IPv6Address(int(address))  # without a %scope
    if plain in NAT64_WELL_KNOWN:
        embedded = ipaddress.IPv4Address(int(plain) & 0xFFFFFFFF)
        problem = address_problem(embedded)
        return f"a NAT64 address of {embedded}, {problem}" if problem else None
    for network6, reason in FORBIDDEN_IPV6:
        if plain in network6:
            return reason
    if plain not in GLOBAL_UNICAST_V6:
        return "a reserved address"
    return None


def literal_address(host: str) -> IPAddress | None:
    """`host` as an IP address when it is written as one in standard form (brackets
    allowed), else None; odd spellings are left to the resolver."""
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def check_url_form(url: str) -> httpx.URL:
    """The URL parsed, if its form is acceptable: http(s), a host, no userinfo. These
    checks hold even with WEBHOOK_ALLOW_PRIVATE."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UrlRefused(f"is not a valid URL ({exc})") from None
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise UrlRefused(f"scheme {parsed.scheme or '(none)'!r} is not allowed; use http or https")
    if parsed.userinfo:
        raise UrlRefused("must not carry a user name or password (userinfo)")
    if not parsed.host:
        raise UrlRefused("has no host")
    return parsed


def lookup_addresses(host: str, port: int) -> list[str]:
    """The system resolver's addresses for `host` (what a connect would use)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            if info[0] in (socket.AF_INET, socket.AF_INET6)]


def resolve(host: str, port: int, *, timeout: float) -> list[IPAddress]:
    """Every address of `host`, in the resolver's order, within `timeout` seconds.

    `getaddrinfo` has no timeout of its own, so it runs in a daemon thread that is
    abandoned when the time is up (it ends when the system resolver gives up)."""
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    outcome: dict[str, list[str] | OSError] = {}

    def run() -> None:
        try:
            outcome["addresses"] = lookup_addresses(host, port)
        except OSError as exc:  # socket.gaierror and friends
            outcome["error"] = exc
        except UnicodeError as exc:  # a label the IDNA codec cannot encode
            outcome["error"] = OSError(str(exc))

    worker = threading.Thread(target=run, name="webhook-resolve", daemon=True)
    worker.start()
    worker.join(max(0.0, timeout))
    found = outcome.get("addresses")
    if isinstance(found, list):
        addresses: list[IPAddress] = []
        for text in found:
            try:
                addresses.append(ipaddress.ip_address(text))
            except ValueError:  # not an IP address: nothing a connect could use
                continue
        addresses = list(dict.fromkeys(addresses))
        if addresses:
            return addresses
        raise ResolutionFailed(f"{host} has no IPv4 or IPv6 address")
    error = outcome.get("error")
    if isinstance(error, OSError):
        reason = getattr(error, "strerror", None) or str(error)
        raise ResolutionFailed(f"{host} does not resolve ({reason})")
    raise ResolutionFailed(f"resolving {host} took longer than {timeout:.3g} s")


def check_addresses(host: str, addresses: Sequence[IPAddress]) -> None:
    """Refuse when any of `host`'s addresses is forbidden: a name with one good and one
    bad address must not depend on which one a connect happens to pick."""
    for address in addresses:
        problem = address_problem(address)
        if problem is None:
            continue
        if literal_address(host) is not None:
            raise UrlRefused(f"host {host} is {problem}")
        raise UrlRefused(f"host {host} resolves to {address}, {problem}")


def allowed_addresses(
    host: str, port: int, *, allow_private: bool, timeout: float
) -> list[IPAddress]:
    """The addresses a delivery may connect to for `host` (all of them, checked); raises
    `UrlRefused`, or `ResolutionFailed` when the host does not resolve in time."""
    addresses = resolve(host, port, timeout=timeout)
    if not allow_private:
        check_addresses(host, addresses)
    return addresses


def check_registration(url: str, *, allow_private: bool, resolve_timeout: float) -> None:
    """Refuse (`UrlRefused`) a webhook URL that may not be registered.

    A name that does not resolve (yet), or not within `resolve_timeout`, is accepted:
    DNS may not be set up before the receiver is, and every delivery checks the
    addresses again before it connects, so nothing unchecked is ever sent."""
    parsed = check_url_form(url)
    if allow_private:
        return
    host = connect_host(parsed)
    try:
        addresses = resolve(host, connect_port(parsed), timeout=resolve_timeout)
    except ResolutionFailed:
        return
    check_addresses(host, addresses)


def connect_host(url: httpx.URL) -> str:
    """The host as a connection uses it: IDNA-encoded, an IPv6 address without brackets."""
    return url.raw_host.decode("ascii")


def connect_port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)
