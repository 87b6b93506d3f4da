"""Upstream exchanges in-process (pytest-asyncio) against real test nameservers on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct

import dns.message
import dns.name
import pytest
from nameserver import POISON_ADDRESS, big_a_rrset_records

from resolver.core.errors import UpstreamError
from resolver.dns import wire
from resolver.dns.clean import Cleaner
from resolver.dns.upstream import Upstream

RECORDS = {"www.up.test.": {"A": "192.0.2.10"}}


def question(name: str, rdtype: int = 1) -> tuple[bytes, int]:
    n = dns.name.from_text(name).to_wire().lower()
    return n + struct.pack(">HH", rdtype, 1), len(n)


def addresses(reply: bytes) -> list[str]:
    answer = dns.message.from_wire(reply).answer
    return sorted(rd.address for rr in answer if rr.rdtype in (1, 28) for rd in rr)


async def test_answer_comes_back_with_our_fresh_id(nameserver):
    ns = nameserver("answer", RECORDS)
    q, n = question("www.up.test.")
    up = Upstream((("127.0.0.1", ns.port),), 2.0)
    reply = await up.query(q, n, 0)
    assert addresses(reply) == ["192.0.2.10"]
    assert ns.udp_count == 1


async def test_spoofed_reply_with_wrong_id_is_ignored(nameserver):
    ns = nameserver("wrong_id", RECORDS)
    q, n = question("www.up.test.")
    reply = await Upstream((("127.0.0.1", ns.port),), 2.0).query(q, n, 0)
    assert POISON_ADDRESS not in addresses(reply)
    assert addresses(reply) == ["192.0.2.10"]


async def test_truncated_udp_reply_is_retried_over_tcp(nameserver):
    ns = nameserver("truncate", big_a_rrset_records("big.up.test.", 300))
    q, n = question("big.up.test.")
    reply = await Upstream((("127.0.0.1", ns.port),), 2.0).query(q, n, 0)
    assert len(addresses(reply)) == 300
    assert (ns.udp_count, ns.tcp_count) == (1, 1)


async def test_failover_after_servfail_and_after_silence(nameserver):
    bad = nameserver("servfail")
    silent = nameserver("blackhole")
    good = nameserver("answer", RECORDS)
    q, n = question("www.up.test.")
    up = Upstream((("127.0.0.1", bad.port), ("127.0.0.1", silent.port), ("127.0.0.1", good.port)), 1.5)
    reply = await up.query(q, n, 0)
    assert addresses(reply) == ["192.0.2.10"]
    assert bad.udp_count == 1 and silent.udp_count == 1 and good.udp_count == 1


async def test_dead_upstream_fails_within_the_timeout(nameserver):
    silent = nameserver("blackhole")
    q, n = question("www.up.test.")
    up = Upstream((("127.0.0.1", silent.port),), 0.3)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(UpstreamError, match="timeout"):
        await up.query(q, n, 0)
    assert loop.time() - start < 1.0


async def test_refused_port_moves_on_without_waiting(nameserver):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    good = nameserver("answer", RECORDS)
    q, n = question("www.up.test.")
    up = Upstream((("127.0.0.1", closed_port), ("127.0.0.1", good.port)), 5.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    reply = await up.query(q, n, 0)
    assert addresses(reply) == ["192.0.2.10"]
    assert loop.time() - start < 2.5  # did not spend its 2.5 s share on the dead port


async def test_poison_is_cleaned_before_caching(nameserver):
    ns = nameserver("poison", RECORDS)
    q, n = question("www.up.test.")
    reply = await Upstream((("127.0.0.1", ns.port),), 2.0).query(q, n, 0)
    cleaned = Cleaner().clean(reply, q, n)
    assert cleaned.addrs == (("192.0.2.10", 300),)
    assert cleaned.ar == 0 and cleaned.dropped >= 2
    header = struct.pack(">HHHHHH", 0, 0x8180, 1, cleaned.an, cleaned.ns, 0)
    assert POISON_ADDRESS not in str(dns.message.from_wire(header + q + cleaned.body))


def test_build_query_is_fresh_and_minimal():
    q, _ = question("www.up.test.")
    packet = wire.build_query(b"\xab\xcd", q, 0x80)
    m = dns.message.from_wire(packet)
    assert m.id == 0xABCD and m.flags & dns.flags.RD and m.edns == 0 and m.ednsflags & dns.flags.DO
    assert m.payload == wire.EDNS_PAYLOAD and not m.options
