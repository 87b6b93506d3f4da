"""The memoised-answer path of `Resolver.handle`: a repeated UDP query is answered from the
bytes of its first answer with the new ID patched in. It must give exactly what the full
path gives, log the same record, and never outlive what made the answer true (policy,
cache entry, TTL age)."""

from __future__ import annotations

import asyncio

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st
from test_wire import ALLOWED, DENIED, POLICY, queries, reference, upstream_reply

from resolver.dns import wire
from resolver.dns.cache import Entry
from resolver.dns.chain import Resolver
from resolver.dns.clean import clean_reply
from resolver.dns.miss import Pending
from resolver.policy.config import parse_config

CLIENT = "127.0.0.1"


def cache_answer(resolver: Resolver, q: dns.message.Message,
                 cname: bool = False) -> tuple[Entry, bytes, list]:
    qname = q.question[0].name.to_text()
    qtype = q.question[0].rdtype
    raw, question, rrsets = upstream_reply(qname, qtype, cname)
    c = clean_reply(raw, question)
    do = 1 if q.ednsflags & dns.flags.DO else 0
    entry = Entry(c.rcode, c.an, c.ns, c.ar, c.body, c.offsets, c.ttls, c.cache_ttl, resolver.cache.clock(),
                  c.answers_json, c.addrs)
    key = question.lower()[:-4] + question[-4:] + bytes([do])
    resolver.cache.put(key, entry)
    return entry, key, rrsets


def assert_miss(resolver: Resolver, packet: bytes) -> None:
    """The query went upstream: handle returned a Pending (cut off here, unanswered)."""
    async def go() -> None:
        pending = resolver.handle(packet, CLIENT, "udp")
        assert isinstance(pending, Pending) and not pending.settled
        resolver.cancel_pending()
        assert pending.settled and pending.resp is None and resolver.waiting == 0

    asyncio.run(go())


def with_id(q: dns.message.Message, qid: int) -> dns.message.Message:
    again = dns.message.from_wire(q.to_wire())
    again.id = qid
    return again


def stable(record: tuple) -> tuple:
    """A log record without its timestamp and latency."""
    return record[1:11] + record[12:]


@settings(max_examples=200, deadline=None)
@given(q=queries(DENIED), qid=st.integers(0, 65535))
def test_repeated_denial_is_the_full_path_answer_with_the_new_id(q, qid):
    resolver = Resolver(parse_config(POLICY))
    records: list[tuple] = []
    resolver.submit = records.append
    first = resolver.handle(q.to_wire(), CLIENT, "udp")
    assert len(resolver._fast) == 1
    q2 = with_id(q, qid)
    again = resolver.handle(q2.to_wire(), CLIENT, "udp")
    # The full path's answer to the second packet, from a resolver that has never seen it.
    fresh = Resolver(parse_config(POLICY)).handle(q2.to_wire(), CLIENT, "udp")
    assert again == fresh
    assert again[2:] == first[2:] and again[:2] == q2.to_wire()[:2]
    assert len(records) == 2 and stable(records[0]) == stable(records[1])
    assert records[1][5] == "deny" and records[1][8] == wire.NXDOMAIN


@settings(max_examples=200, deadline=None)
@given(q=queries(ALLOWED), cname=st.booleans(), qid=st.integers(0, 65535))
def test_repeated_cache_hit_is_the_full_path_answer_with_the_new_id(q, cname, qid):
    resolver = Resolver(parse_config(POLICY))
    records: list[tuple] = []
    resolver.submit = records.append
    _, _, rrsets = cache_answer(resolver, q, cname)
    first = resolver.handle(q.to_wire(), CLIENT, "udp")
    q2 = with_id(q, qid)
    hits = resolver.cache.hits
    again = resolver.handle(q2.to_wire(), CLIENT, "udp")
    assert resolver.cache.hits == hits + 1  # counted, and its LRU place kept fresh
    if len(first) <= (min(q.payload, wire.EDNS_PAYLOAD) if q.edns >= 0 else 512):
        assert again == reference(q2, dns.rcode.NOERROR, answer=rrsets)
    assert again[2:] == first[2:] and again[:2] == q2.to_wire()[:2]
    assert stable(records[0]) == stable(records[1])


def test_a_new_second_of_age_goes_the_full_path_again():
    resolver = Resolver(parse_config(POLICY))
    q = dns.message.make_query("www.allowed.test", "A")
    entry, _, _ = cache_answer(resolver, q)
    first = dns.message.from_wire(resolver.handle(q.to_wire(), CLIENT, "udp"))
    entry.stored -= 7.0  # as if the answer had been cached 7 s earlier
    later = dns.message.from_wire(resolver.handle(q.to_wire(), CLIENT, "udp"))
    assert [rr.ttl for rr in later.answer] == [rr.ttl - 7 for rr in first.answer]


def test_an_entry_the_cache_dropped_is_not_served_from_the_memo():
    resolver = Resolver(parse_config(POLICY))
    q = dns.message.make_query("www.allowed.test", "A")
    old, key, _ = cache_answer(resolver, q)
    resolver.handle(q.to_wire(), CLIENT, "udp")
    raw, question, _ = upstream_reply("www.allowed.test", dns.rdatatype.A, False)
    c = clean_reply(raw.replace(bytes([192, 0, 2, 1]), bytes([192, 0, 2, 99])), question)
    resolver.cache.put(key, Entry(c.rcode, c.an, c.ns, c.ar, c.body, c.offsets, c.ttls, c.cache_ttl,
                                  resolver.cache.clock(), c.answers_json, c.addrs))
    assert not old.live
    answer = dns.message.from_wire(resolver.handle(q.to_wire(), CLIENT, "udp"))
    assert [rd.address for rr in answer.answer for rd in rr] == ["192.0.2.99"]
    resolver.cache.clear()
    assert_miss(resolver, q.to_wire())


def test_a_new_policy_drops_memoised_denials():
    resolver = Resolver(parse_config(POLICY))
    q = dns.message.make_query("evil.test", "A")
    assert dns.message.from_wire(resolver.handle(q.to_wire(), CLIENT, "udp")).rcode() == dns.rcode.NXDOMAIN
    resolver.use(parse_config(POLICY.replace('"allowed.test"]', '"allowed.test", "evil.test"]')))
    assert_miss(resolver, q.to_wire())  # allowed now: goes upstream


def test_memo_is_per_client_and_udp_only():
    resolver = Resolver(parse_config(POLICY))
    q = dns.message.make_query("evil.test", "A").to_wire()
    resolver.handle(q, CLIENT, "tcp")
    assert not resolver._fast
    resolver.handle(q, "192.0.2.7", "udp")  # not a served client: REFUSED, never memoised
    assert not resolver._fast
    resolver.handle(q, CLIENT, "udp")
    assert list(resolver._fast) == [(CLIENT, q[2:])]
    refused = dns.message.from_wire(resolver.handle(q, "192.0.2.7", "udp"))
    assert refused.rcode() == dns.rcode.REFUSED


def test_padded_queries_and_big_answers_are_not_memoised():
    """An OPT can pad a query to 64 KB: memoising those would let one client pin gigabytes."""
    resolver = Resolver(parse_config(POLICY))
    padded = dns.message.make_query("evil.test", "A", use_edns=0, payload=1232,
                                    options=[dns.edns.GenericOption(12, b"\x00" * 4000)])
    denial = resolver.handle(padded.to_wire(max_size=65535), CLIENT, "udp")
    assert dns.message.from_wire(denial).rcode() == dns.rcode.NXDOMAIN
    assert not resolver._fast
    q = dns.message.make_query("www.allowed.test", "TXT", use_edns=0, payload=1232)
    raw, question, _ = upstream_reply("www.allowed.test", dns.rdatatype.TXT, False)
    reply = dns.message.from_wire(raw)
    reply.answer[0].update(dns.rrset.from_text("www.allowed.test.", 600, "IN", "TXT",
                                               *[f'"{"x" * 200}{i}"' for i in range(4)]))
    c = clean_reply(reply.to_wire(), question)
    resolver.cache.put(question + b"\x00", Entry(c.rcode, c.an, c.ns, c.ar, c.body, c.offsets, c.ttls,
                                                 c.cache_ttl, resolver.cache.clock(), c.answers_json))
    big = resolver.handle(q.to_wire(), CLIENT, "udp")
    assert len(big) > 640 and dns.message.from_wire(big).rcode() == dns.rcode.NOERROR
    assert not resolver._fast
