"""Upstream exchanges in-process (pytest-asyncio) against real test nameservers on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

import dns.message
import dns.name
import dns.rrset
import pytest
from helpers import async_wait_until, frame, recv_frame
from nameserver import POISON_ADDRESS, big_a_rrset_records

from resolver.core.errors import UpstreamError
from resolver.dns import wire
from resolver.dns.clean import Cleaner
from resolver.dns.tcpconn import TcpUpstream
from resolver.dns.upstream import Upstream, _matches

RECORDS = {"www.up.test.": {"A": "192.0.2.10"}}


def question(name: str, rdtype: int = 1) -> tuple[bytes, int]:
    n = dns.name.from_text(name).to_wire().lower()
    return n + struct.pack(">HH", rdtype, 1), len(n)


def addresses(reply: bytes) -> list[str]:
    answer = dns.message.from_wire(reply).answer
    return sorted(rd.address for rr in answer if rr.rdtype in (1, 28) for rd in rr)


async def test_answer_comes_back_with_our_fresh_id(nameserver):
    ns = nameserver("answer", RECORDS)
    q, n = question("www.up.test.")
    up = Upstream((("127.0.0.1", ns.port),), 2.0)
    reply = await up.query(q, n, 0)
    assert addresses(reply) == ["192.0.2.10"]
    assert ns.udp_count == 1


async def test_spoofed_reply_with_wrong_id_is_ignored(nameserver):
    ns = nameserver("wrong_id", RECORDS)
    q, n = question("www.up.test.")
    reply = await Upstream((("127.0.0.1", ns.port),), 2.0).query(q, n, 0)
    assert POISON_ADDRESS not in addresses(reply)
    assert addresses(reply) == ["192.0.2.10"]


async def test_truncated_udp_reply_is_retried_over_tcp(nameserver):
    ns = nameserver("truncate", big_a_rrset_records("big.up.test.", 300))
    q, n = question("big.up.test.")
    up = Upstream((("127.0.0.1", ns.port),), 2.0)
    try:
        reply = await up.query(q, n, 0)
        assert len(addresses(reply)) == 300
        assert (ns.udp_count, ns.tcp_count) == (1, 1)
    finally:
        up.close()


async def test_tc_retries_are_pipelined_on_one_reused_connection(nameserver):
    ns = nameserver("truncate", {**big_a_rrset_records("a.up.test.", 300),
                                 **big_a_rrset_records("b.up.test.", 200)})
    server = ("127.0.0.1", ns.port)
    up = Upstream((server,), 5.0)
    try:
        names = ["a.up.test.", "b.up.test.", "a.up.test.", "b.up.test."]
        replies = await asyncio.gather(*(up.query(*question(name), 0) for name in names))
        assert [len(addresses(r)) for r in replies] == [300, 200, 300, 200]
        again = await up.query(*question("a.up.test."), 0)  # later: the same connection still
        assert len(addresses(again)) == 300
        assert (ns.udp_count, ns.tcp_count, ns.tcp_connections) == (5, 5, 1)
        assert up.tcp[server].opened == 1
    finally:
        up.close()


async def test_an_idle_tcp_connection_is_closed_and_the_next_retry_opens_another(nameserver):
    ns = nameserver("truncate", big_a_rrset_records("big.up.test.", 300))
    server = ("127.0.0.1", ns.port)
    up = Upstream((server,), 5.0)
    up.tcp[server].idle_s = 0.05
    try:
        assert len(addresses(await up.query(*question("big.up.test."), 0))) == 300
        # Closed by us after idle_s with nothing waiting.
        await async_wait_until(lambda: up.tcp[server].conn is None, 5, what="the idle connection to close")
        assert len(addresses(await up.query(*question("big.up.test."), 0))) == 300
        assert ns.tcp_connections == 2 and up.tcp[server].opened == 2
    finally:
        up.close()


class ClosingTcpServer:
    """A TCP DNS server that answers ``answers`` queries on its first connection and then
    closes it when the next query arrives (a server timing out a connection just as a query
    left); every later connection answers everything."""

    def __init__(self, answers: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(5.0)
        self.port = self.sock.getsockname()[1]
        self.answers = answers
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for conn_no in range(3):  # bounded: a test needs two at most
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(5.0)
                served = 0
                while True:
                    try:
                        query = dns.message.from_wire(recv_frame(conn, 5.0))
                    except (OSError, EOFError):  # TimeoutError is an OSError
                        break
                    if conn_no == 0 and served == self.answers:
                        break  # closes without answering
                    reply = dns.message.make_response(query)
                    name = query.question[0].name
                    reply.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.77"))
                    conn.sendall(frame(reply.to_wire()))
                    served += 1

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize("answers", [1, 0])
async def test_a_query_on_a_connection_the_server_closed_is_asked_again_only_if_it_had_served(answers):
    srv = ClosingTcpServer(answers)
    tcp = TcpUpstream(("127.0.0.1", srv.port), _matches)
    try:
        for i in range(answers):
            q, n = question(f"first{i}.up.test.")
            first = tcp.exchange(wire.build_query(b"\x00\x01", q, 0), q, n)
            assert addresses(await asyncio.wait_for(first, 5)) == ["192.0.2.77"]
        q, n = question("second.up.test.")
        ask = tcp.exchange(wire.build_query(b"\x00\x02", q, 0), q, n)
        if answers:  # a connection that had served: the query goes again on a fresh one
            assert addresses(await asyncio.wait_for(ask, 5)) == ["192.0.2.77"]
            assert (srv.connections, tcp.opened) == (2, 2)
        else:  # closed before it ever answered: that is this server failing, no second try
            with pytest.raises(OSError):
                await asyncio.wait_for(ask, 5)
            assert (srv.connections, tcp.opened) == (1, 1)
    finally:
        tcp.close()
        srv.close()


async def test_failover_after_servfail_and_after_silence(nameserver):
    bad = nameserver("servfail")
    silent = nameserver("blackhole")
    good = nameserver("answer", RECORDS)
    q, n = question("www.up.test.")
    up = Upstream((("127.0.0.1", bad.port), ("127.0.0.1", silent.port), ("127.0.0.1", good.port)), 1.5)
    reply = await up.query(q, n, 0)
    assert addresses(reply) == ["192.0.2.10"]
    assert bad.udp_count == 1 and silent.udp_count == 1 and good.udp_count == 1


async def test_dead_upstream_fails_within_the_timeout(nameserver):
    silent = nameserver("blackhole")
    q, n = question("www.up.test.")
    up = Upstream((("127.0.0.1", silent.port),), 0.3)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(UpstreamError, match="timeout"):
        await up.query(q, n, 0)
    assert loop.time() - start < 1.0


async def test_refused_port_moves_on_without_waiting(nameserver):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    good = nameserver("answer", RECORDS)
    q, n = question("www.up.test.")
    up = Upstream((("127.0.0.1", closed_port), ("127.0.0.1", good.port)), 5.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    reply = await up.query(q, n, 0)
    assert addresses(reply) == ["192.0.2.10"]
    assert loop.time() - start < 2.5  # did not spend its 2.5 s share on the dead port


async def test_poison_is_cleaned_before_caching(nameserver):
    ns = nameserver("poison", RECORDS)
    q, n = question("www.up.test.")
    reply = await Upstream((("127.0.0.1", ns.port),), 2.0).query(q, n, 0)
    cleaned = Cleaner().clean(reply, q, n)
    assert cleaned.addrs == (("192.0.2.10", 300),)
    assert cleaned.ar == 0 and cleaned.dropped >= 2
    header = struct.pack(">HHHHHH", 0, 0x8180, 1, cleaned.an, cleaned.ns, 0)
    assert POISON_ADDRESS not in str(dns.message.from_wire(header + q + cleaned.body))


def test_build_query_is_fresh_and_minimal():
    q, _ = question("www.up.test.")
    packet = wire.build_query(b"\xab\xcd", q, 0x80)
    m = dns.message.from_wire(packet)
    assert m.id == 0xABCD and m.flags & dns.flags.RD and m.edns == 0 and m.ednsflags & dns.flags.DO
    assert m.payload == wire.EDNS_PAYLOAD and not m.options


async def test_two_tc_retries_under_one_id_both_get_their_own_answer(nameserver):
    # The reused connection matches answers by ID: a second query under an ID already waiting
    # there goes on a connection of its own (TcpUpstream._one_shot) instead of colliding.
    ns = nameserver("truncate", {**big_a_rrset_records("a.up.test.", 300),
                                 **big_a_rrset_records("b.up.test.", 200)})
    tcp = TcpUpstream(("127.0.0.1", ns.port), _matches)
    try:
        (qa, na), (qb, nb) = question("a.up.test."), question("b.up.test.")
        same = b"\x12\x34"
        replies = await asyncio.wait_for(asyncio.gather(
            tcp.exchange(wire.build_query(same, qa, 0), qa, na),
            tcp.exchange(wire.build_query(same, qb, 0), qb, nb)), 5)
        assert [len(addresses(r)) for r in replies] == [300, 200]
        assert ns.tcp_connections == 2 and tcp.opened == 1  # the one-off is not the kept one
    finally:
        tcp.close()
