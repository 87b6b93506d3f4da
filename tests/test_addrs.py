"""resolver.core.addrs: which answer addresses are public, and rebinding stripping."""

from __future__ import annotations

import ipaddress

import pytest

from resolver.core.addrs import embedded_ipv4, is_public, rebinding_filter

PUBLIC = [
    # ordinary internet
    "1.2.3.4", "93.184.216.34", "151.101.0.223", "9.255.255.255", "11.0.0.0",
    "100.63.255.255", "100.128.0.0",          # just outside CGNAT
    "126.255.255.255", "128.0.0.0",           # around loopback
    "169.253.255.255", "169.255.0.0",         # around link-local
    "172.15.255.255", "172.32.0.0",           # around 172.16/12
    "192.167.255.255", "192.169.0.0",         # around 192.168/16
    "1.0.0.0", "223.255.255.255",             # edges of 0/8 and multicast
    # documentation ranges count as public (on purpose, unlike is_global)
    "192.0.2.0", "192.0.2.1", "192.0.2.255", "198.51.100.7", "203.0.113.10", "203.0.113.255",
    "2001:db8::", "2001:db8::1", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
    # ordinary IPv6
    "2606:4700:4700::1111", "2a00:1450:4001:82b::200e", "2001:4860:4860::8888",
    "fbff:ffff::1", "fe00::1", "fe7f::1", "ff::1",
    # IPv6 forms embedding a public IPv4
    "::ffff:93.184.216.34", "::ffff:203.0.113.9", "64:ff9b::5db8:d822", "::ffff:0:5db8:d822",
    "2002:5db8:d822::1",                                          # 6to4 of 93.184.216.34
    "2001:0:4136:e378:8000:63bf:a247:27dd",  # Teredo: server 65.54.227.120, client 93.184.216.34
]

NOT_PUBLIC = [
    # 0.0.0.0/8 and unspecified
    "0.0.0.0", "0.1.2.3", "0.255.255.255",
    # RFC 1918
    "10.0.0.0", "10.1.2.3", "10.255.255.255",
    "172.16.0.0", "172.20.1.1", "172.31.255.255",
    "192.168.0.0", "192.168.1.1", "192.168.255.255",
    # CGNAT
    "100.64.0.0", "100.100.100.100", "100.127.255.255",
    # loopback
    "127.0.0.1", "127.0.0.0", "127.255.255.254", "127.1.2.3",
    # link-local
    "169.254.0.0", "169.254.169.254", "169.254.255.255",
    # multicast, reserved, broadcast
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    # IPv6 unspecified / loopback / IPv4-compatible
    "::", "::1", "::7f00:1", "::a00:1",
    # link-local, site-local, ULA, multicast
    "fe80::1", "fe80::1ff:fe23:4567:890a", "febf:ffff::1", "fec0::1", "feff::1",
    "fc00::1", "fd00::1", "fdff:ffff::1",
    "ff02::1", "ff05::1:3", "ff00::",
    # IPv4-mapped / translated embedding non-public
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:192.168.1.1", "::ffff:169.254.169.254",
    "::ffff:0.0.0.0", "::ffff:100.64.0.1", "::ffff:0:7f00:1",
    # NAT64 embedding non-public, local-use NAT64
    "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::c0a8:101", "64:ff9b:1::1",
    # 6to4 embedding non-public
    "2002:7f00:1::1", "2002:a00:1::", "2002:c0a8:101::1", "2002:a9fe:a9fe::1",
    # Teredo with a private client (obfuscated 10.0.0.1 = f5ff:fffe) or private server
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    "2001:0:a00:1:8000:63bf:f7f7:f7f7",
]


@pytest.mark.parametrize("ip", PUBLIC)
def test_public(ip: str) -> None:
    assert is_public(ip) is True
    assert is_public(ipaddress.ip_address(ip)) is True


@pytest.mark.parametrize("ip", NOT_PUBLIC)
def test_not_public(ip: str) -> None:
    assert is_public(ip) is False
    assert is_public(ipaddress.ip_address(ip)) is False


@pytest.mark.parametrize("cidr", [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
])
def test_every_edge_of_v4_ranges(cidr: str) -> None:
    net = ipaddress.ip_network(cidr)
    assert not is_public(net.network_address)
    assert not is_public(net.broadcast_address)
    below = int(net.network_address) - 1
    above = int(net.broadcast_address) + 1
    # neighbours are public unless they fall in another listed range
    for v in (below, above):
        if 0 <= v < 2**32:
            neighbour = ipaddress.IPv4Address(v)
            expected = not any(neighbour in ipaddress.ip_network(c) for c in (
                "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
                "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4"))
            assert is_public(neighbour) is expected, neighbour


def test_documentation_ranges_differ_from_is_global() -> None:
    for ip in ("192.0.2.1", "198.51.100.1", "203.0.113.1", "2001:db8::1"):
        assert not ipaddress.ip_address(ip).is_global
        assert is_public(ip)


def test_every_embedded_form_of_every_v4_private() -> None:
    for v4 in ("127.0.0.1", "10.9.8.7", "172.16.5.4", "192.168.0.1", "169.254.1.1", "100.64.1.1",
               "0.0.0.0", "224.0.0.1", "255.255.255.255"):
        n = int(ipaddress.IPv4Address(v4))
        forms = [
            (0xFFFF << 32) | n,                              # ::ffff:a.b.c.d
            (0xFFFF << 48) | n,                              # ::ffff:0:a.b.c.d
            (0x64FF9B << 96) | n,                            # 64:ff9b::a.b.c.d
            (0x2002 << 112) | (n << 80) | 1,                 # 2002:aabb:ccdd::1
            (0x20010000 << 96) | (n << 64) | (0xFFFFFFFF ^ 0x5DB8D822),  # Teredo server
            (0x20010000 << 96) | (0x5DB8D822 << 64) | (n ^ 0xFFFFFFFF),  # Teredo client
        ]
        for value in forms:
            addr = ipaddress.IPv6Address(value)
            assert not is_public(addr), (v4, addr)
            assert not is_public(str(addr)), (v4, addr)
            assert ipaddress.IPv4Address(n) in embedded_ipv4(addr)


def test_embedded_ipv4_none_for_plain_addresses() -> None:
    assert embedded_ipv4("2001:db8::1") == []
    assert embedded_ipv4("203.0.113.1") == []
    assert embedded_ipv4("::ffff:1.2.3.4") == [ipaddress.IPv4Address("1.2.3.4")]


@pytest.mark.parametrize("bad", ["", "example.com", "1.2.3", "256.0.0.1", "::g", "1.2.3.4/32"])
def test_invalid_raises(bad: str) -> None:
    with pytest.raises(ValueError):
        is_public(bad)


def test_rebinding_filter_strings() -> None:
    kept, stripped = rebinding_filter(["203.0.113.1", "127.0.0.1", "10.0.0.1", "2001:db8::5", "fe80::1"], [])
    assert kept == ["203.0.113.1", "2001:db8::5"]
    assert stripped == ["127.0.0.1", "10.0.0.1", "fe80::1"]


def test_rebinding_filter_tuples_keep_order_and_shape() -> None:
    items = [("10.0.0.1", 60), ("203.0.113.1", 30), ("192.168.1.5", 5), ("::1", 9)]
    kept, stripped = rebinding_filter(items, [ipaddress.ip_network("10.0.0.0/8")])
    assert kept == [("10.0.0.1", 60), ("203.0.113.1", 30)]
    assert stripped == [("192.168.1.5", 5), ("::1", 9)]


def test_rebinding_filter_allowed_cidrs_as_text_and_embedded() -> None:
    kept, stripped = rebinding_filter(
        ["192.168.1.5", "::ffff:192.168.1.5", "64:ff9b::c0a8:106", "fd00::1", "fd01::1", "192.168.2.1"],
        ["192.168.1.0/24", "fd00::/16"])
    assert kept == ["192.168.1.5", "::ffff:192.168.1.5", "64:ff9b::c0a8:106", "fd00::1"]
    assert stripped == ["fd01::1", "192.168.2.1"]


def test_rebinding_filter_garbage_is_stripped() -> None:
    kept, stripped = rebinding_filter(["nonsense", "203.0.113.1"], [])
    assert kept == ["203.0.113.1"]
    assert stripped == ["nonsense"]


def test_rebinding_filter_mixed_families_in_cidrs() -> None:
    kept, stripped = rebinding_filter(["10.0.0.1", "fd00::1"], ["fd00::/8"])
    assert kept == ["fd00::1"]
    assert stripped == ["10.0.0.1"]


def test_rebinding_filter_ipaddress_objects() -> None:
    a = ipaddress.ip_address("127.0.0.1")
    b = ipaddress.ip_address("203.0.113.3")
    assert rebinding_filter([a, b]) == ([b], [a])
