"""Serve-stale feeds the firewall sets like a cache hit: real ipsets in a namespace of our own."""

from __future__ import annotations

import time
from collections.abc import Iterator

import dns.edns
import dns.message
import pytest
from helpers import wait_until
from netns import Topology, fresh_topology

from resolver.dns.chain import Resolver
from resolver.fence.feeder import Fence
from resolver.fence.ipsets import SetFeeder
from resolver.policy.config import parse_config

ADDR = "192.0.2.77"


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    yield from fresh_topology()


def in_set(topo: Topology, ip: str) -> bool:
    return topo.ns(topo.router, "ipset", "test", "dnsguard4", ip, check=False).returncode == 0


async def ask(resolver: Resolver, name: str) -> dns.message.Message:
    got = resolver.handle(dns.message.make_query(name, "A", use_edns=0).to_wire(), "127.0.0.1", "udp")
    if not isinstance(got, bytes):
        got = await got
    return dns.message.from_wire(got)


async def test_a_stale_answer_refreshes_the_sets(topo, nameserver):
    ns = nameserver("answer", {"fw.stale.test.": {"A": ADDR, "_ttl": "1"}})
    feeder = SetFeeder(1, 60, netns=topo.router)
    feeder.ensure_sets()
    fence = Fence(feeder)
    try:
        config = parse_config(f'[upstream]\nservers = ["{ns.addr}"]\ntimeout_ms = 300\n'
                              '[allow]\ndomains = ["fw.stale.test"]\n')
        resolver = Resolver(config, feeder=fence)
        assert [rd.address for rr in (await ask(resolver, "fw.stale.test")).answer for rd in rr] == [ADDR]
        t_first = time.monotonic()
        assert in_set(topo, ADDR)
        topo.ns(topo.router, "ipset", "flush", "dnsguard4")
        assert not in_set(topo, ADDR)

        ns.mode = "blackhole"
        wait_until(lambda: time.monotonic() > t_first + 1.5, 5.0, what="the TTL to run out")
        stale = await ask(resolver, "fw.stale.test")
        assert [o.code for o in stale.options if isinstance(o, dns.edns.EDEOption)] == [
            dns.edns.EDECode.STALE_ANSWER]
        assert in_set(topo, ADDR)  # fed from the stale answer before it was returned
        # for as long as the client is told it may use it (TTL 30), not the expired record's
        # remainder clamped to min_ttl (1 s here)
        assert {rr.ttl for rr in stale.answer} == {30}
        listed = topo.ns(topo.router, "ipset", "list", "dnsguard4").stdout
        (line,) = [ln for ln in listed.splitlines() if ln.startswith(f"{ADDR} ")]
        assert 25 <= int(line.split("timeout ")[1].split()[0]) <= 30, line
        resolver.upstream.close()
    finally:
        feeder.close()


def test_reloaded_ttl_clamps_apply_to_later_entries(topo):
    feeder = SetFeeder(1, 60, netns=topo.router)
    feeder.ensure_sets()
    fence = Fence(feeder)
    try:
        fence.set_ttl_bounds(300, 400)  # what a reload of [firewall] min_ttl/max_ttl does
        feeder.feed([("192.0.2.78", 5)], b"\x02fw\x04test\x00")

        def timeout_of() -> int | None:
            out = topo.ns(topo.router, "ipset", "list", "dnsguard4").stdout
            for line in out.splitlines():
                if line.startswith("192.0.2.78 "):
                    return int(line.split("timeout")[1].split()[0])
            return None

        assert 290 <= wait_until(timeout_of, 5.0, what="the set entry") <= 300
    finally:
        feeder.close()
