"""Hostile packets built with dnslib, answered by the real query path.

dnslib is lenient by design: it packs messages with no question, with two
questions, responses, and labels containing dots without complaint. That is a
liability when parsing untrusted bytes (dnsguard never does), and exactly what
is wanted to *build* hostile input. dnslib also serves as a second,
independent decoder of dnsguard's answers.
"""

from __future__ import annotations

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
