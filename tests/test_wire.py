"""The bytes-level fast path, checked against dnspython as the full path.

For every query the fast path answers, the bytes must be identical to what a
full parse-and-build with dnspython produces; hypothesis generates the queries
(random letter case, flags, EDNS sizes, DO bit, types).
"""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.dns import wire
from resolver.dns.cache import Entry
from resolver.dns.chain import Resolver
from resolver.dns.clean import clean_reply
from resolver.policy.config import parse_config

POLICY = """
[upstream]
servers = ["127.0.0.1:9"]
[allow]
domains = ["*.allowed.test", "allowed.test"]
[deny]
domains = ["bad.allowed.test"]
"""


@pytest.fixture(scope="module")
def resolver() -> Resolver:
    return Resolver(parse_config(POLICY))


def mixed_case(draw_bits: list[bool], text: str) -> str:
    return "".join(c.upper() if b and c.isalpha() else c for c, b in zip(text, draw_bits, strict=False))


QTYPES = st.sampled_from([dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.HTTPS, dns.rdatatype.TXT,
                          dns.rdatatype.MX])


@st.composite
def queries(draw, names):
    base = draw(names)
    bits = draw(st.lists(st.booleans(), min_size=len(base), max_size=len(base)))
    name = mixed_case(bits, base)
    edns = draw(st.sampled_from([None, 512, 1232, 4096, 65535]))
    do = draw(st.booleans()) if edns else False
    q = dns.message.make_query(name, draw(QTYPES), use_edns=edns is not None, payload=edns or 512,
                               want_dnssec=do, id=draw(st.integers(0, 65535)))
    q.flags = dns.flags.RD if draw(st.booleans()) else 0
    if draw(st.booleans()):
        q.flags |= dns.flags.CD
    return q


def reference(q: dns.message.Message, rcode: int, ede: tuple[int, str] | None = None,
              answer: list[dns.rrset.RRset] = ()) -> bytes:
    r = dns.message.make_response(q, recursion_available=True)
    r.flags |= q.flags & dns.flags.CD  # RFC 4035 3.2.2: CD is copied
    r.set_rcode(rcode)
    r.answer.extend(answer)
    if q.edns >= 0:
        opts = [dns.edns.EDEOption(ede[0], ede[1])] if ede else []
        r.use_edns(0, ednsflags=q.ednsflags & dns.flags.DO, payload=wire.EDNS_PAYLOAD, options=opts)
    else:
        r.use_edns(False)
    return r.to_wire()


DENIED = st.sampled_from(["evil.test", "x.y.evil.test", "bad.allowed.test", "allowed.test.evil"])


@settings(max_examples=300, deadline=None)
@given(queries(DENIED))
def test_denied_answer_matches_full_path(resolver, q):
    data = q.to_wire()
    got = resolver.handle(data, "127.0.0.1", "udp")
    name = q.question[0].name.to_text(omit_final_dot=True).lower()
    text = ("dnsguard policy: denied by rule 'bad.allowed.test'" if name == "bad.allowed.test"
            else "dnsguard policy: not on the allow list")
    assert got == reference(q, dns.rcode.NXDOMAIN, (wire.EDE_BLOCKED, text))


@settings(max_examples=100, deadline=None)
@given(queries(DENIED))
def test_refused_for_unknown_client_matches_full_path(resolver, q):
    got = resolver.handle(q.to_wire(), "192.0.2.7", "udp")
    assert got == reference(q, dns.rcode.REFUSED,
                            (wire.EDE_PROHIBITED, ""))


def upstream_reply(qname: str, qtype: int, cname: bool) -> tuple[bytes, bytes, list[dns.rrset.RRset]]:
    """An upstream answer for the lower-cased question, and the records a client should get."""
    q = dns.message.make_query(qname.lower(), qtype)
    r = dns.message.make_response(q)
    owner = dns.name.from_text(qname.lower())
    rrsets = []
    if cname:
        target = dns.name.from_text("target.allowed.test")
        rrsets.append(dns.rrset.from_text(owner, 300, "IN", "CNAME", target.to_text()))
        owner = target
    rd = {dns.rdatatype.A: "192.0.2.1", dns.rdatatype.AAAA: "2001:db8::1",
          dns.rdatatype.HTTPS: '1 . alpn="h2" ipv4hint="192.0.2.9"', dns.rdatatype.TXT: '"hello"',
          dns.rdatatype.MX: "10 mx.allowed.test."}[qtype]
    rrsets.append(dns.rrset.from_text(owner, 600, "IN", dns.rdatatype.to_text(qtype), rd))
    r.answer.extend(rrsets)
    question = r.question[0].name.to_wire() + struct.pack(">HH", qtype, 1)
    return r.to_wire(), question, rrsets


ALLOWED = st.sampled_from(["www.allowed.test", "a.b.allowed.test", "allowed.test"])


@settings(max_examples=300, deadline=None)
@given(q=queries(ALLOWED), cname=st.booleans())
def test_cached_answer_matches_full_path(q, cname):
    resolver = Resolver(parse_config(POLICY))
    qname = q.question[0].name.to_text()
    qtype = q.question[0].rdtype
    raw, question, rrsets = upstream_reply(qname, qtype, cname)
    cleaned = clean_reply(raw, question)
    do = 1 if q.ednsflags & dns.flags.DO else 0
    now = resolver.cache.clock()
    entry = Entry(cleaned.rcode, cleaned.an, cleaned.ns, cleaned.ar, cleaned.body, cleaned.offsets,
                  cleaned.ttls, cleaned.cache_ttl, now, cleaned.answers_json, cleaned.addrs)
    resolver.cache.put(question.lower()[:-4] + question[-4:] + bytes([do]), entry)
    got = resolver.handle(q.to_wire(), "127.0.0.1", "tcp")
    assert isinstance(got, bytes), "a cached name must be answered without going upstream"
    assert got == reference(q, dns.rcode.NOERROR, answer=rrsets)


def test_cached_ttls_age_by_whole_seconds():
    raw, question, _ = upstream_reply("www.allowed.test", dns.rdatatype.A, True)
    c = clean_reply(raw, question)
    e = Entry(c.rcode, c.an, c.ns, c.ar, c.body, c.offsets, c.ttls, c.cache_ttl, 1000.0, c.answers_json)
    q = dns.message.make_query("www.allowed.test", "A", use_edns=False).to_wire()
    name_end, qend, *_ = wire.parse_query(q)
    ttls = [rr.ttl for rr in dns.message.from_wire(e.response(q, qend, 0, 0, 1042.9)).answer]
    assert ttls == [300 - 42, 600 - 42]
    assert c.cache_ttl == 300  # the shortest TTL on the chain bounds the entry


# ---- strictness of the parser ----

def header(flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack(">HHHHHH", 0x1234, flags, qd, an, ns, ar)


Q = b"\x07example\x04test\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(("packet", "rcode"), [
    (b"\x12\x34\x01", None),                                   # shorter than a header
    (header(flags=0x8180) + Q, None),                          # QR=1: never answer a response
    (header(flags=0x2800) + Q, wire.NOTIMP),                   # opcode UPDATE
    (header(flags=0x1000) + Q, wire.NOTIMP),                   # opcode NOTIFY
    (header(qd=0), wire.FORMERR),
    (header(qd=2) + Q + Q, wire.FORMERR),
    (header(an=1) + Q, wire.FORMERR),
    (header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", wire.FORMERR),   # label > 63
    (header() + b"\xc0\x0c\x00\x01\x00\x01", wire.FORMERR),    # compression (a loop onto itself)
    (header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", wire.FORMERR),  # name > 255
    (header() + b"\x07example", wire.FORMERR),                 # name runs off the end
    (header() + Q[:-2], wire.FORMERR),                         # question truncated
    (header() + Q + b"\x00", wire.FORMERR),                    # trailing garbage
    (header(ar=1) + Q + b"\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00", wire.FORMERR),  # not OPT
    (header(ar=1) + Q + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x05", wire.FORMERR),  # bad rdlen
    (header(ar=1) + Q + b"\x00\x00\x29\x04\xd0\x00\x01\x00\x00\x00\x00", wire.BADVERS),
])
def test_bad_packets(packet, rcode):
    with pytest.raises(wire.BadQuery) as info:
        wire.parse_query(packet)
    assert info.value.rcode == rcode


def test_good_query_fields():
    p = header(ar=1) + Q + b"\x00\x00\x29\x10\x00\x00\x00\x80\x00\x00\x00"
    name_end, qend, qtype, qclass, size, do = wire.parse_query(p)
    assert p[12:name_end] == b"\x07example\x04test\x00"
    assert (qend, qtype, qclass, size, do) == (12 + len(Q), 1, 1, 4096, 0x80)
    assert wire.parse_query(header() + Q)[4] == 0  # no EDNS


def test_error_answers_keep_id_and_opcode(resolver):
    update = header(flags=0x2900) + Q
    resp = resolver.handle(update, "127.0.0.1", "udp")
    m = dns.message.from_wire(resp)
    assert m.id == 0x1234 and m.rcode() == dns.rcode.NOTIMP and m.opcode() == 5
    assert resolver.handle(header(flags=0x8180) + Q, "127.0.0.1", "udp") is None


def test_badvers(resolver):
    q = dns.message.make_query("www.allowed.test", "A", use_edns=1)
    m = dns.message.from_wire(resolver.handle(q.to_wire(), "127.0.0.1", "udp"))
    assert m.rcode() == dns.rcode.BADVERS


def test_any_gets_minimal_rfc8482_answer(resolver):
    q = dns.message.make_query("www.allowed.test", "ANY")
    m = dns.message.from_wire(resolver.handle(q.to_wire(), "127.0.0.1", "udp"))
    assert m.rcode() == dns.rcode.NOERROR
    assert [rr.rdtype for rr in m.answer] == [dns.rdatatype.HINFO]
    assert m.answer[0][0].cpu == b"RFC8482"


def test_truncation_for_small_udp_clients():
    resolver = Resolver(parse_config(POLICY))
    q = dns.message.make_query("big.allowed.test", "TXT", use_edns=False)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("big.allowed.test.", 60, "IN", "TXT",
                                        *[f'"{"x" * 200}{i}"' for i in range(5)]))
    question = q.question[0].name.to_wire() + struct.pack(">HH", 16, 1)
    c = clean_reply(r.to_wire(), question)
    resolver.cache.put(question[:-4] + question[-4:] + b"\x00",
                       Entry(c.rcode, c.an, c.ns, c.ar, c.body, c.offsets, c.ttls, 60, resolver.cache.clock(),
                             None))
    udp = dns.message.from_wire(resolver.handle(q.to_wire(), "127.0.0.1", "udp"))
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = dns.message.from_wire(resolver.handle(q.to_wire(), "127.0.0.1", "tcp"))
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 5


def test_clean_reply_drops_poison():
    q = dns.message.make_query("www.allowed.test", "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("www.allowed.test.", 60, "IN", "A", "192.0.2.1"))
    r.answer.append(dns.rrset.from_text("bank.example.", 60, "IN", "A", "198.51.100.66"))
    r.additional.append(dns.rrset.from_text("login.example.", 60, "IN", "A", "198.51.100.67"))
    r.authority.append(dns.rrset.from_text("example.", 60, "IN", "NS", "ns.example."))
    question = q.question[0].name.to_wire() + struct.pack(">HH", 1, 1)
    c = clean_reply(r.to_wire(), question)
    assert (c.an, c.ns, c.ar, c.dropped) == (1, 0, 0, 3)
    assert c.addrs == (("192.0.2.1", 60),)
    assert c.answers_json == '["192.0.2.1"]'


def test_clean_reply_negative_ttl_from_soa():
    q = dns.message.make_query("nx.allowed.test", "A")
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.NXDOMAIN)
    r.authority.append(dns.rrset.from_text("allowed.test.", 900, "IN", "SOA",
                                           "ns.allowed.test. h.allowed.test. 1 2 3 4 120"))
    question = q.question[0].name.to_wire() + struct.pack(">HH", 1, 1)
    c = clean_reply(r.to_wire(), question)
    assert c.rcode == dns.rcode.NXDOMAIN and c.ns == 1 and c.cache_ttl == 120


def test_tcp_frames_takes_whole_messages_and_leaves_a_partial_one():
    buf = bytearray(b"\x00\x03abc" + b"\x00\x00" + b"\x00\x05xy")
    assert list(wire.tcp_frames(buf)) == [b"abc", b""]
    assert buf == bytearray(b"\x00\x05xy")  # waits for the rest of its five bytes
    buf += b"zuv\x00"
    assert list(wire.tcp_frames(buf)) == [b"xyzuv"] and buf == bytearray(b"\x00")
