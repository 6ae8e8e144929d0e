"""SPEC §6 webhook policy, the rule itself: which URLs and addresses a webhook may use.

Addresses are generated inside every forbidden network and written in every spelling
the system resolver accepts (decimal, hex, octal, short forms), so the rule is proved
for the networks, not for a handful of examples. No test here touches DNS: literals
resolve without it, and names go through a stand-in for the system resolver."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.delivery import urlpolicy
from app.delivery.urlpolicy import UrlRefused, address_problem, check_registration

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
FORBIDDEN_V4 = [network for network, _ in urlpolicy.FORBIDDEN_IPV4]
FORBIDDEN_V6 = [network for network, _ in urlpolicy.FORBIDDEN_IPV6]


def register(url: str, *, allow_private: bool = False) -> None:
    check_registration(url, allow_private=allow_private, resolve_timeout=2.0)


def inside(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> st.SearchStrategy:
    low, high = int(network.network_address), int(network.broadcast_address)
    return st.integers(low, high).map(network.network_address.__class__)


def spellings(address: ipaddress.IPv4Address) -> list[str]:
    """The ways inet_aton (and so getaddrinfo and the kernel's connect) reads an IPv4."""
    a, b, c, d = address.packed
    n = int(address)
    return [str(address), str(n), hex(n), ".".join(f"0{x:o}" for x in (a, b, c, d)),
            f"{a}.{b}.{(c << 8) | d}", f"{a}.{(b << 16) | (c << 8) | d}"]


forbidden_v4 = st.sampled_from(FORBIDDEN_V4).flatmap(inside)
forbidden_v6 = st.sampled_from(FORBIDDEN_V6).flatmap(inside)
any_v4 = st.integers(0, 2**32 - 1).map(V4)
global_v4 = any_v4.filter(lambda a: not any(a in n for n in FORBIDDEN_V4))
global_v6 = inside(urlpolicy.GLOBAL_UNICAST_V6).filter(
    lambda a: not any(a in n for n in FORBIDDEN_V6))


@settings(max_examples=300, deadline=None)
@given(address=forbidden_v4, data=st.data())
def test_a_forbidden_ipv4_is_refused_in_every_spelling(address, data):
    spelling = data.draw(st.sampled_from(spellings(address)))
    with pytest.raises(UrlRefused):
        register(f"http://{spelling}:8080/hook")
    assert address_problem(address) is not None


@settings(max_examples=200, deadline=None)
@given(address=forbidden_v6)
def test_a_forbidden_ipv6_is_refused(address):
    with pytest.raises(UrlRefused):
        register(f"https://[{address}]/hook")


@settings(max_examples=100, deadline=None)
@given(address=any_v4)
def test_an_ipv4_mapped_or_compatible_ipv6_is_refused_whatever_it_embeds(address):
    for form in (f"::ffff:{address}", f"::{address}", f"::ffff:0:{address}"):
        with pytest.raises(UrlRefused):
            register(f"http://[{form}]/hook")


@settings(max_examples=100, deadline=None)
@given(embedded=forbidden_v4)
def test_a_nat64_address_is_judged_by_the_ipv4_it_embeds(embedded):
    nat64 = V6(int(urlpolicy.NAT64_WELL_KNOWN.network_address) | int(embedded))
    with pytest.raises(UrlRefused, match="NAT64"):
        register(f"http://[{nat64}]/hook")


def test_a_nat64_address_of_a_public_ipv4_is_allowed():
    register("http://[64:ff9b::808:808]/hook")  # 8.8.8.8 through a DNS64 network


@settings(max_examples=100, deadline=None)
@given(address=st.integers(0, 2**128 - 1).map(V6).filter(
    lambda a: a not in urlpolicy.GLOBAL_UNICAST_V6 and a not in urlpolicy.NAT64_WELL_KNOWN))
def test_ipv6_outside_global_unicast_is_refused(address):
    assert address_problem(address) is not None


@settings(max_examples=200, deadline=None)
@given(address=global_v4)
def test_a_global_ipv4_is_allowed(address):
    register(f"http://{address}/hook")


@settings(max_examples=100, deadline=None)
@given(address=global_v6)
def test_a_global_ipv6_is_allowed(address):
    register(f"https://[{address}]:8443/hook")


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"),
    ("172.31.255.255", "private"), ("192.168.0.1", "private"), ("fd00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("100.64.0.1", "CGNAT"),
    ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"), ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "IPv4-mapped"), ("::127.0.0.1", "IPv4-compatible"),
    ("2002:7f00:1::", "6to4"), ("2001:0:4136:e378::1", "Teredo"),
    ("64:ff9b::7f00:1", "NAT64 address of 127.0.0.1, a loopback"),
])
def test_a_refusal_says_what_kind_of_address_it_is(address, reason):
    assert reason in (address_problem(ipaddress.ip_address(address)) or "")


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize(("url", "reason"), [
    ("http://user:secret@example.com/hook", "userinfo"),
    ("https://user@example.com/hook", "userinfo"),
    ("ftp://example.com/hook", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "scheme"),
    ("http:///hook", "host"),
])
def test_scheme_and_userinfo_are_checked_even_when_private_addresses_are_allowed(
    url, reason, allow_private
):
    with pytest.raises(UrlRefused, match=reason):
        register(url, allow_private=allow_private)


def test_with_private_addresses_allowed_loopback_and_link_local_pass():
    for url in ("http://127.0.0.1:9/h", "http://[::1]/h", "http://169.254.169.254/",
                "http://2130706433/h", "http://localhost/h"):
        register(url, allow_private=True)


def test_a_name_is_refused_when_it_resolves_to_a_forbidden_address(monkeypatch):
    monkeypatch.setattr(urlpolicy, "lookup_addresses", lambda host, port: ["127.0.0.1"])
    with pytest.raises(UrlRefused, match="hooks.example.com resolves to 127.0.0.1, a loopback"):
        register("https://hooks.example.com/h")


def test_a_name_is_refused_when_any_of_its_addresses_is_forbidden(monkeypatch):
    monkeypatch.setattr(urlpolicy, "lookup_addresses",
                        lambda host, port: ["93.184.216.34", "2606:2800:220:1::1", "10.0.0.7"])
    with pytest.raises(UrlRefused, match="10.0.0.7, a private"):
        register("https://hooks.example.com/h")


def test_localhost_is_refused_through_the_real_resolver():
    with pytest.raises(UrlRefused, match="localhost resolves to"):
        register("http://localhost:8080/h")


def test_a_name_that_does_not_resolve_is_accepted_at_registration(monkeypatch):
    """Delivery checks again before every connect, so accepting it sends nothing
    unchecked; refusing would tie registration to DNS being ready first."""

    def nowhere(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(urlpolicy, "lookup_addresses", nowhere)
    register("https://not-yet.example.com/h")


def test_a_slow_resolver_holds_registration_for_the_resolve_timeout_only(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(urlpolicy, "lookup_addresses",
                        lambda host, port: release.wait(30) and ["127.0.0.1"])
    started = time.monotonic()
    try:
        check_registration("https://slow.example.com/h", allow_private=False,
                           resolve_timeout=0.3)
    finally:
        release.set()
    assert time.monotonic() - started < 3.0
