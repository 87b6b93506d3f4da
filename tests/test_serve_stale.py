"""Serve-stale (RFC 8767): a real upstream answers, goes silent, the TTL runs out.

The client still gets the answer -- TTL 30, EDE 3 -- within the normal timeout; a
denied name (resolved in audit mode) never is; with ``stale_max_s = 0`` the client gets
SERVFAIL. While the upstream stays down, one background refresh at a time asks it again.
"""

from __future__ import annotations

import sqlite3
import time

import dns.edns
import dns.message
import dns.rcode
import pytest
from helpers import make_policy, wait_until

from resolver.core.errors import PolicyError
from resolver.dns.cache import AnswerCache, Entry
from resolver.policy.config import parse_config

UPSTREAM_MS = 500
RECORDS = {"www.stale.test.": {"A": "192.0.2.31", "_ttl": "1"},
           "deny.stale.test.": {"A": "192.0.2.32", "_ttl": "1"},
           "fresh.stale.test.": {"A": "192.0.2.33", "_ttl": "1"}}


def ede(msg: dns.message.Message) -> list[int]:
    return [o.code for o in msg.options if isinstance(o, dns.edns.EDEOption)]


def answer(msg: dns.message.Message) -> list[tuple[str, int]]:
    return [(rd.address, rr.ttl) for rr in msg.answer for rd in rr]


def ask(g, name: str, tcp: bool = False) -> dns.message.Message:
    return g.query(name, tcp=tcp, timeout=UPSTREAM_MS / 1000 + 2.0, use_edns=0)


def expire(first_answer_at: float) -> None:
    # The records carry TTL 1: wait on the clock (not on a guess) until they have run out.
    wait_until(lambda: time.monotonic() > first_answer_at + 1.5, 5.0, what="the TTL to run out")


def test_upstream_down_answers_stale_then_recovers(nameserver, dnsguard):
    ns = nameserver("answer", RECORDS)
    g = dnsguard(make_policy([ns.addr], mode="audit", allow=["www.stale.test", "fresh.stale.test"],
                             timeout_ms=UPSTREAM_MS))
    assert answer(ask(g, "www.stale.test")) == [("192.0.2.31", 1)]
    assert answer(ask(g, "deny.stale.test")) == [("192.0.2.32", 1)]  # audit: resolved, cached
    t_first = time.monotonic()
    ns.mode = "blackhole"
    expire(t_first)

    for tcp in (False, True):
        resp = ask(g, "www.stale.test", tcp)
        assert resp.rcode() == dns.rcode.NOERROR
        assert answer(resp) == [("192.0.2.31", 30)] and ede(resp) == [dns.edns.EDECode.STALE_ANSWER]
    denied = ask(g, "deny.stale.test")
    assert denied.rcode() == dns.rcode.SERVFAIL and not denied.answer

    # Within the recheck window a burst is answered stale at once and starts ONE refresh.
    before = ns.queries_for("www.stale.test")
    for _ in range(10):
        assert answer(ask(g, "www.stale.test")) == [("192.0.2.31", 30)]
    # Barrier: a later upstream query; the nameserver handles its socket's datagrams in order.
    ask(g, "barrier.stale.test")
    wait_until(lambda: ns.queries_for("barrier.stale.test"), 5.0, what="the barrier upstream")
    assert ns.queries_for("www.stale.test") == before + 1

    # The upstream comes back: a background refresh replaces the stale entry.
    ns.mode = "answer"
    wait_until(lambda: not ede(ask(g, "www.stale.test")), 10.0, what="a fresh answer")
    assert answer(ask(g, "www.stale.test"))[0][0] == "192.0.2.31"

    assert g.stop() == 0
    db = sqlite3.connect(g.workdir / "dnsguard.db")
    try:
        rows = db.execute("SELECT rcode, cached, note FROM lookups WHERE qname = 'www.stale.test' "
                          "AND note = 'stale'").fetchall()
        denied_rows = db.execute("SELECT count(*) FROM lookups WHERE qname = 'deny.stale.test' "
                                 "AND note = 'stale'").fetchone()[0]
    finally:
        db.close()
    assert len(rows) >= 12 and set(rows) == {("NOERROR", 1, "stale")}
    assert denied_rows == 0


def test_stale_max_zero_means_servfail(nameserver, dnsguard):
    ns = nameserver("answer", RECORDS)
    g = dnsguard(make_policy([ns.addr], allow=["fresh.stale.test"], timeout_ms=UPSTREAM_MS,
                             cache={"stale_max_s": 0}))
    assert answer(ask(g, "fresh.stale.test")) == [("192.0.2.33", 1)]
    t_first = time.monotonic()
    ns.mode = "blackhole"
    expire(t_first)
    resp = ask(g, "fresh.stale.test")
    assert resp.rcode() == dns.rcode.SERVFAIL and ede(resp) == [dns.edns.EDECode.NO_REACHABLE_AUTHORITY]


def test_cache_keeps_expired_entries_only_for_the_window():
    cache = AnswerCache(10, stale_max=100.0)
    entry = Entry(0, 0, 0, 0, b"", [], [], 10, 1000.0, None)
    cache.put(b"k", entry)
    assert cache.get(b"k", 1005.0) is entry and cache.stale(b"k", 1005.0) is None  # live: not stale
    assert cache.get(b"k", 1050.0) is None and cache.stale(b"k", 1050.0) is entry
    assert cache.get(b"k", 1111.0) is None and len(cache) == 0  # past the window: dropped
    off = AnswerCache(10, stale_max=0.0)
    off.put(b"k", entry)
    assert off.get(b"k", 1011.0) is None and off.stale(b"k", 1011.0) is None and len(off) == 0


def test_stale_max_s_is_validated():
    assert parse_config("[cache]\nstale_max_s = 0\n").cache.stale_max == 0
    assert parse_config("").cache.stale_max == 86_400
    with pytest.raises(PolicyError, match=r"<policy>:2: cache.stale_max_s must be between 0"):
        parse_config("[cache]\nstale_max_s = -1\n")
