"""Where a callback may go: refuse targets inside the server's own network (SSRF).

A callback URL must be http(s) and its host must resolve only to public addresses. Loopback,
private (RFC 1918, ULA), link-local (cloud metadata at 169.254.169.254), unspecified, multicast,
reserved and other non-global addresses are refused, unless the operator lists the host, or a
network holding the address, in COGVIEW_WEBHOOK_ALLOW_HOSTS. The check runs at submit and again
before every delivery, whose connection then goes to the very address that was checked, so a
DNS answer that changes in between (rebinding) cannot redirect it.

A leaf (stdlib only): `config` imports the parsers below, the submit (services) and the
dispatcher the checks.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> addresses; socket.getaddrinfo in production, a table in tests.
Resolver = Callable[[str, int], Sequence[str]]

MAX_URL_CHARS = 2048

log = logging.getLogger(__name__)


class UnsafeTarget(ValueError):
    """The URL may not receive webhooks; the message says why, in a sentence for the client."""


@dataclass(frozen=True)
class AllowList:
    """The operator's exceptions: host names (exact, case-insensitive) and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in net for net in self.networks if net.version == address.version)


@dataclass(frozen=True)
class Target:
    """A checked URL and the addresses it may be delivered to (the checked ones)."""

    url: SplitResult
    host: str
    port: int
    addresses: tuple[str, ...]


def parse_allow_list(text: str) -> AllowList:
    """`"127.0.0.1, 10.0.0.0/8, hooks.internal"` -> AllowList. Raises ValueError on a bad entry."""
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if "/" in entry or not _is_hostname(entry):
            raise ValueError(f"webhook allow-list entry {raw.strip()!r} is not a host or a CIDR")
        hosts.add(entry.rstrip("."))
    return AllowList(frozenset(hosts), tuple(networks))


def parse_retry_schedule(text: str) -> tuple[float, ...]:
    """`"5,30,120"` -> (5.0, 30.0, 120.0): seconds before each retry. Raises ValueError."""
    try:
        delays = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"webhook retry schedule {text!r}: comma-separated seconds") from exc
    if any(not 0 <= d <= 7 * 86400 for d in delays):
        raise ValueError("webhook retry delays must be between 0 and 604800 seconds")
    return delays


def refusal_reason(address: IPAddress) -> str | None:
    """Why this address may not receive webhooks, or None when it is a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv6 address that carries an IPv4 one reaches that one: judged as it. IPv4-mapped
        # (::ffff:a.b.c.d) and 6to4 (2002:AABB:CCDD::/48, which Python counts as global even
        # when it embeds 127.0.0.1); Teredo (2001::/32) and NAT64 (64:ff9b::/96) are refused
        # below already, as private and reserved.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return refusal_reason(embedded)
    checks = (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),  # before private: Python counts 240/4 as both
        ("private", address.is_private),
        ("not publicly routable", not address.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def check_syntax(url: str) -> str:
    """`url` if it is an http(s) URL with a host; raises UnsafeTarget. No DNS: safe anywhere."""
    _split(url)
    return url


def check_url(url: str, allow: AllowList, resolve: Resolver | None = None) -> Target:
    """The target of `url` when webhooks may go there; raises UnsafeTarget otherwise.

    Resolves the host (blocking): call it off the event loop."""
    parts = _split(url)
    host = _ascii_host(parts.hostname or "")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = tuple((resolve or system_resolve)(host, port))
    except (OSError, UnicodeError) as exc:  # getaddrinfo: UnicodeError for an empty label
        raise UnsafeTarget(f"callback_url host {host!r} does not resolve") from exc
    if not addresses:
        raise UnsafeTarget(f"callback_url host {host!r} does not resolve")
    if not allow.allows_host(host):
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            reason = refusal_reason(address)
            if reason is not None and not allow.allows_address(address):
                # The address stays in the server's log: told to a client (at submit, or in
                # an attempt's error on GET task), it would map the internal DNS.
                log.info("callback_url host %r resolves to %s (%s): refused", host, address, reason)
                raise UnsafeTarget(
                    f"callback_url host {host!r} resolves to a non-public address ({reason}); "
                    "webhooks go only to public addresses unless the operator allows the host"
                )
    return Target(url=parts, host=host, port=port, addresses=addresses)


def system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _ascii_host(host: str) -> str:
    """The host as DNS, the Host header and TLS SNI need it: IDNA (`bücher.de` ->
    `xn--bcher-kva.de`). httpx cannot send a non-ASCII Host header at all."""
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:  # an empty or over-long label, or no IDNA form
        raise UnsafeTarget("callback_url host is not a valid host name") from exc


def _split(url: str) -> SplitResult:
    if len(url) > MAX_URL_CHARS:
        raise UnsafeTarget(f"callback_url must be at most {MAX_URL_CHARS} characters")
    if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        raise UnsafeTarget("callback_url must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise UnsafeTarget(f"callback_url is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise UnsafeTarget("callback_url must be an http:// or https:// URL")
    if not parts.hostname:
        raise UnsafeTarget("callback_url must name a host")
    return parts


def _is_hostname(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return all(
        0 < len(label) <= 63 and all(c.isalnum() or c == "-" for c in label) for label in labels
    )
