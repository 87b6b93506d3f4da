"""The outgoing socket pool against a real UDP responder on loopback: random, moving source
ports; replies matched by ID *and* question on shared sockets; sockets closed when retired."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import Iterator

import dns.message
import dns.rrset
import pytest

from resolver.dns import outgoing, wire
from resolver.dns.outgoing import PortPool
from resolver.dns.upstream import Upstream, _matches


class Responder:
    """Answers every A query with 192.0.2.<n>; records the source port of each query.

    ``decoy`` first sends a reply with the right ID and the wrong question (a spoof that
    guessed the ID and the port), then the real one.
    """

    def __init__(self, decoy: bool = False, host: str = "127.0.0.1", junk: bool = False) -> None:
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        # A burst of hundreds of queries must not overflow the responder's buffer (UDP drops).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.decoy = decoy
        self.junk = junk
        self.forged = 0  # junk datagrams sent
        self.sources: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            self.sources.append(addr[1])
            q = dns.message.from_wire(data)
            if self.decoy:
                other = dns.message.make_query("decoy.out.test.", "A")
                other.id = q.id
                fake = dns.message.make_response(other)
                fake.answer.append(dns.rrset.from_text("decoy.out.test.", 60, "IN", "A", "203.0.113.66"))
                self.sock.sendto(fake.to_wire(), addr)
            r = dns.message.make_response(q)
            n = int(q.question[0].name.labels[0][1:]) % 250 + 1
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", f"192.0.2.{n}"))
            if self.junk:
                self._send_junk(q, addr)
            self.sock.sendto(r.to_wire(), addr)

    def _send_junk(self, q: dns.message.Message, addr: tuple) -> None:
        """Before the real answer: forgeries an attacker who knows the port could send."""
        def forged(qid: int, name: str) -> bytes:
            m = dns.message.make_query(name, "A")
            m.id = qid
            f = dns.message.make_response(m)
            f.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "203.0.113.66"))
            return f.to_wire()

        name = q.question[0].name.to_text()
        perfect = forged(q.id, name)  # right ID and question: only the source address is wrong
        for wrong in (forged(q.id ^ 0x5A5A, name), forged(q.id, "other.out.test."), perfect[:11],
                      b"\x00" * 700):
            self.sock.sendto(wrong, addr)
            self.forged += 1
        # The perfect forgery from the server's address but another port, and (IPv4) from
        # another loopback address with the server's port.
        elsewhere = [(self.sock.getsockname()[0], 0)]
        if self.family == socket.AF_INET:
            elsewhere.append(("127.0.0.2", self.port))
        for src in elsewhere:
            with socket.socket(self.family, socket.SOCK_DGRAM) as s:
                s.bind(src)
                s.sendto(perfect, addr)
                self.forged += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def responder() -> Iterator[Responder]:
    r = Responder()
    yield r
    r.close()


def question(i: int) -> tuple[bytes, int]:
    name = dns.name.from_text(f"q{i}.out.test.").to_wire()
    return name + struct.pack(">HH", 1, 1), len(name)


def answer_of(reply: bytes) -> str:
    return dns.message.from_wire(reply).answer[0][0].address


async def ask(pool: PortPool, i: int, qid: bytes | None = None) -> bytes:
    q, n = question(i)
    packet = wire.build_query(qid or os.urandom(2), q, 0)
    return await pool.exchange(packet, q, n, asyncio.get_running_loop().time() + 3)


async def test_queries_go_out_on_many_ports_that_keep_changing(responder):
    pool = PortPool(("127.0.0.1", responder.port), _matches, size=8, uses=4)
    try:
        for i in range(64):
            assert answer_of(await ask(pool, i)) == f"192.0.2.{i % 250 + 1}"
        # 64 queries, 4 per socket: at least 16 sockets, each on its own random port.
        assert pool.opened >= 16
        assert len(set(responder.sources)) >= 12
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low, high = (int(x) for x in fh.read().split())
        assert all(low <= p <= high for p in responder.sources)
        # Never one fixed port, and not a run of consecutive ports either.
        ports = sorted(set(responder.sources))
        assert sum(1 for a, b in zip(ports, ports[1:], strict=False) if b - a == 1) < len(ports) // 2
    finally:
        pool.close()


async def test_concurrent_queries_on_shared_sockets_each_get_their_own_answer(responder):
    pool = PortPool(("127.0.0.1", responder.port), _matches, size=4, uses=1000)
    # 300 distinct IDs: with random ones, two alike (likely among 300) whose second draws the
    # first one's socket at all four picks (1 in 256) rightly gets a one-off fifth socket.
    base = int.from_bytes(os.urandom(2), "big")
    try:
        replies = await asyncio.gather(*(ask(pool, i, ((base + i) & 0xFFFF).to_bytes(2, "big"))
                                         for i in range(300)))
        assert [answer_of(r) for r in replies] == [f"192.0.2.{i % 250 + 1}" for i in range(300)]
        assert pool.opened == 4
    finally:
        pool.close()


async def test_a_reply_with_our_id_but_another_question_is_ignored():
    r = Responder(decoy=True)
    pool = PortPool(("127.0.0.1", r.port), _matches, size=2)
    try:
        for i in range(20):
            assert answer_of(await ask(pool, i)) == f"192.0.2.{i % 250 + 1}"
    finally:
        pool.close()
        r.close()


async def test_a_silent_server_times_out_at_the_deadline_and_forgets_the_query():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    pool = PortPool(silent.getsockname(), _matches, size=2)
    try:
        q, n = question(1)
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await pool.exchange(wire.build_query(b"\x12\x34", q, 0), q, n, loop.time() + 0.2)
        assert all(not p.pending for p in pool.ports if p is not None)
    finally:
        pool.close()
        silent.close()


async def test_retired_sockets_close_once_their_queries_are_done(responder):
    up = Upstream((("127.0.0.1", responder.port),), 2.0)
    pool = up.pools[("127.0.0.1", responder.port)]
    await ask(pool, 1)
    pending = asyncio.ensure_future(ask(pool, 2))
    await asyncio.sleep(0)  # the query is sent and waiting
    socks = [p.sock for p in pool.ports if p is not None]
    assert socks and any(p.pending for p in pool.ports if p is not None)
    up.retire()
    assert all(p is None for p in pool.ports)
    assert answer_of(await pending) == "192.0.2.3"
    assert all(s.fileno() == -1 for s in socks)
    # A query still failing over to this retired pool gets a one-off socket, closed after it.
    await ask(pool, 3)
    assert pool.opened == len(socks) + 1
    assert all(p is None for p in pool.ports)
    up.close()


async def test_reload_keeps_the_pool_when_the_servers_are_the_same(responder):
    from resolver.dns.chain import Resolver
    from resolver.policy.config import parse_config

    text = f'[upstream]\nservers = ["127.0.0.1:{responder.port}"]\n[allow]\ndomains = ["*.out.test"]\n'
    res = Resolver(parse_config(text))
    first = res.upstream
    res.use(parse_config(text))
    assert res.upstream is first
    other = Responder()
    try:
        res.use(parse_config(text.replace(str(responder.port), str(other.port))))
        assert res.upstream is not first
        assert all(p is None for pool in first.pools.values() for p in pool.ports)
    finally:
        res.upstream.close()
        other.close()


async def test_two_queries_with_the_same_id_on_one_socket_do_not_collide(responder):
    pool = PortPool(("127.0.0.1", responder.port), _matches, size=1)
    try:
        loop = asyncio.get_running_loop()
        (q1, n1), (q2, n2) = question(1), question(2)
        same_id = b"\x77\x77"
        both = await asyncio.gather(
            pool.exchange(wire.build_query(same_id, q1, 0), q1, n1, loop.time() + 3),
            pool.exchange(wire.build_query(same_id, q2, 0), q2, n2, loop.time() + 3))
        assert [answer_of(r) for r in both] == ["192.0.2.2", "192.0.2.3"]
        # The second went out on a one-off socket, closed once answered.
        assert pool.opened == 2 and sum(p is not None for p in pool.ports) == 1
    finally:
        pool.close()


async def test_forgeries_are_ignored_and_the_real_answer_accepted():
    """Wrong ID, wrong question, short and junk datagrams from the server, and a perfect
    forgery from another port and another address, all arrive before the real answer."""
    r = Responder(junk=True)
    pool = PortPool(("127.0.0.1", r.port), _matches, size=2)
    try:
        for i in range(10):
            assert answer_of(await ask(pool, i)) == f"192.0.2.{i % 250 + 1}"
        assert r.forged == 60
    finally:
        pool.close()
        r.close()


async def test_an_ipv6_upstream():
    r = Responder(host="::1", junk=True)
    pool = PortPool(("::1", r.port), _matches, size=4)
    try:
        replies = await asyncio.gather(*(ask(pool, i) for i in range(20)))
        assert [answer_of(x) for x in replies] == [f"192.0.2.{i % 250 + 1}" for i in range(20)]
        assert all(p.sock.family == socket.AF_INET6 for p in pool.ports if p is not None)
    finally:
        pool.close()
        r.close()


async def test_port_unreachable_fails_every_query_waiting_on_that_socket():
    gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gone.bind(("127.0.0.1", 0))
    server = gone.getsockname()
    gone.close()  # nothing listens there now: the kernel answers ICMP port unreachable
    pool = PortPool(server, _matches, size=1)
    try:
        loop = asyncio.get_running_loop()
        far = loop.time() + 30  # a refusal must end the waits long before this
        qs = [question(i) for i in range(5)]
        results = await asyncio.gather(
            *(pool.exchange(wire.build_query(bytes([0, i]), q, 0), q, n, far) for i, (q, n) in enumerate(qs)),
            return_exceptions=True)
        assert all(isinstance(x, ConnectionRefusedError) for x in results), results
        assert loop.time() < far - 20
        # The socket survives a refusal (the server may come back) and holds no stale waits.
        port = pool.ports[0]
        assert port is not None and not port.pending and port.fd >= 0
    finally:
        pool.close()


async def test_exchange_after_close_fails_cleanly_and_opens_nothing(responder):
    pool = PortPool(("127.0.0.1", responder.port), _matches, size=4)
    await ask(pool, 1)
    opened = pool.opened
    socks = [p.sock for p in pool.ports if p is not None]
    pool.close()
    assert all(s.fileno() == -1 for s in socks)
    with pytest.raises(OSError):
        await ask(pool, 2)
    assert pool.opened == opened and all(p is None for p in pool.ports)


async def test_close_unregisters_the_reader_before_the_descriptor_goes(responder):
    pool = PortPool(("127.0.0.1", responder.port), _matches, size=2)
    await ask(pool, 1)
    loop = asyncio.get_running_loop()
    fds = [p.fd for p in pool.ports if p is not None]
    pool.close()
    # A registered reader on a closed fd would make this raise or leak; remove_reader of an
    # fd not registered returns False.
    assert fds and not any(loop.remove_reader(fd) for fd in fds)


async def test_a_flooded_socket_yields_to_the_loop(responder):
    """A burst of junk on one socket is read at most BURST datagrams per wake-up, and the
    answer still comes through behind it."""
    pool = PortPool(("127.0.0.1", responder.port), _matches, size=1)
    try:
        await ask(pool, 1)
        port = pool.ports[0]
        assert port is not None
        # The junk comes from the server's own address and port (a connected socket accepts
        # nothing else): the responder's socket sends it. Sent and read without yielding to
        # the loop, so the one readable() call below is the only reader.
        dest = ("127.0.0.1", port.sock.getsockname()[1])
        for _ in range(outgoing.BURST + 10):
            responder.sock.sendto(b"\xff" * 40, dest)
        port.readable()
        left = 0
        while True:
            try:
                port.sock.recv(100, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            left += 1
        assert left == 10
        assert answer_of(await ask(pool, 2)) == "192.0.2.3"
    finally:
        pool.close()


async def test_deadlines_of_many_queries_fire_and_leave_nothing_behind():
    """One sweeper serves every query's deadline: each silent query times out near its own
    deadline, answered and cancelled ones leave the heap, and the sweeper stops when idle."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    pool = PortPool(silent.getsockname(), _matches, size=4)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        qs = [question(i) for i in range(30)]
        waits = [pool.exchange(wire.build_query(os.urandom(2), q, 0), q, n, start + 0.1 + (i % 3) * 0.1)
                 for i, (q, n) in enumerate(qs)]
        tasks = [asyncio.ensure_future(w) for w in waits]
        await asyncio.sleep(0)
        tasks[0].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert all(isinstance(r, TimeoutError) for r in results[1:])
        assert loop.time() - start < 2.0
        assert all(not p.pending for p in pool.ports if p is not None)
        # The sweep that expired the last query emptied the heap and did not re-arm.
        assert not pool._due and not pool._ticks and pool._sweeper is None
    finally:
        pool.close()
        silent.close()


def test_the_answers_json_is_what_json_dumps_writes():
    import json

    from resolver.dns.clean import _json
    for items in (["192.0.2.1"], ["a.example", "2001:db8::1"], ['we"ird\\name', "caf\u00e9", "\x01"]):
        assert _json(items) == json.dumps(items, separators=(",", ":"))
