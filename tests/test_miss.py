"""The cache-miss path (`resolver/dns/miss.py`): a miss is a Pending settled by the socket
pool's callbacks, against real nameservers on loopback. What it must keep: identical misses
share one upstream query, every client query is answered (or logged as cut off) exactly once,
and nothing of an answered miss stays alive until its deadline."""

from __future__ import annotations

import asyncio
import gc
import os

import dns.edns
import dns.message
import dns.rcode
import pytest
from helpers import async_wait_until

from resolver.dns import outgoing, wire
from resolver.dns.chain import Resolver
from resolver.dns.miss import Fetch, Pending
from resolver.dns.upstream import Upstream, _Ask
from resolver.policy.config import parse_config

CLIENT = "127.0.0.1"


def resolver_for(port: int, records: list | None = None, timeout_ms: int = 2000) -> Resolver:
    policy = (f'[upstream]\nservers = ["127.0.0.1:{port}"]\ntimeout_ms = {timeout_ms}\n'
              f'[allow]\ndomains = ["*.miss.test"]\n')
    return Resolver(parse_config(policy), submit=None if records is None else records.append)


def query(name: str, qid: int = 0x1234) -> bytes:
    q = dns.message.make_query(name, "A", use_edns=0)
    q.id = qid
    return q.to_wire()


async def settled(got: Pending | bytes | None) -> bytes | None:
    """The answer, within a deadline: a broken miss path fails here instead of hanging."""
    return got if not isinstance(got, Pending) else await asyncio.wait_for(got, 5.0)


def addresses(resp: bytes) -> list[str]:
    return [rd.address for rr in dns.message.from_wire(resp).answer for rd in rr]


async def test_identical_misses_share_one_upstream_query_and_each_gets_its_own_id(nameserver):
    ns = nameserver("answer", {"same.miss.test.": {"A": "192.0.2.44"}})
    r = resolver_for(ns.port)
    try:
        got = [r.handle(query("same.miss.test", qid), CLIENT, "udp") for qid in range(1, 21)]
        assert all(isinstance(p, Pending) for p in got) and r.waiting == 20
        answers = [await settled(p) for p in got]
        assert [dns.message.from_wire(a).id for a in answers] == list(range(1, 21))
        assert all(addresses(a) == ["192.0.2.44"] for a in answers)
        assert ns.udp_count == 1 and r.waiting == 0 and not r._inflight
    finally:
        r.upstream.close()


async def test_many_different_misses_at_once_each_get_their_own_answer(nameserver):
    records = {f"n{i}.miss.test.": {"A": f"192.0.2.{i % 250 + 1}"} for i in range(300)}
    ns = nameserver("answer", records)
    r = resolver_for(ns.port)
    try:
        got = [r.handle(query(f"n{i}.miss.test", i), CLIENT, "udp") for i in range(300)]
        answers = [await settled(p) for p in got]
        assert [addresses(a) for a in answers] == [[f"192.0.2.{i % 250 + 1}"] for i in range(300)]
        assert ns.udp_count == 300
    finally:
        r.upstream.close()


async def test_an_answered_miss_leaves_nothing_alive_until_its_deadline(nameserver):
    # The pool's deadline lists outlive every answered query by the timeout (2 s here): they
    # must not hold the query's objects, or each miss feeds the garbage collector's older
    # generations (measured: ~5% of a miss's CPU in collections, and 60-80 ms pauses).
    ns = nameserver("answer", {f"g{i}.miss.test.": {"A": "192.0.2.5"} for i in range(50)})
    r = resolver_for(ns.port)
    try:
        for i in range(50):
            got = await settled(r.handle(query(f"g{i}.miss.test"), CLIENT, "udp"))
            assert addresses(got) == ["192.0.2.5"]
        pool = r.upstream.pools[("127.0.0.1", ns.port)]
        assert pool._due, "the deadlines of the answered queries are still pending (2 s)"
        assert all(type(k) is int for due in pool._due.values() for k in due)
        gc.collect()
        alive = [o for o in gc.get_objects() if type(o) in (_Ask, Fetch, Pending)]
        assert alive == []
    finally:
        r.upstream.close()


async def test_when_every_upstream_fails_at_once_the_answer_comes_back_from_handle(nameserver):
    ns = nameserver("answer", {"x.miss.test.": {"A": "192.0.2.6"}})
    rows: list[tuple] = []
    r = resolver_for(ns.port, rows)
    r.upstream.close()  # every exchange now fails when it is sent: no waiting, no Pending
    resp = r.handle(query("x.miss.test"), CLIENT, "udp")
    assert isinstance(resp, bytes)
    m = dns.message.from_wire(resp)
    assert m.rcode() == dns.rcode.SERVFAIL
    assert any(o.otype == dns.edns.EDE and o.code == 22 for o in m.options)  # No Reachable Authority
    assert r.waiting == 0 and not r._inflight
    assert rows[-1][8] == dns.rcode.SERVFAIL and rows[-1][12].startswith("upstream: ")
    assert ns.udp_count == 0


async def test_shutdown_answers_what_it_can_and_logs_the_rest_as_cut_off(nameserver):
    good = nameserver("answer", {"quick.miss.test.": {"A": "192.0.2.7"}})
    silent = nameserver("blackhole")
    rows: list[tuple] = []
    fast, slow = resolver_for(good.port, rows), resolver_for(silent.port, rows)
    heard: list[bytes | None] = []
    try:
        for r, name in ((fast, "quick.miss.test"), (slow, "stuck.miss.test")):
            pending = r.handle(query(name), CLIENT, "udp")
            assert isinstance(pending, Pending)
            pending.then(lambda resp, _: heard.append(resp), None)
        await fast.drain(5.0)  # returns once the answer is out
        assert fast.waiting == 0 and addresses(heard[0]) == ["192.0.2.7"]
        loop = asyncio.get_running_loop()
        start = loop.time()
        await slow.drain(0.2)  # upstream never answers: the grace runs out
        assert 0.15 <= loop.time() - start < 1.5 and slow.waiting == 1
        slow.cancel_pending()
        assert heard[1:] == [None] and slow.waiting == 0 and not slow._inflight
        assert rows[-1][3] == b"\x05stuck\x04miss\x04test\x00" and rows[-1][12] == "cancelled at shutdown"
        assert rows[-1][8] is None
    finally:
        fast.upstream.close()
        slow.upstream.close()


def broken_once(real):
    calls = []

    def broken(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(*args)
    return broken


@pytest.mark.parametrize("where", ["sending", "on the reply"])
async def test_a_bug_while_asking_upstream_costs_one_answer_not_the_name(nameserver, monkeypatch, where):
    # A fault injected into one step of the exchange (a bug, whatever it is) must answer the
    # query SERVFAIL and let the name go: no query left waiting, no key left in flight for
    # the next identical queries to join forever.
    ns = nameserver("answer", {"bug.miss.test.": {"A": "192.0.2.8"}})
    rows: list[tuple] = []
    r = resolver_for(ns.port, rows)
    if where == "sending":
        monkeypatch.setattr(wire, "build_query", broken_once(wire.build_query))
    else:
        monkeypatch.setattr(r.upstream_stats, "observe", broken_once(r.upstream_stats.observe))
    try:
        first = r.handle(query("bug.miss.test", 1), CLIENT, "udp")
        first = await settled(first)
        assert dns.message.from_wire(first).rcode() == dns.rcode.SERVFAIL
        assert rows[-1][12] == "internal error" and r.waiting == 0 and not r._inflight
        again = await settled(r.handle(query("bug.miss.test", 2), CLIENT, "udp"))
        assert addresses(again) == ["192.0.2.8"] and r.waiting == 0
    finally:
        r.upstream.close()


def test_a_miss_left_behind_by_a_finished_event_loop_does_not_hold_its_name(nameserver):
    # Tests and scripts may end a loop with a miss under way and no shutdown: the next loop's
    # identical query must not join a resolution that nobody will ever complete.
    silent = nameserver("blackhole")
    rows: list[tuple] = []
    r = resolver_for(silent.port, rows)

    async def ask_and_leave() -> None:
        assert isinstance(r.handle(query("left.miss.test", 1), CLIENT, "udp"), Pending)

    async def ask_again() -> None:
        pending = r.handle(query("left.miss.test", 2), CLIENT, "udp")
        assert isinstance(pending, Pending) and not pending.settled
        assert rows[-1][12] == "cancelled at shutdown" and r.waiting == 1
        r.cancel_pending()
        assert pending.settled and r.waiting == 0 and not r._inflight

    try:
        asyncio.run(ask_and_leave())
        asyncio.run(ask_again())
    finally:
        r.upstream.close()


async def test_an_exchange_cut_off_still_reaches_dnstap_once(nameserver):
    silent = nameserver("blackhole")
    taps: list[tuple] = []
    up = Upstream((("127.0.0.1", silent.port),), 5.0, tap=taps.append)
    q = dns.message.make_query("cut.miss.test", "A").question[0].name.to_wire() + b"\x00\x01\x00\x01"
    task = asyncio.ensure_future(up.query(q, len(q) - 4, 0))
    await async_wait_until(lambda: silent.udp_count, 5, what="the query to reach the nameserver")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5.0)
    assert [(t[0], t[2], t[4]) for t in taps] == [("fwd", "udp", None)]
    up.close()


async def test_a_pending_answer_has_one_consumer(nameserver):
    silent = nameserver("blackhole")
    r = resolver_for(silent.port)
    try:
        pending = r.handle(query("one.miss.test"), CLIENT, "udp")
        pending.then(lambda resp, _: None, None)
        with pytest.raises(RuntimeError):
            pending.then(lambda resp, _: None, None)
    finally:
        r.cancel_pending()
        r.upstream.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_reuse_the_parents_random_bytes():
    outgoing.entropy.take(1)  # the buffer holds bytes not yet handed out
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next bytes, then out without pytest's teardown
        try:
            os.write(write, outgoing.entropy.take(16))
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child != outgoing.entropy.take(16)
