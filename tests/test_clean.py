"""Cleaning upstream replies: the bytes path and the dnspython path must agree.

The bytes path keeps the upstream's own record bytes; the dnspython path
re-renders. They may compress differently, so the comparison is on the
records a client would decode, plus every derived field (TTLs, addresses for
the firewall, the JSON logged, how long the answer may be cached).
"""

from __future__ import annotations

import struct

import dns.message
import dns.rcode
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.dns.clean import Cleaner
from resolver.dns.wire import read_name, svcb_hints

QNAME = "www.allowed.test."
QUESTION_A = dns.name.from_text(QNAME).to_wire() + struct.pack(">HH", 1, 1)


def decode(question: bytes, body: bytes, an: int, ns: int) -> tuple[list, list]:
    header = struct.pack(">HHHHHH", 0, 0x8180, 1, an, ns, 0)
    m = dns.message.from_wire(header + question + body)
    return sorted(m.answer, key=str), sorted(m.authority, key=str)


PUBLIC_V4 = st.sampled_from(["192.0.2.1", "198.51.100.7", "203.0.113.9", "93.184.216.34"])
PUBLIC_V6 = st.sampled_from(["2001:db8::1", "2606:4700::1111"])


@st.composite
def plans(draw):
    """Draw the shape of a reply; `build` turns it into bytes outside the strategy."""
    qtype = draw(st.sampled_from(["A", "AAAA"]))
    hops = [draw(st.integers(0, 4000)) for _ in range(draw(st.integers(0, 3)))]
    nx = draw(st.booleans())
    soa = (draw(st.integers(0, 9000)), draw(st.integers(0, 9000))) if nx and draw(st.booleans()) else None
    addrs = draw(st.lists(PUBLIC_V4 if qtype == "A" else PUBLIC_V6, min_size=1, max_size=4, unique=True))
    ttl = draw(st.integers(0, 90000))
    ns, glue = draw(st.booleans()), draw(st.booleans())
    poison = draw(st.sampled_from([None, "answer", "private"]))
    if poison == "private" and (qtype != "A" or nx):
        poison = None
    return qtype, hops, nx, soa, addrs, ttl, ns, glue, poison


def build(plan) -> tuple[bytes, bytes, str | None]:
    qtype, hops, nx, soa, addrs, ttl, ns, glue, poison = plan
    question = dns.name.from_text(QNAME).to_wire() + struct.pack(">HH", 1 if qtype == "A" else 28, 1)
    r = dns.message.make_response(dns.message.make_query(QNAME, qtype))
    owner = QNAME
    for hop, hop_ttl in enumerate(hops):
        target = f"hop{hop}.cdn{hop}.example."
        r.answer.append(dns.rrset.from_text(owner, hop_ttl, "IN", "CNAME", target))
        owner = target
    if nx:
        r.set_rcode(dns.rcode.NXDOMAIN if not r.answer else dns.rcode.NOERROR)
        if soa:
            r.authority.append(dns.rrset.from_text("allowed.test.", soa[0], "IN", "SOA",
                                                   f"ns.allowed.test. h.allowed.test. 1 2 3 4 {soa[1]}"))
    else:
        r.answer.append(dns.rrset.from_text(owner, ttl, "IN", qtype, *addrs))
    if ns:
        r.authority.append(dns.rrset.from_text("allowed.test.", 300, "IN", "NS", "ns1.allowed.test."))
    if glue:
        r.additional.append(dns.rrset.from_text("ns1.allowed.test.", 300, "IN", "A", "192.0.2.53"))
    if poison == "answer":
        r.answer.append(dns.rrset.from_text("bank.example.", 60, "IN", "A", "198.51.100.66"))
    elif poison == "private":
        r.answer[-1].add(dns.rdata.from_text("IN", "A", "10.0.0.1"))
    return r.to_wire(), question, poison


@settings(max_examples=400, deadline=None)
@given(plans())
def test_fast_and_full_cleaning_agree(plan):
    raw, question, poison = build(plan)
    cleaner = Cleaner()
    fast = cleaner._fast(raw, question, len(question) - 4)
    full = cleaner._full(raw, question)
    if poison is not None:
        assert fast is None, "poison must go through the re-rendering path"
    if fast is None:
        return
    assert decode(question, fast.body, fast.an, fast.ns) == decode(question, full.body, full.an, full.ns)
    for f in ("rcode", "an", "ns", "cache_ttl", "answers_json", "addrs"):
        assert getattr(fast, f) == getattr(full, f), f
    assert sorted(fast.ttls) == sorted(full.ttls)


def test_owner_pointing_at_the_question_is_ours_only_if_that_question_is():
    # The bytes path reads an owner that is a pointer to offset 12 without walking it -- which
    # is only right when the name at offset 12 is ours (case aside, RFC 4343 / 0x20).
    q = dns.message.make_query("WwW.Allowed.TEST.", "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("WwW.Allowed.TEST.", 60, "IN", "A", "192.0.2.1"))
    raw = r.to_wire()
    assert raw[12 + len(QUESTION_A):][:2] == b"\xc0\x0c"  # the owner is that pointer
    kept = Cleaner().clean(raw, QUESTION_A, len(QUESTION_A) - 4)
    assert kept.an == 1 and kept.addrs == (("192.0.2.1", 60),) and kept.answers_json == '["192.0.2.1"]'
    # Same length, another name at offset 12 (the pool never hands such a reply over; the
    # bytes path must still not take its records as ours): not kept verbatim.
    other = dns.name.from_text("www.allowed.tesx.").to_wire() + QUESTION_A[-4:]
    assert Cleaner()._fast(raw, other, len(other) - 4) is None


def test_answer_json_escapes_cname_targets_and_not_addresses():
    q = dns.message.make_query(QNAME, "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(QNAME, 60, "IN", "CNAME", 'we\\"ird.cdn.example.'))
    r.answer.append(dns.rrset.from_text('we\\"ird.cdn.example.', 60, "IN", "A", "192.0.2.1"))
    c = Cleaner()._fast(r.to_wire(), QUESTION_A, len(QUESTION_A) - 4)
    assert c is not None
    import json
    assert json.loads(c.answers_json) == ['we\\"ird.cdn.example', "192.0.2.1"]


def test_poison_and_rebinding_are_removed():
    q = dns.message.make_query(QNAME, "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(QNAME, 60, "IN", "A", "192.0.2.1", "10.0.0.1", "169.254.169.254"))
    r.answer.append(dns.rrset.from_text("bank.example.", 60, "IN", "A", "198.51.100.66"))
    c = Cleaner().clean(r.to_wire(), QUESTION_A, len(QUESTION_A) - 4)
    (answer,), _ = decode(QUESTION_A, c.body, c.an, c.ns)
    assert sorted(rd.address for rd in answer) == ["192.0.2.1"]
    assert sorted(c.stripped) == ["10.0.0.1", "169.254.169.254"]
    assert c.addrs == (("192.0.2.1", 60),)


def test_allowed_cidrs_exempt_private_answers():
    import ipaddress

    q = dns.message.make_query(QNAME, "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(QNAME, 60, "IN", "A", "192.168.1.10"))
    c = Cleaner(allowed_cidrs=(ipaddress.ip_network("192.168.1.0/24"),)).clean(
        r.to_wire(), QUESTION_A, len(QUESTION_A) - 4)
    assert c.addrs == (("192.168.1.10", 60),) and not c.stripped
    blocked = Cleaner().clean(r.to_wire(), QUESTION_A, len(QUESTION_A) - 4)
    assert blocked.an == 0 and blocked.stripped == ("192.168.1.10",)


def test_svcb_hints_are_read_from_bytes():
    q = dns.message.make_query(QNAME, "HTTPS")
    r = dns.message.make_response(q)
    rdata = '1 . alpn="h2" ipv4hint="192.0.2.1,192.0.2.2" ipv6hint="2001:db8::5"'
    r.answer.append(dns.rrset.from_text(QNAME, 60, "IN", "HTTPS", rdata))
    raw = r.to_wire()
    rdata_start = raw.index(b"\x00\x01\x00", 12 + len(QUESTION_A) + 12)  # priority 1, target root
    assert svcb_hints(raw, rdata_start, len(raw)) == ["192.0.2.1", "192.0.2.2", "2001:db8::5"]


def test_read_name_refuses_loops_and_forward_pointers():
    import pytest

    data = b"\x00" * 12 + b"\x03abc\xc0\x0c"  # points at itself
    with pytest.raises(ValueError):
        read_name(data, 12)
    with pytest.raises(ValueError):
        read_name(b"\xc0\x02\x01a\x00", 0)  # forward pointer
    header = b"\x00" * 12
    assert read_name(header + b"\x01A\x00\x01b\xc0\x0c", 15) == (b"\x01b\x01a\x00", 19)
    with pytest.raises(ValueError):  # into the header, which the client's answer replaces
        read_name(header + b"\x01b\xc0\x00", 12)


def test_rdata_with_names_is_re_rendered_not_kept_verbatim():
    # MX/SRV/NS targets may be compressed against records we cut off: only the full path keeps them.
    q = dns.message.make_query(QNAME, "MX")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(QNAME, 60, "IN", "MX", "10 mail.allowed.test."))
    r.additional.append(dns.rrset.from_text("mail.allowed.test.", 60, "IN", "A", "192.0.2.25"))
    question = dns.name.from_text(QNAME).to_wire() + struct.pack(">HH", 15, 1)
    cleaner = Cleaner()
    assert cleaner._fast(r.to_wire(), question, len(question) - 4) is None
    c = cleaner.clean(r.to_wire(), question, len(question) - 4)
    (mx,), _ = decode(question, c.body, c.an, c.ns)
    assert mx[0].exchange == dns.name.from_text("mail.allowed.test.") and c.ar == 0


def _reply(question: bytes, rrs: bytes, an: int, ns: int = 0) -> bytes:
    return struct.pack(">HHHHHH", 0x1234, 0x8180, 1, an, ns, 0) + question + rrs


def test_records_whose_rdata_does_not_parse_are_never_kept_verbatim():
    """Bytes the fast path used to relay (and cache) as NOERROR: a CNAME whose target runs past
    its RDATA, a TXT whose string lengths do not add up, an SOA with its fields cut short. They
    go to the full parser, which turns them into BadReply (SERVFAIL + EDE 23 upstream of here)."""
    from resolver.dns.clean import BadReply

    owner = b"\xc0\x0c"  # pointer to the question name
    target = dns.name.from_text("cdn.example.").to_wire()
    q_txt = dns.name.from_text(QNAME).to_wire() + struct.pack(">HH", 16, 1)
    bad = {
        "cname past its rdata": (QUESTION_A, owner + struct.pack(">HHIH", 5, 1, 60, 3) + target, 1, 0),
        "cname short of its rdata": (QUESTION_A, owner + struct.pack(">HHIH", 5, 1, 60, len(target) + 2)
                                     + target + b"\x00\x00", 1, 0),
        "txt lengths overrun": (q_txt, owner + struct.pack(">HHIH", 16, 1, 60, 4) + b"\x09abc", 1, 0),
        "soa fields cut short": (QUESTION_A, owner + struct.pack(">HHIH", 6, 1, 60, 2 + 2 + 8)
                                 + b"\xc0\x0c\xc0\x0c" + b"\x00" * 8, 0, 1),
    }
    cleaner = Cleaner()
    for what, (question, rrs, an, ns) in bad.items():
        reply = _reply(question, rrs, an, ns)
        try:
            got = cleaner.clean(reply, question, len(question) - 4)
        except BadReply:
            continue
        raise AssertionError(f"{what}: kept as {got!r}")
    # The well-formed versions still take the bytes path.
    good = _reply(q_txt, owner + struct.pack(">HHIH", 16, 1, 60, 4) + b"\x03abc", 1)
    assert cleaner._fast(good, q_txt, len(q_txt) - 4) is not None
