"""Per-client rate limit: a flooding client is refused and aggregated; others are unaffected."""

from __future__ import annotations

import socket
import sqlite3
import time

import dns.edns
import dns.message
import dns.rcode
from helpers import make_policy

from resolver.dns.ratelimit import RateLimiter, RefusedCounter

RATE = 100
FLOOD = 3000


def flood(port: int, source: str, count: int) -> list[dns.message.Message]:
    """Send `count` unique denied names at once from `source`; collect every reply."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        s.bind((source, 0))
        for i in range(count):
            q = dns.message.make_query(f"x{i}.flood.test", "A", use_edns=0, id=i % 65536)
            s.sendto(q.to_wire(), ("127.0.0.1", port))
        replies = []
        deadline = time.monotonic() + 30.0
        while len(replies) < count and time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                replies.append(dns.message.from_wire(s.recv(4096)))
            except TimeoutError:
                break
        return replies


def test_flooding_client_is_refused_and_aggregated(dnsguard):
    g = dnsguard(make_policy(["127.0.0.1:9"], allow=["ok.test"], server={"rate_limit": RATE}))
    t0 = time.monotonic()
    replies = flood(g.port, "127.0.0.2", FLOOD)
    elapsed = time.monotonic() - t0
    # Meanwhile another client is served normally.
    other = [g.query(f"y{i}.flood.test", source="127.0.0.3").rcode() for i in range(20)]
    assert other == [dns.rcode.NXDOMAIN] * 20

    assert len(replies) == FLOOD
    refused = [r for r in replies if r.rcode() == dns.rcode.REFUSED]
    answered = [r for r in replies if r.rcode() == dns.rcode.NXDOMAIN]
    assert len(refused) + len(answered) == FLOOD
    assert len(answered) <= RATE + RATE * elapsed + 5 and len(refused) >= FLOOD - len(answered)
    edes = {(o.code, o.text) for r in refused for o in r.options if isinstance(o, dns.edns.EDEOption)}
    assert edes == {(dns.edns.EDECode.PROHIBITED, None)}

    assert g.stop() == 0
    db = sqlite3.connect(g.workdir / "dnsguard.db")
    try:
        rows = db.execute("SELECT ts, verdict, rcode, qname, note FROM lookups "
                          "WHERE client = '127.0.0.2' AND note LIKE 'rate-limited:%'").fetchall()
        plain = db.execute("SELECT count(*) FROM lookups WHERE client = '127.0.0.2' "
                           "AND note IS NULL AND rcode = 'NXDOMAIN'").fetchone()[0]
        other_rows = db.execute("SELECT count(*) FROM lookups WHERE client = '127.0.0.3'").fetchone()[0]
    finally:
        db.close()
    assert sum(int(note.split()[1]) for *_, note in rows) == len(refused)
    assert {(v, rc, q) for _, v, rc, q, _ in rows} == {(None, "REFUSED", None)}
    assert len(rows) == len({int(ts) for ts, *_ in rows})  # one row per second, not one per query
    assert len(rows) <= elapsed + 3
    assert plain == len(answered) and other_rows == 20


def test_bucket_table_is_bounded_and_known_clients_keep_theirs():
    rl = RateLimiter(10, max_clients=1000)
    assert rl.allow("192.0.2.1", 0.0)
    for i in range(100_000):  # spoofed sources, all within one second
        rl.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 0.5)
    assert len(rl) == 1000
    # The known client still has its own bucket (9 left + 5 refilled, capped at the burst of 10),
    # while a new address shares the overflow bucket the spoofed ones have emptied.
    assert sum(rl.allow("192.0.2.1", 0.5) for _ in range(20)) == 10
    assert not rl.allow("198.51.100.7", 0.5)
    # Once they have refilled (idle 1 s), the spoofed buckets are dropped to make room.
    assert rl.allow("198.51.100.7", 2.0) and len(rl) < 1000


def test_refused_counts_become_one_record_per_client_and_second():
    out: list[tuple] = []
    c = RefusedCounter(out.append)
    for ts in (100.1, 100.5, 100.9, 101.2):
        c.count("192.0.2.1", "udp", ts, "enforce")
    c.count("192.0.2.2", "tcp", 100.3, "enforce")
    c.flush("enforce", 101.0)
    c.flush("enforce")
    got = sorted((r[0], r[1], r[2], r[8], r[12]) for r in out)
    assert got == [(100.0, "192.0.2.1", "udp", 5, "rate-limited: 3 queries"),
                   (100.0, "192.0.2.2", "tcp", 5, "rate-limited: 1 queries"),
                   (101.0, "192.0.2.1", "udp", 5, "rate-limited: 1 queries")]
    assert all(len(r) == 13 for r in out)


def test_a_real_client_idle_during_a_spoofed_flood_keeps_its_bucket():
    """The reviewer's case: a client that has asked often, then idles 3 s while single-use
    spoofed addresses fill the table, is still served when it comes back."""
    from resolver.dns.ratelimit import ALLOWED, LIMITED_SHARED

    rl = RateLimiter(10, max_clients=1000)
    for k in range(20):  # a real client: many queries over two seconds
        rl.check("192.0.2.1", k * 0.1)
    t = 2.0
    for i in range(30_000):  # spoofed single-use sources for three seconds
        t = 2.0 + i * 0.0001
        rl.check(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", t)
    assert len(rl) <= 1000
    # Pruning dropped the spoofed single-use buckets, not the client's: it gets its burst back.
    answers = [rl.check("192.0.2.1", t + 0.01) for _ in range(12)]
    assert answers.count(ALLOWED) == 10
    # A new address while the table is full of fresh spoofed buckets: the shared bucket, refused.
    for i in range(30_000, 31_000):
        rl.check(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", t + 0.02)
    assert rl.check("198.51.100.9", t + 0.02) == LIMITED_SHARED


def test_shared_bucket_refusals_are_one_record_a_second():
    out: list[tuple] = []
    c = RefusedCounter(out.append, max_clients=3)
    for i in range(5000):  # a spoofed flood: every address new, all in the shared bucket
        c.count(f"10.0.{i >> 8}.{i & 255}", "udp", 200.0 + i / 10_000, "enforce", shared=True)
    for i in range(10):  # own buckets: more addresses than the table holds -> the rest are shared
        c.count(f"192.0.2.{i}", "udp", 200.5, "enforce")
    c.flush("enforce", 201.0)
    assert len(out) == 4  # three own records + one shared record, not 5,007
    shared = [r for r in out if "shared bucket" in r[12]]
    assert len(shared) == 1 and shared[0][0] == 200.0
    assert shared[0][12] == "rate-limited: 5007 queries from more than 4096 addresses (shared bucket)"
    assert sum(int(r[12].split()[1]) for r in out) == 5010
    assert c.total == 5010
