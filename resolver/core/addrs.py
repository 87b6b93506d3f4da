"""Which answer addresses may reach an agent (DNS-rebinding defence).

`is_public(ip)` decides whether an address in a DNS answer points "out there"
(fine) or back into the host's own networks (loopback, RFC 1918, link-local,
...), which an answer from the internet has no business doing: that is a
DNS-rebinding attempt, and the query path strips such addresses unless the
policy's `[allow] cidrs` covers them (`rebinding_filter`).

This is deliberately *not* `ipaddress.ip_address(x).is_global`: the
documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32) count as public here, so tests and examples can use them, and
IPv6 forms that smuggle an IPv4 address (IPv4-mapped, NAT64, 6to4, Teredo) are
judged by the IPv4 address they carry.

Not public:

- IPv4: 0.0.0.0/8 (incl. unspecified), 10/8, 100.64/10 (CGNAT), 127/8,
  169.254/16, 172.16/12, 192.168/16, 224/4 (multicast), 240/4 (reserved,
  incl. 255.255.255.255 broadcast).
- IPv6: ::/96 (unspecified, loopback, deprecated IPv4-compatible), fe80::/10,
  fec0::/10 (deprecated site-local), fc00::/7 (ULA), ff00::/8 (multicast),
  64:ff9b:1::/48 (local-use NAT64), and ::ffff:0:0/96 (mapped),
  ::ffff:0:0:0/96 (translated), 64:ff9b::/96 (NAT64), 2002::/16 (6to4),
  2001::/32 (Teredo, server or client) when the embedded IPv4 is not public.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["embedded_ipv4", "is_public", "rebinding_filter"]


def _nets(*cidrs: str) -> tuple[tuple[int, int], ...]:
    out = []
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr)
        out.append((int(net.network_address), int(net.netmask)))
    return tuple(out)


_V4_NOT_PUBLIC = _nets(
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)

_V6_NOT_PUBLIC = _nets(
    "::/96",
    "fe80::/10",
    "fec0::/10",
    "fc00::/7",
    "ff00::/8",
    "64:ff9b:1::/48",
)

_MAPPED = _nets("::ffff:0:0/96")[0]
_TRANSLATED = _nets("::ffff:0:0:0/96")[0]
_NAT64 = _nets("64:ff9b::/96")[0]
_SIXTOFOUR = _nets("2002::/16")[0]
_TEREDO = _nets("2001::/32")[0]
_U32 = 0xFFFFFFFF


def _v4_public(value: int) -> bool:
    for net, mask in _V4_NOT_PUBLIC:
        if value & mask == net:
            return False
    return True


def _in(value: int, net: tuple[int, int]) -> bool:
    return value & net[1] == net[0]


def _embedded(value: int) -> list[int]:
    """IPv4 addresses (as ints) carried inside an IPv6 address, if any."""
    if _in(value, _MAPPED) or _in(value, _TRANSLATED) or _in(value, _NAT64):
        return [value & _U32]
    if _in(value, _SIXTOFOUR):
        return [(value >> 80) & _U32]
    if _in(value, _TEREDO):
        return [(value >> 64) & _U32, (value & _U32) ^ _U32]  # server, client (obfuscated)
    return []


def embedded_ipv4(ip: str | IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address embeds (mapped, NAT64, 6to4, Teredo); [] otherwise."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if addr.version == 4:
        return []
    return [ipaddress.IPv4Address(v) for v in _embedded(int(addr))]


@lru_cache(maxsize=65536)
def _is_public_text(ip: str) -> bool:
    return _is_public_addr(ipaddress.ip_address(ip))


def _is_public_addr(addr: IPAddress) -> bool:
    value = int(addr)
    if addr.version == 4:
        return _v4_public(value)
    for net, mask in _V6_NOT_PUBLIC:
        if value & mask == net:
            return False
    return all(_v4_public(v4) for v4 in _embedded(value))


def is_public(ip: str | IPAddress) -> bool:
    """True if `ip` may legitimately appear in an answer from the internet.

    Accepts text ("203.0.113.7", "2001:db8::1") or an `ipaddress` object.
    Raises ValueError for something that is not an IP address.
    """
    if isinstance(ip, str):
        return _is_public_text(ip)
    return _is_public_addr(ip)


T = TypeVar("T")


def _ip_of(item: object) -> str | IPAddress:
    if isinstance(item, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return item
    if isinstance(item, tuple) and item:
        return item[0]
    raise TypeError(f"expected an address or an (address, ...) tuple, got {item!r}")


def _covered(addr: IPAddress, allowed: Sequence[IPNetwork]) -> bool:
    candidates: list[IPAddress] = [addr]
    if addr.version == 6:
        candidates.extend(embedded_ipv4(addr))
    return any(c.version == net.version and c in net for c in candidates for net in allowed)


def rebinding_filter(ips: Iterable[T], allowed_cidrs: Iterable[IPNetwork | str] = ()
                     ) -> tuple[list[T], list[T]]:
    """Split answer addresses into (kept, stripped).

    Items are address strings / `ipaddress` objects, or tuples whose first
    element is one (e.g. `(ip, ttl)`); they come back unchanged, in order.
    An address is kept if it is public, or if `allowed_cidrs` (the policy's
    `[allow] cidrs`) covers it (or the IPv4 address it embeds). Unparseable
    addresses are stripped.
    """
    allowed = [c if not isinstance(c, str) else ipaddress.ip_network(c, strict=False)
               for c in allowed_cidrs]
    kept: list[T] = []
    stripped: list[T] = []
    for item in ips:
        raw = _ip_of(item)
        try:
            if is_public(raw):
                kept.append(item)
                continue
            addr = ipaddress.ip_address(raw) if isinstance(raw, str) else raw
        except ValueError:
            stripped.append(item)
            continue
        (kept if allowed and _covered(addr, allowed) else stripped).append(item)
    return kept, stripped


# ------------------------------------------------------------------ fenced users' DNS sources

# The user-mode fence redirects a user's DNS to dnsguard and rewrites its source so dnsguard
# accepts it (DNAT + SNAT). Rewritten to a loopback address that *encodes the uid*,
# 127.255.<uid high byte>.<uid low byte>, the source itself says whose lookup it was: the log
# writer turns it back into the user's name, with nothing on the DNS path and no conntrack
# query. The whole of 127/8 is local on Linux, so replies reach the user's socket as before;
# the default [server] clients (127.0.0.0/8) covers these sources.
USER_SOURCE_NET = ipaddress.IPv4Network("127.255.0.0/16")
_USER_BASE = int(USER_SOURCE_NET.network_address)


def user_source(uid: int) -> str | None:
    """The IPv4 source the fence gives uid's redirected DNS; None when uid does not fit (>= 65535)."""
    if not 0 < uid < 0xFFFF:
        return None
    return str(ipaddress.IPv4Address(_USER_BASE + uid))


def uid_from_source(addr: str) -> int | None:
    """The uid a `user_source` address stands for, else None."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if ip.version != 4 or ip not in USER_SOURCE_NET:
        return None
    uid = int(ip) - _USER_BASE
    return uid if 0 < uid < 0xFFFF else None
