"""Hostile packets built with dnslib, answered by the real query path.

dnslib is lenient by design: it packs messages with no question, with two
questions, responses, and labels containing dots without complaint. That is a
liability when parsing untrusted bytes (dnsguard never does), and exactly what
is wanted to *build* hostile input. dnslib also serves as a second,
independent decoder of dnsguard's answers.
"""

from __future__ import annotations

import struct

import dnslib
import pytest

from resolver.dns import wire
from resolver.dns.chain import Resolver
from resolver.policy.config import parse_config

POLICY = """
[upstream]
servers = ["127.0.0.1:9"]
[allow]
domains = ["allowed.test", "*.allowed.test"]
"""


@pytest.fixture(scope="module")
def resolver() -> Resolver:
    return Resolver(parse_config(POLICY))


def ask(resolver: Resolver, record: dnslib.DNSRecord) -> bytes | None:
    # dnslib packs to a bytearray; the server hands the query path bytes.
    return resolver.handle(bytes(record.pack()), "127.0.0.1", "udp")


def rcode_of(resp: bytes) -> int:
    return dnslib.DNSRecord.parse(resp).header.rcode


def test_no_question_is_formerr(resolver):
    resp = ask(resolver, dnslib.DNSRecord(dnslib.DNSHeader(id=7, q=0)))
    assert rcode_of(resp) == wire.FORMERR
    assert dnslib.DNSRecord.parse(resp).header.id == 7


def test_two_questions_are_formerr(resolver):
    r = dnslib.DNSRecord(q=dnslib.DNSQuestion("www.allowed.test"))
    r.add_question(dnslib.DNSQuestion("evil.test"))
    assert rcode_of(ask(resolver, r)) == wire.FORMERR


def test_a_response_is_never_answered(resolver):
    reply = dnslib.DNSRecord(q=dnslib.DNSQuestion("www.allowed.test")).reply()
    reply.add_answer(dnslib.RR("www.allowed.test", rdata=dnslib.A("192.0.2.1")))
    assert ask(resolver, reply) is None


def test_dot_inside_a_label_is_not_a_subdomain(resolver):
    # Two labels, "x.allowed" and "test": printed as text it looks like a name below allowed.test.
    name = dnslib.DNSLabel([b"x.allowed", b"test"])
    resp = dnslib.DNSRecord.parse(ask(resolver, dnslib.DNSRecord(q=dnslib.DNSQuestion(name))))
    assert resp.header.rcode == wire.NXDOMAIN
    assert resp.q.qname.label == (b"x.allowed", b"test")  # echoed exactly


def test_denied_answer_decodes_the_same_in_dnslib(resolver):
    question = dnslib.DNSQuestion("Exfil.Evil.Test", dnslib.QTYPE.TXT)
    query = dnslib.DNSRecord(dnslib.DNSHeader(id=4242, rd=1), q=question)
    resp = dnslib.DNSRecord.parse(ask(resolver, query))
    assert (resp.header.id, resp.header.qr, resp.header.rd, resp.header.ra) == (4242, 1, 1, 1)
    assert resp.header.rcode == wire.NXDOMAIN and not resp.rr
    assert str(resp.q.qname) == "Exfil.Evil.Test." and resp.q.qtype == dnslib.QTYPE.TXT


# Header bits a query may carry that an answer must never echo back (RFC 1035 4.1.1,
# RFC 6891, RFC 8906): AA and TC are the responder's to set, Z must be zero, AD is ours
# to set (never on a local error), RA is defined for opcode QUERY only.
_ALL_QUERY_BITS = 0x0100 | 0x0400 | 0x0200 | 0x0040 | 0x0020 | 0x0010  # RD AA TC Z AD CD


def _query_with(flags: int, *, opcode: int = 0, qd: int = 1, edns_version: int | None = None,
                qtype: int = 1) -> bytes:
    name = b"\x03www\x07allowed\x04test\x00"
    ar = 1 if edns_version is not None else 0
    head = struct.pack(">HHHHHH", 0x4242, flags | (opcode << 11), qd, 0, 0, ar)
    body = (name + struct.pack(">HH", qtype, 1)) * qd
    if edns_version is not None:
        body += b"\x00\x00\x29\x04\xd0\x00" + bytes((edns_version,)) + b"\x00\x00\x00\x00"
    return head + body


_ERROR_CASES = [
    ("NOTIMP for STATUS", _query_with(_ALL_QUERY_BITS, opcode=2), wire.NOTIMP, 2),
    ("NOTIMP for NOTIFY", _query_with(_ALL_QUERY_BITS, opcode=4), wire.NOTIMP, 4),
    ("NOTIMP for UPDATE", _query_with(_ALL_QUERY_BITS, opcode=5), wire.NOTIMP, 5),
    ("NOTIMP for opcode 15", _query_with(_ALL_QUERY_BITS, opcode=15), wire.NOTIMP, 15),
    ("FORMERR for two questions", _query_with(_ALL_QUERY_BITS, qd=2), wire.FORMERR, 0),
    ("FORMERR for no question", _query_with(_ALL_QUERY_BITS, qd=0), wire.FORMERR, 0),
    ("NOTIMP for AXFR", _query_with(_ALL_QUERY_BITS, qtype=252), wire.NOTIMP, 0),
    ("BADVERS for EDNS version 1", _query_with(_ALL_QUERY_BITS, edns_version=1), 0, 0),
]


@pytest.mark.parametrize(("what", "packet", "rcode", "opcode"), _ERROR_CASES,
                         ids=[c[0] for c in _ERROR_CASES])
def test_local_error_answers_follow_the_flag_rules(resolver, what, packet, rcode, opcode):
    resp = resolver.handle(packet, "127.0.0.1", "udp")
    h = dnslib.DNSRecord.parse(resp).header
    assert (h.id, h.qr, h.opcode, h.rcode) == (0x4242, 1, opcode, rcode), what
    assert (h.aa, h.tc, h.z, h.ad) == (0, 0, 0, 0), what
    assert h.rd == 1, what  # RD is copied (RFC 1035)
    assert h.ra == (1 if opcode == 0 else 0), what
    if opcode != 0:
        assert h.cd == 0, what


def test_refused_stranger_follows_the_flag_rules():
    resolver = Resolver(parse_config(POLICY + '[server]\nclients = ["10.0.0.0/8"]\n'))
    resp = resolver.handle(_query_with(_ALL_QUERY_BITS), "127.0.0.1", "udp")
    h = dnslib.DNSRecord.parse(resp).header
    assert (h.qr, h.opcode, h.rcode) == (1, 0, wire.REFUSED)
    assert (h.aa, h.tc, h.z, h.ad, h.rd, h.ra) == (0, 0, 0, 0, 1, 1)
