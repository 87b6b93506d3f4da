"""End-to-end: a real `python -m resolver serve` in front of a real dnsmasq (or the test
nameserver), spoken to over real loopback sockets.

The upstream's own query log is the witness for "was this name forwarded?": a
denied name must never reach it, an allowed one must (the positive control).
"""

from __future__ import annotations

import signal
import socket
import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from helpers import (
    addresses,
    frame,
    make_policy,
    question_bytes,
    recv_frame,
    tcp_connect,
    tcp_exchange,
    udp_exchange,
    wait_closed,
)
from nameserver import (
    POISON_ADDITIONAL_OWNER,
    POISON_ADDRESS,
    POISON_OWNER,
    big_a_rrset_records,
)

SLACK = 1.5  # seconds allowed on top of configured timeouts (CI machines are slow)


def header(wire: bytes) -> tuple[int, int, int, int, int, int]:
    """(id, flags, qdcount, ancount, nscount, arcount) of a raw message."""
    return struct.unpack("!6H", wire[:12])


def rcode_of(wire: bytes) -> int:
    return header(wire)[1] & 0x000F


def qr_of(wire: bytes) -> bool:
    return bool(header(wire)[1] & 0x8000)


def ede_options(msg: dns.message.Message) -> list[dns.edns.EDEOption]:
    return [o for o in msg.options if o.otype == dns.edns.OptionType.EDE]


@pytest.fixture
def upstream(dnsmasq):
    """The default dnsmasq upstream (records in conftest.DEFAULT_*)."""
    return dnsmasq()


# -------------------------------------------------------------------- forwarding
def test_allowed_name_is_answered_over_udp_and_tcp(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test", "txt.test"]))
    r = g.query("allowed.test")
    assert r.rcode() == dns.rcode.NOERROR
    assert addresses(r) == {"192.0.2.1"}
    assert r.flags & dns.flags.QR
    r = g.query("allowed.test", tcp=True)
    assert r.rcode() == dns.rcode.NOERROR
    assert addresses(r) == {"192.0.2.1"}
    r = g.query("txt.test", "TXT")
    assert r.rcode() == dns.rcode.NOERROR
    assert "hello from dnsmasq" in r.answer[0][0].to_text()
    upstream.sync()
    assert "allowed.test" in upstream.queried_names()
    assert "txt.test" in upstream.queried_names()


def test_several_queries_on_one_tcp_connection(upstream, dnsguard):
    """RFC 7766: pipelined, length-framed queries on one connection; replies matched by ID."""
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test", "txt.test", "other.test"]))
    queries = {
        0x1111: ("allowed.test", "A"),
        0x2222: ("txt.test", "TXT"),
        0x3333: ("denied.test", "A"),
    }
    wires = {}
    for qid, (name, rdtype) in queries.items():
        q = dns.message.make_query(name, rdtype)
        q.id = qid
        wires[qid] = q.to_wire()
    with tcp_connect(g.port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"".join(frame(w) for w in wires.values()))  # all three in one write
        replies = {}
        for _ in queries:
            m = dns.message.from_wire(recv_frame(s, timeout=5))
            replies[m.id] = m
        assert set(replies) == set(queries)
        assert addresses(replies[0x1111]) == {"192.0.2.1"}
        assert "hello from dnsmasq" in replies[0x2222].answer[0][0].to_text()
        assert replies[0x3333].rcode() == dns.rcode.NXDOMAIN
        # A fourth query, its frame dribbled out in pieces, on the same connection.
        q = dns.message.make_query("other.test", "A")
        q.id = 0x4444
        data = frame(q.to_wire())
        for piece in (data[:1], data[1:2], data[2:9], data[9:]):
            s.sendall(piece)
        m = dns.message.from_wire(recv_frame(s, timeout=5))
        assert m.id == 0x4444
        assert addresses(m) == {"192.0.2.2"}


# ------------------------------------------------------------------------ policy
def test_denied_name_gets_nxdomain_and_never_reaches_upstream(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"], deny=["denied.test"]))

    # Explicit deny rule, with EDNS: NXDOMAIN + EDE 15 "Blocked" naming the rule.
    r = g.query("denied.test", use_edns=0)  # dnspython checks ID and question echo
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert not r.answer
    assert r.edns == 0
    ede = ede_options(r)
    assert len(ede) == 1, r.options
    assert ede[0].code == dns.edns.EDECode.BLOCKED == 15
    assert ede[0].text and "denied.test" in ede[0].text

    # Default deny (in no list), with EDNS, over TCP too.
    for tcp in (False, True):
        r = g.query("other.test", use_edns=0, tcp=tcp)
        assert r.rcode() == dns.rcode.NXDOMAIN
        ede = ede_options(r)
        assert len(ede) == 1 and ede[0].code == 15
        assert ede[0].text, "the EDE text should say why (the policy)"

    # Without EDNS in the query, no OPT record may appear in the response (RFC 6891).
    r = g.query("denied.test")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.edns == -1 and not r.options

    # Positive control: the allowed name does reach dnsmasq.
    assert addresses(g.query("allowed.test")) == {"192.0.2.1"}
    upstream.sync()
    names = upstream.queried_names()
    assert "allowed.test" in names
    assert "denied.test" not in names
    assert "other.test" not in names


def test_denied_reply_matches_id_and_echoes_question_bytes(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"]))
    for use_edns in (None, 0):
        q = dns.message.make_query("DeNiEd.TeSt", "AAAA", use_edns=use_edns)
        q.id = 0xBEEF
        wire = q.to_wire()
        reply = udp_exchange(wire, g.port)
        assert reply is not None
        qid, flags, qd, an, _, ar = header(reply)
        assert qid == 0xBEEF and flags & 0x8000
        assert rcode_of(reply) == dns.rcode.NXDOMAIN
        assert qd == 1 and an == 0
        assert ar == (0 if use_edns is None else 1)
        assert question_bytes(reply) == question_bytes(wire)


def test_deny_wins_over_allow(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["both.test", "*.corp.test"],
                             deny=["both.test", "secret.corp.test"]))
    assert g.query("both.test").rcode() == dns.rcode.NXDOMAIN
    assert g.query("secret.corp.test").rcode() == dns.rcode.NXDOMAIN
    r = g.query("www.corp.test")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"198.51.100.2"}
    upstream.sync()
    names = upstream.queried_names()
    assert "www.corp.test" in names
    assert "both.test" not in names and "secret.corp.test" not in names


def test_wildcard_allows_any_depth_below_but_not_the_apex(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["*.example.test"]))
    for name in ("a.b.example.test", "www.example.test", "X.Y.EXAMPLE.TEST"):
        r = g.query(name)
        assert r.rcode() == dns.rcode.NOERROR, name
        assert addresses(r) == {"198.51.100.1"}, name
    assert g.query("example.test").rcode() == dns.rcode.NXDOMAIN
    assert g.query("badexample.test").rcode() == dns.rcode.NXDOMAIN  # suffix, not a label boundary
    upstream.sync()
    names = upstream.queried_names()
    assert "a.b.example.test" in names
    assert "example.test" not in names
    assert "badexample.test" not in names


ODD_NAMES = {
    "dot_in_label": b"\x0callowed.test\x00",  # one label "allowed.test", not two
    "nul_in_label": b"\x08allowed\x00\x04test\x00",
    "trailing_dot_in_label": b"\x07allowed\x05test.\x00",
    "space_in_label": b"\x08allowed \x04test\x00",
}


@pytest.mark.parametrize("case", sorted(ODD_NAMES))
def test_odd_bytes_in_labels_do_not_match_allowed_names(upstream, dnsguard, case):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"]))
    wire = struct.pack("!6H", 0x0DD0, 0x0100, 1, 0, 0, 0) + ODD_NAMES[case] + struct.pack("!HH", 1, 1)
    reply = udp_exchange(wire, g.port)
    assert reply is not None
    assert header(reply)[0] == 0x0DD0 and qr_of(reply)
    assert rcode_of(reply) == dns.rcode.NXDOMAIN, rcode_of(reply)
    assert header(reply)[3] == 0  # no answers
    assert question_bytes(reply) == question_bytes(wire)
    upstream.sync()
    assert upstream.queries() == [], "a name that is not allowed.test was forwarded"


@pytest.mark.parametrize("how", ["policy", "flag"])
def test_audit_mode_answers_denied_names_with_real_records(upstream, dnsguard, how):
    policy = make_policy([upstream.addr], allow=["allowed.test"], deny=["audit.test"],
                         mode="audit" if how == "policy" else None)
    g = dnsguard(policy, *(["--mode", "audit"] if how == "flag" else []))
    r = g.query("denied.test")  # default deny
    assert r.rcode() == dns.rcode.NOERROR
    assert addresses(r) == {"192.0.2.66"}
    r = g.query("audit.test")  # explicit deny rule
    assert r.rcode() == dns.rcode.NOERROR
    assert addresses(r) == {"192.0.2.7"}
    upstream.sync()
    assert "denied.test" in upstream.queried_names()
    assert "audit.test" in upstream.queried_names()


def test_flag_mode_enforce_overrides_audit_policy(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"], mode="audit"), "--mode", "enforce")
    assert g.query("denied.test").rcode() == dns.rcode.NXDOMAIN
    assert addresses(g.query("allowed.test")) == {"192.0.2.1"}


def test_client_outside_acl_is_refused(upstream, dnsguard):
    policy = make_policy([upstream.addr], allow=["allowed.test", "other.test"],
                         server={"clients": ["127.0.0.1/32"]})
    g = dnsguard(policy)
    r = g.query("other.test", source="127.0.0.2")
    assert r.rcode() == dns.rcode.REFUSED
    assert not r.answer
    r = g.query("allowed.test", source="127.0.0.1")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"192.0.2.1"}
    upstream.sync()
    assert "allowed.test" in upstream.queried_names()
    assert "other.test" not in upstream.queried_names()


def test_private_addresses_are_stripped_unless_covered_by_allow_cidrs(upstream, dnsguard):
    """DNS rebinding: an allowed name must not point into private ranges unless [allow] cidrs says so."""
    g = dnsguard(make_policy([upstream.addr], allow=["rebind.test", "lan.test"]))
    r = g.query("rebind.test")
    assert r.rcode() != dns.rcode.SERVFAIL
    assert "10.0.0.1" not in addresses(r)
    r = g.query("lan.test", tcp=True)
    assert addresses(r) == {"198.51.100.10"}
    g2 = dnsguard(make_policy([upstream.addr], allow=["rebind.test", "lan.test"], cidrs=["10.0.0.0/8"]))
    assert addresses(g2.query("rebind.test")) == {"10.0.0.1"}
    assert addresses(g2.query("lan.test")) == {"198.51.100.10"}


# ---------------------------------------------------------------------- upstreams
def test_blackhole_upstream_gives_servfail_within_timeout(nameserver, dnsguard):
    ns = nameserver("blackhole")
    g = dnsguard(make_policy([ns.addr], allow=["slow.test"], timeout_ms=500))
    start = time.monotonic()
    r = g.query("slow.test", timeout=0.5 + SLACK + 3)
    elapsed = time.monotonic() - start
    assert r.rcode() == dns.rcode.SERVFAIL
    assert elapsed < 0.5 + SLACK, f"SERVFAIL took {elapsed:.2f}s with timeout_ms=500"
    assert ns.count() >= 1
    # Still serving afterwards, and over TCP the same.
    r = g.query("slow.test", tcp=True, timeout=0.5 + SLACK + 3)
    assert r.rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("first_mode", ["blackhole", "servfail"])
def test_failover_to_second_upstream(nameserver, dnsguard, first_mode):
    bad = nameserver(first_mode, {"fail.test.": {"A": "192.0.2.99"}})
    good = nameserver("answer", {"fail.test.": {"A": "192.0.2.10"}})
    g = dnsguard(make_policy([bad.addr, good.addr], allow=["fail.test"], timeout_ms=1000))
    start = time.monotonic()
    r = g.query("fail.test", timeout=1.0 + SLACK + 3)
    elapsed = time.monotonic() - start
    assert r.rcode() == dns.rcode.NOERROR
    assert addresses(r) == {"192.0.2.10"}
    assert elapsed < 1.0 + SLACK
    assert bad.count() >= 1, "the first upstream should be tried first"
    assert good.count() >= 1


def test_truncated_upstream_answer_is_retried_over_tcp(nameserver, dnsguard):
    small = nameserver("truncate", {"small.test.": {"A": ["192.0.2.1", "192.0.2.2"]}})
    g = dnsguard(make_policy([small.addr], allow=["small.test"]))
    r = g.query("small.test")  # UDP client; upstream says TC over UDP
    assert r.rcode() == dns.rcode.NOERROR
    assert not r.flags & dns.flags.TC
    assert addresses(r) == {"192.0.2.1", "192.0.2.2"}
    assert small.count("udp") >= 1
    assert small.count("tcp") >= 1, "dnsguard should have retried the truncated answer over TCP"


def test_large_answer_truncated_to_udp_client_full_over_tcp(nameserver, dnsguard):
    big = nameserver("truncate", big_a_rrset_records("big.test.", 300))
    g = dnsguard(make_policy([big.addr], allow=["big.test"]))
    r = g.query("big.test", use_edns=0, payload=1232)
    assert r.rcode() == dns.rcode.NOERROR
    assert len(r.to_wire()) <= 1232
    assert r.flags & dns.flags.TC, "a 300-address RRset cannot fit 1232 bytes: TC must be set"
    assert big.count("tcp") >= 1, "the truncated upstream answer should be retried over TCP"
    r = g.query("big.test", tcp=True, timeout=5)
    assert r.rcode() == dns.rcode.NOERROR
    assert not r.flags & dns.flags.TC
    assert len(addresses(r)) == 300


def test_spoofed_wrong_id_reply_is_ignored(nameserver, dnsguard):
    ns = nameserver("wrong_id", {"spoof.test.": {"A": "192.0.2.30"}})
    g = dnsguard(make_policy([ns.addr], allow=["spoof.test"]))
    r = g.query("spoof.test")
    assert r.rcode() == dns.rcode.NOERROR
    assert addresses(r) == {"192.0.2.30"}
    assert POISON_ADDRESS not in addresses(r)


def test_poison_records_are_not_relayed_or_cached(nameserver, dnsguard):
    records = {"victim.test.": {"A": "192.0.2.20"}, POISON_OWNER: {"A": "192.0.2.21"},
               POISON_ADDITIONAL_OWNER: {"A": "192.0.2.22"}}
    ns = nameserver("poison", records)
    g = dnsguard(make_policy([ns.addr], allow=["victim.test", POISON_OWNER.rstrip("."),
                                              POISON_ADDITIONAL_OWNER.rstrip(".")]))
    r = g.query("victim.test", use_edns=0)
    assert r.rcode() == dns.rcode.NOERROR
    assert {rrset.name.to_text().lower() for rrset in r.answer} == {"victim.test."}
    assert addresses(r) == {"192.0.2.20"}
    extra = [rrset for rrset in r.additional
             if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)]
    assert not extra, f"additional-section addresses were relayed: {extra}"
    # The unrelated owners must not have been cached from that reply: asking for them
    # goes to the upstream.
    before = ns.queries_for(POISON_OWNER)
    g.query(POISON_OWNER)
    assert ns.queries_for(POISON_OWNER) == before + 1
    before = ns.queries_for(POISON_ADDITIONAL_OWNER)
    g.query(POISON_ADDITIONAL_OWNER)
    assert ns.queries_for(POISON_ADDITIONAL_OWNER) == before + 1


# -------------------------------------------------------------------------- cache
def test_second_query_is_answered_from_cache(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["cache.test"]))
    r1 = g.query("cache.test")
    assert addresses(r1) == {"192.0.2.5"}
    ttl1 = r1.answer[0].ttl
    assert 0 < ttl1 <= 300
    upstream.sync()
    assert upstream.count("cache.test", "A") == 1
    r2 = g.query("cache.test")
    r3 = g.query("cache.test", tcp=True)
    for r in (r2, r3):
        assert r.rcode() == dns.rcode.NOERROR
        assert addresses(r) == {"192.0.2.5"}
        assert r.answer[0].ttl <= ttl1
    upstream.sync()
    assert upstream.count("cache.test", "A") == 1, "the repeat queries should not reach dnsmasq"


@pytest.mark.parametrize("kind", ["forwarded", "cached", "denied"])
def test_0x20_mixed_case_question_is_echoed_exactly(upstream, dnsguard, kind):
    g = dnsguard(make_policy([upstream.addr], allow=["cache.test", "allowed.test"]))
    name = {"forwarded": "AlLoWeD.tEsT", "cached": "CaChE.TeSt", "denied": "DeNiEd.TeSt"}[kind]
    if kind == "cached":
        assert addresses(g.query("cache.test")) == {"192.0.2.5"}  # prime the cache (lower case)
    for use_tcp, use_edns in ((False, False), (False, True), (True, False), (True, True)):
        q = dns.message.make_query(name, "A", use_edns=0 if use_edns else None)
        wire = q.to_wire()
        reply = tcp_exchange(wire, g.port) if use_tcp else udp_exchange(wire, g.port)
        assert reply is not None
        assert header(reply)[0] == q.id
        assert question_bytes(reply) == question_bytes(wire), (kind, use_tcp, use_edns)
        expected = dns.rcode.NXDOMAIN if kind == "denied" else dns.rcode.NOERROR
        assert rcode_of(reply) == expected


# --------------------------------------------------------------- malformed input
@pytest.mark.parametrize("opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY,
                                    dns.opcode.UPDATE])
def test_opcode_other_than_query_gets_notimp(upstream, dnsguard, opcode):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"]))
    q = dns.message.make_query("allowed.test", "A")
    q.set_opcode(opcode)
    reply = udp_exchange(q.to_wire(), g.port)
    assert reply is not None
    assert header(reply)[0] == q.id and qr_of(reply)
    assert rcode_of(reply) == dns.rcode.NOTIMP
    assert (header(reply)[1] >> 11) & 0xF == opcode
    upstream.sync()
    assert "allowed.test" not in upstream.queried_names()


def test_packet_with_qr_set_gets_no_reply(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"]))
    bogus = dns.message.make_query("allowed.test", "A")
    bogus.id = 0x0BAD
    bogus.flags |= dns.flags.QR
    good = dns.message.make_query("allowed.test", "A")
    good.id = 0x0600D
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(bogus.to_wire(), ("127.0.0.1", g.port))
        with pytest.raises(TimeoutError):
            s.recvfrom(65535)
        # The socket is still answered, and the next datagram is the good query's reply.
        s.settimeout(3)
        s.sendto(good.to_wire(), ("127.0.0.1", g.port))
        data, _ = s.recvfrom(65535)
    assert header(data)[0] == 0x0600D
    assert rcode_of(data) == dns.rcode.NOERROR


def _hdr(qid: int, qdcount: int, flags: int = 0x0100) -> bytes:
    return struct.pack("!6H", qid, flags, qdcount, 0, 0, 0)


_Q_TAIL = struct.pack("!HH", 1, 1)  # type A, class IN
MALFORMED = {
    "qdcount0": _hdr(0x1001, 0),
    "qdcount2": _hdr(0x1002, 2) + b"\x07allowed\x04test\x00" + _Q_TAIL + b"\x05other\x04test\x00" + _Q_TAIL,
    "label64": _hdr(0x1003, 1) + b"\x40" + b"a" * 64 + b"\x04test\x00" + _Q_TAIL,
    "compression_loop": _hdr(0x1004, 1) + b"\xc0\x0c" + _Q_TAIL,
    "compression_loop_2": _hdr(0x1005, 1) + b"\x01a\xc0\x0c" + _Q_TAIL,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_question_gets_formerr(upstream, dnsguard, case):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test", "other.test"]))
    wire = MALFORMED[case]
    for use_tcp in (False, True):
        reply = tcp_exchange(wire, g.port) if use_tcp else udp_exchange(wire, g.port)
        assert reply is not None, case
        assert len(reply) >= 12
        assert header(reply)[0] == header(wire)[0] and qr_of(reply)
        assert rcode_of(reply) == dns.rcode.FORMERR, (case, use_tcp, rcode_of(reply))
    upstream.sync()
    assert upstream.queried_names() == []
    assert g.alive()


def test_any_gets_minimal_hinfo_answer_without_forwarding(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"]))
    r = g.query("allowed.test", "ANY")
    assert r.rcode() == dns.rcode.NOERROR
    assert [rrset.rdtype for rrset in r.answer] == [dns.rdatatype.HINFO]
    assert len(r.answer[0]) == 1
    upstream.sync()
    assert upstream.count("allowed.test", "ANY") == 0


# ---------------------------------------------------------------------------- TCP
def test_idle_tcp_connection_is_closed_after_idle_timeout(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"],
                             server={"tcp_idle_timeout_ms": 500}))
    with tcp_connect(g.port) as s:  # never sends anything
        took = wait_closed(s, 0.5 + SLACK + 2)
    assert took is not None, "idle connection was never closed"
    assert 0.3 <= took <= 0.5 + SLACK
    with tcp_connect(g.port) as s:  # one query, then idle
        s.sendall(frame(dns.message.make_query("allowed.test", "A").to_wire()))
        assert addresses(dns.message.from_wire(recv_frame(s))) == {"192.0.2.1"}
        took = wait_closed(s, 0.5 + SLACK + 2)
    assert took is not None and took <= 0.5 + SLACK


def test_tcp_connection_limit_does_not_lock_out_new_clients(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"],
                             server={"tcp_max_connections": 4, "tcp_idle_timeout_ms": 10000}))
    idle = [socket.create_connection(("127.0.0.1", g.port), timeout=3) for _ in range(4)]
    try:
        start = time.monotonic()
        with tcp_connect(g.port) as s:
            s.sendall(frame(dns.message.make_query("allowed.test", "A").to_wire()))
            r = dns.message.from_wire(recv_frame(s, timeout=3))
        assert addresses(r) == {"192.0.2.1"}
        assert time.monotonic() - start < 3  # well before the 10 s idle timeout frees anything
    finally:
        for s in idle:
            s.close()
    assert addresses(g.query("allowed.test", tcp=True)) == {"192.0.2.1"}


# ------------------------------------------------------------------------ signals
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_cleanly_and_quickly(upstream, dnsguard, sig):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"]))
    assert addresses(g.query("allowed.test")) == {"192.0.2.1"}
    assert g.query("denied.test").rcode() == dns.rcode.NXDOMAIN
    start = time.monotonic()
    rc = g.stop(sig, timeout=10)
    elapsed = time.monotonic() - start
    assert rc == 0, g.stderr_text()[-2000:]
    assert elapsed < 5, f"took {elapsed:.1f}s to exit"
    assert "Traceback" not in g.stderr_text()
