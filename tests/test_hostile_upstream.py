"""A hostile upstream: whatever it sends, every client gets an answer and stderr no traceback.

A real test nameserver answers each query with a reply drawn (seeded, per name) from a
corpus of broken replies, over UDP and -- after a valid TC=1 reply -- over TCP. Replies
that do not match the query (wrong ID, question or type, QR=0, random bytes, a bare
header) must be ignored while dnsguard keeps waiting; replies that match but whose
records do not parse (OPT in the answer section, compression loops, bad RDATA lengths,
lying counts) must become SERVFAIL with EDE 23 and a note in the log row.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import struct
import zlib

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
from helpers import make_policy

from resolver.core.errors import UpstreamError
from resolver.dns.clean import Cleaned, Cleaner
from resolver.dns.upstream import Upstream

SEED = 1111
QUERIES = 320
UPSTREAM_TIMEOUT_MS = 1500
CLIENT_TIMEOUT = 5.0  # well past the upstream timeout: a miss here is a hang, not slowness

# Outcomes: what the client must get for a name whose upstream reply fell in each group.
IGNORED = ("random", "header_only", "wrong_id", "wrong_name", "wrong_type", "qr0", "qd0", "short")
UNPARSEABLE = ("opt_in_answer", "compression_loop", "rdlen_past_end", "a_rdlen_5", "ancount_lies",
               "pointer_forward", "label_type")
LOOSE = ("cut", "bitflip", "oversized")  # any answer is fine, as long as there is one

BAD_EDE = 23  # Network Error
TIMEOUT_EDE = 22  # No Reachable Authority


def good_reply(query: dns.message.Message, addr: str) -> bytes:
    r = dns.message.make_response(query)
    r.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", "A", addr))
    return r.to_wire()


def address_for(name: str) -> str:
    return f"192.0.2.{zlib.crc32(name.encode()) % 250 + 1}"


def _qend(wire: bytes) -> int:
    i = 12
    while wire[i]:
        i += wire[i] + 1
    return i + 5


def hostile(kind: str, query_wire: bytes, rng: random.Random) -> bytes:
    """One reply of `kind` for `query_wire` (dnsguard's upstream query)."""
    q = dns.message.from_wire(query_wire)
    name = q.question[0].name.to_text()
    good = good_reply(q, address_for(name))
    qend = _qend(good)
    qid = good[:2]
    # The answer record as dnspython writes it: c00c 0001 0001 ttl 0004 addr.
    rr = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04" + bytes(rng.randrange(256) for _ in range(4))
    head = qid + b"\x81\x80"
    one = b"\x00\x01\x00\x01\x00\x00\x00\x00"  # QD=1 AN=1
    if kind == "random":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 600)))
    if kind == "header_only":
        return qid + b"\x81\x80" + b"\x00" * 8
    if kind == "wrong_id":
        return bytes((good[0] ^ 0x5A, good[1] ^ 0xA5)) + good[2:]
    if kind == "wrong_name":
        other = good_reply(dns.message.make_query("other." + name, "A"), "192.0.2.250")
        return qid + other[2:]
    if kind == "wrong_type":
        return good[:qend - 4] + b"\x00\x1c" + good[qend - 2:]
    if kind == "qr0":
        return good[:2] + bytes((good[2] & 0x7F,)) + good[3:]
    if kind == "qd0":
        return good[:4] + b"\x00\x00" + good[6:]
    if kind == "short":
        return good[:rng.randrange(2, qend)]
    question = good[12:qend]
    if kind == "opt_in_answer":
        opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
        return head + b"\x00\x01\x00\x02\x00\x00\x00\x00" + question + rr + opt
    if kind == "compression_loop":
        loop_at = 12 + len(question)
        return (head + one + question
                + bytes((0xC0 | (loop_at >> 8), loop_at & 0xFF)) + rr[2:])
    if kind == "rdlen_past_end":
        return head + one + question + rr[:10] + b"\x01\x00" + rr[12:]
    if kind == "a_rdlen_5":
        return head + one + question + rr[:10] + b"\x00\x05" + rr[12:] + b"\x00"
    if kind == "ancount_lies":
        return head + b"\x00\x01\x00\x03\x00\x00\x00\x00" + question + rr
    if kind == "pointer_forward":
        return head + one + question + b"\xc0\xff" + rr[2:]
    if kind == "label_type":
        return head + one + question + b"\x41abc\x00" + rr[2:]
    if kind == "cut":
        return good[:rng.randrange(qend + 1, len(good))]
    if kind == "bitflip":
        buf = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(qend, len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == "oversized":
        r = dns.message.make_response(q)
        addrs = [f"198.51.100.{i}" for i in range(rng.randrange(100, 250))]
        r.answer.append(dns.rrset.from_text_list(q.question[0].name, 300, "IN", "A", addrs))
        return r.to_wire()
    raise AssertionError(kind)


def plan(name: str) -> tuple[str, bool, bool]:
    """(kind, follow with the good reply, hostile reply over TCP) for a name, seeded."""
    rng = random.Random(SEED ^ zlib.crc32(name.encode()))
    kind = rng.choice(IGNORED + UNPARSEABLE + LOOSE)
    return kind, kind in IGNORED and rng.random() < 0.5, rng.random() < 0.3


def responder(query_wire: bytes, transport: str) -> list[bytes]:
    q = dns.message.from_wire(query_wire)
    name = q.question[0].name.to_text().lower()
    if not name.startswith("h"):  # the control names answer normally
        return [good_reply(q, address_for(name))]
    kind, follow, over_tcp = plan(name)
    if over_tcp and transport == "udp":
        tc = dns.message.make_response(q)
        tc.flags |= dns.flags.TC
        return [tc.to_wire()]
    rng = random.Random(SEED ^ zlib.crc32(name.encode()) ^ 0xF00D)
    out = [hostile(kind, query_wire, rng)]
    if follow:
        out.append(good_reply(q, address_for(name)))
    return out


def ede_codes(msg: dns.message.Message) -> list[int]:
    return [o.code for o in msg.options if isinstance(o, dns.edns.EDEOption)]


async def ask(port: int, name: str, tcp: bool) -> dns.message.Message:
    q = dns.message.make_query(name, "A", use_edns=0)
    if tcp:
        return await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=CLIENT_TIMEOUT)
    return await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=CLIENT_TIMEOUT,
                                    ignore_trailing=False)


async def test_hostile_corpus_never_breaks_the_server(nameserver, dnsguard):
    ns = nameserver("custom", responder=responder)
    g = dnsguard(make_policy([ns.addr], allow=["*.hostile.test", "*.control.test"],
                             timeout_ms=UPSTREAM_TIMEOUT_MS))
    names = [f"h{i}.hostile.test." for i in range(QUERIES)]
    rng = random.Random(SEED)
    sem = asyncio.Semaphore(32)

    async def one(name: str) -> tuple[str, dns.message.Message]:
        async with sem:
            return name, await ask(g.port, name, rng.random() < 0.3)

    results = await asyncio.gather(*(one(n) for n in names))
    seen = set()
    for name, resp in results:
        kind, follow, _ = plan(name)
        seen.add(kind)
        if kind in IGNORED:
            if follow:  # the bad reply was ignored and the right one taken
                assert resp.rcode() == dns.rcode.NOERROR, (name, kind)
                assert [rd.address for rr in resp.answer for rd in rr] == [address_for(name)], (name, kind)
            else:  # nothing usable came before the timeout
                assert resp.rcode() == dns.rcode.SERVFAIL and ede_codes(resp) == [TIMEOUT_EDE], (name, kind)
        elif kind in UNPARSEABLE:
            assert resp.rcode() == dns.rcode.SERVFAIL and ede_codes(resp) == [BAD_EDE], (name, kind)
        else:
            assert resp.rcode() in (dns.rcode.NOERROR, dns.rcode.SERVFAIL), (name, kind)
    assert seen == set(IGNORED + UNPARSEABLE + LOOSE)  # the seed drew every kind
    assert ns.count("tcp") > 0

    # Still serving, over both transports.
    for tcp in (False, True):
        resp = await ask(g.port, "ok.control.test.", tcp)
        assert [rd.address for rr in resp.answer for rd in rr] == [address_for("ok.control.test.")]

    assert g.stop() == 0
    err = g.stderr_text()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "unparseable replies" in line]
    assert lines == [f"dnsguard: upstream {ns.addr}: unparseable replies, answering SERVFAIL"]

    # Each unparseable reply left a note in its log row.
    db = sqlite3.connect(g.workdir / "dnsguard.db")
    try:
        notes = dict(db.execute("SELECT qname, note FROM lookups WHERE qname LIKE 'h%.hostile.test'"))
    finally:
        db.close()
    for name in names:
        kind, _, _ = plan(name)
        if kind in UNPARSEABLE:
            assert "unparseable reply" in notes[name.rstrip(".")], (name, kind)


async def test_episode_is_announced_once_and_its_end_too(nameserver, capsys):
    state = {"bad": True}

    def flaky(query_wire: bytes, transport: str) -> list[bytes]:
        if state["bad"]:
            return [hostile("compression_loop", query_wire, random.Random(1))]
        return [good_reply(dns.message.from_wire(query_wire), "192.0.2.9")]

    ns = nameserver("custom", responder=flaky)
    up = Upstream((("127.0.0.1", ns.port),), 0.5)
    up.QUIET_S = 3600.0
    name = dns.name.from_text("www.flaky.test.").to_wire()
    question = name + struct.pack(">HH", 1, 1)
    cleaner = Cleaner()

    async def resolve() -> Cleaned:
        return await up.resolve(question, len(name), 0, cleaner.clean)

    for _ in range(5):
        with pytest.raises(UpstreamError) as info:
            await resolve()
        assert info.value.unparseable and "unparseable reply" in str(info.value)
    state["bad"] = False
    assert (await resolve()).addrs == (("192.0.2.9", 300),)  # parses, but too soon to call it over
    up.QUIET_S = 0.0
    await resolve()
    await resolve()
    assert capsys.readouterr().err.splitlines() == [
        f"dnsguard: upstream 127.0.0.1:{ns.port}: unparseable replies, answering SERVFAIL",
        f"dnsguard: upstream 127.0.0.1:{ns.port}: replies parse again"]
