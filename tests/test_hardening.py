"""Resource bounds and edge cases found in review, in-process (no network)."""

from __future__ import annotations

import ipaddress

import dns.edns
import dns.message
import dns.rcode
import pytest

from resolver.app import ServeOptions, apply_overrides
from resolver.dns.cache import AnswerCache, Entry
from resolver.dns.chain import Resolver
from resolver.policy.config import parse_config, without_self

LONG = ".".join(c * 60 for c in "yxw") + "." + "v" * 55 + ".test"  # 244 characters
POLICY = f"""
[upstream]
servers = ["127.0.0.1:9"]
[allow]
domains = ["*.allowed.test"]
[deny]
domains = ["*.{LONG}"]
"""


def test_decision_memo_is_shared_between_source_addresses():
    r = Resolver(parse_config(POLICY))
    a, b = r.view("127.0.0.2"), r.view("127.0.0.3")
    assert a.decisions is b.decisions  # one bound per policy, not per (spoofable) source


def test_meta_types_are_never_forwarded():
    r = Resolver(parse_config(POLICY))
    for rdtype in (0, 41, 249, 250, 251, 252, 253, 254):
        q = dns.message.make_query("www.allowed.test", rdtype, use_edns=False)
        resp = r.handle(q.to_wire(), "127.0.0.1", "udp")
        assert isinstance(resp, bytes), f"type {rdtype} must be answered locally"
        assert dns.message.from_wire(resp).rcode() == dns.rcode.NOTIMP


def test_denied_answer_never_exceeds_the_client_udp_size():
    r = Resolver(parse_config(POLICY))
    q = dns.message.make_query("a." + LONG, "A", use_edns=True, payload=512)
    full = dns.message.make_query("a." + LONG, "A", use_edns=True, payload=1232)
    assert len(r.handle(full.to_wire(), "127.0.0.1", "udp")) > 512  # the EDE text does not fit 512
    resp = r.handle(q.to_wire(), "127.0.0.1", "udp")
    assert len(resp) <= 512
    m = dns.message.from_wire(resp)
    assert m.rcode() == dns.rcode.NXDOMAIN
    assert [o.code for o in m.options] == [dns.edns.EDECode.BLOCKED]


def test_malformed_packets_log_the_name_they_carried():
    records = []
    r = Resolver(parse_config(POLICY), submit=records.append)
    q = dns.message.make_query("exfil.evil.test", "TXT", use_edns=False).to_wire() + b"junk"
    assert dns.message.from_wire(r.handle(q, "127.0.0.1", "udp")).rcode() == dns.rcode.FORMERR
    (rec,) = records
    assert rec[3] == b"\x05exfil\x04evil\x04test\x00" and rec[4] == 16 and "trailing" in rec[12]


def test_cache_is_bounded_in_bytes():
    cache = AnswerCache(1000, max_bytes=100_000)
    for i in range(100):
        cache.put(b"k%d" % i, Entry(0, 1, 0, 0, b"x" * 5000, [], [], 60, 0.0, None))
    assert cache.bytes <= 100_000 and len(cache) < 20
    assert cache.get(b"k99", 1.0) is not None and cache.get(b"k0", 1.0) is None


def test_a_full_cache_costs_the_collector_one_object_per_entry():
    """Full (generation-2) collections walk every tracked object; at 100,000 entries each extra
    tracked object per entry is tens of milliseconds of pause on the event loop. An entry's
    integer tuples (and its address pairs) leave the collector's lists after one pass."""
    import gc

    cache = AnswerCache(1000)
    for i in range(1000):
        cache.put(b"k%d" % i, Entry(0, 1, 0, 0, b"x" * 40, [6], [60], 60, 0.0, '["192.0.2.1"]',
                                    (("192.0.2.1", 60),)))
    gc.collect()
    tracked = {id(o) for o in gc.get_objects()}
    entries = [cache._data[b"k%d" % i] for i in range(1000)]
    assert all(id(e) in tracked for e in entries)  # the entry itself is a GC object
    inner = [x for e in entries for x in (e.offsets, e.ttls, e.addrs, e._heads)]
    assert not any(gc.is_tracked(x) for x in inner)


def test_never_forward_to_itself():
    assert without_self([("127.0.0.1", 53), ("192.0.2.1", 53)], (("0.0.0.0", 53),)) == (("192.0.2.1", 53),)
    assert without_self([("::1", 53)], (("::", 53),)) == ()
    assert without_self([("127.0.0.1", 53)], (("127.0.0.1", 5353),)) == (("127.0.0.1", 53),)


def test_listen_override_is_checked_against_resolv_conf(monkeypatch):
    import resolver.app as app

    monkeypatch.setattr(app, "resolv_conf_servers", lambda: [("127.0.0.1", 53), ("192.0.2.53", 53)])
    cfg = parse_config('[allow]\ndomains = ["a.example"]\n')
    assert cfg.upstream.from_resolv_conf
    out = apply_overrides(cfg, ServeOptions(policy_path="x", listen=(("127.0.0.1", 53),)))
    assert out.upstream.servers == (("192.0.2.53", 53),)


@pytest.mark.parametrize("text", ["a = " + "[" * 5000, "[allow]\ndomains = [" + "[" * 3000],
                         ids=["value", "list"])
def test_absurd_nesting_is_a_policy_error(text):
    from resolver.core.errors import PolicyError

    with pytest.raises(PolicyError, match="invalid TOML"):
        parse_config(text, "p.toml")


def test_private_networks_in_clients_are_classified():
    cfg = parse_config(POLICY + '\n[[clients]]\nname = "agent"\nsources = ["192.0.2.5/32"]\nmode = "audit"\n')
    r = Resolver(cfg)
    v = r.view("192.0.2.5")
    assert v.served and v.audit and v.label == "agent"
    assert not r.view("192.0.2.6").served
    assert r.view("::ffff:192.0.2.5").label == "agent"  # IPv4-mapped source
    assert ipaddress.ip_address("192.0.2.5") in cfg.clients[0].sources[0]
