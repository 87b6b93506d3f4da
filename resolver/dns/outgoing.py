"""Outgoing UDP to one upstream server through a pool of sockets on random, moving ports.

A fresh socket per query gives every query its own random source port, but opening,
connecting, registering and closing a socket (~22 µs here) costs a large share of a cache
miss. The pool keeps source ports unpredictable in the way dnsmasq does it (a set of
sockets on random ports, each query sent on one drawn at random) and moves the set the
way unbound's per-query port choice does over time: ``SIZE`` sockets, each bound to port 0
so the kernel picks a random free port in its ephemeral range (honouring
``ip_local_reserved_ports``), each connected to the server (the kernel drops datagrams
from any other address or port), each query sent on a socket drawn with ``os.urandom``.
A socket is replaced by one on a new random port after ``USES`` queries or ``MAX_AGE``
seconds, so the ports in use keep moving; with the random 16-bit ID an off-path attacker
must guess the ID, which of ``SIZE`` ports, and when, for a set that changes every few
dozen queries per socket. (unbound draws a new random port from ``outgoing-range`` for
every query; dnsmasq keeps up to 64 random-port sockets and reuses each while it has
queries outstanding. Per query, the pool costs one ``send`` and one ``recv``.)

A reply is handed to the query waiting on that socket under that ID only if it also echoes
the question (``match``); anything else is ignored and the query keeps waiting (the caller
owns the deadline). Each socket has one reader registered with the loop for its lifetime;
one wake-up reads at most ``BURST`` datagrams so a flooded socket cannot starve the loop.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import os
import socket
from collections.abc import Callable

HostPort = tuple[str, int]
Match = Callable[[bytes, bytes, bytes, int], bool]

SIZE = 64  # sockets per server (dnsmasq's RANDOM_SOCKS)
# Queries a socket carries, and seconds it lives, before it is replaced by one on a new random
# port. A replacement costs ~22 µs of CPU: 64 uses is ~0.35 µs per miss (256: 0.09, 16: 1.4).
USES = 64
MAX_AGE = 10.0
BURST = 64  # datagrams read per wake-up of one socket; the rest wait for the next loop pass
# Deadlines are rounded up to SWEEP_S ticks and kept in one list per tick, swept by one timer
# per pool: a timer per query (call_at + cancel) costs ~5 µs on uvloop, a list append well
# under one, and so does a heap of per-query deadlines once it holds a couple of seconds of
# queries. A query may so wait up to SWEEP_S past its deadline (the default timeout is 2 s).
SWEEP_S = 0.02
_RECV_MAX = 65535
_SOFT_ERRORS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


class _Port:
    """One connected UDP socket and the queries waiting on it, by ID."""

    __slots__ = ("sock", "fd", "pending", "uses", "born", "retired", "pool")

    def __init__(self, pool: PortPool, sock: socket.socket, now: float) -> None:
        self.pool = pool
        self.sock = sock
        self.fd = sock.fileno()
        self.pending: dict[bytes, tuple[asyncio.Future, bytes, int]] = {}
        self.uses = 0
        self.born = now
        self.retired = False

    def readable(self) -> None:
        pool = self.pool
        sock, pending, buf, view, match = self.sock, self.pending, pool.buf, pool.view, pool.match
        for _ in range(BURST):
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # An ICMP error on a connected socket (port unreachable, ...): it cannot say
                # which query it was for, and it means this server is not answering here, so
                # every query waiting on this socket moves on to the next server.
                for fut, _q, _n in list(pending.values()):
                    if not fut.done():
                        fut.set_exception(OSError(exc.errno, exc.strerror))
                pending.clear()
                if exc.errno not in _SOFT_ERRORS:
                    pool.drop(self)
                    return
                continue
            if n < 12 or not pending:
                continue
            waiter = pending.get(bytes(view[:2]))
            if waiter is None:
                continue
            fut, question, name_len = waiter
            reply = bytes(view[:n])
            if match(reply, reply[:2], question, name_len) and not fut.done():
                fut.set_result(reply)

    def close(self) -> None:
        # The reader goes before the descriptor: a closed fd number is reused by the next
        # socket, and a stale registration would then read someone else's datagrams.
        loop = self.pool.loop
        if loop is not None and not loop.is_closed() and self.fd >= 0:
            try:
                loop.remove_reader(self.fd)
            except (ValueError, OSError, RuntimeError):
                pass
        self.fd = -1
        self.sock.close()


class PortPool:
    """Random-port UDP sockets to one server, created on first use in the running loop."""

    def __init__(self, server: HostPort, match: Match, size: int = SIZE, uses: int = USES,
                 max_age: float = MAX_AGE) -> None:
        self.server = server
        self.match = match
        self.size, self.max_uses, self.max_age = size, uses, max_age
        self.family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.ports: list[_Port | None] = [None] * size
        self.loop: asyncio.AbstractEventLoop | None = None
        self.retiring = False  # replaced by another pool: queries still failing over use one-off sockets
        self.closed = False
        self.opened = 0  # sockets opened over the pool's life (tests and the bench read it)
        self._due: dict[int, list[asyncio.Future]] = {}  # tick -> queries whose deadline falls in it
        self._ticks: list[int] = []  # heap of the keys of _due
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_tick = 0
        # One receive buffer for every socket of the pool: a reader runs to completion before
        # the next one, and each reply is copied out of it.
        self.buf = bytearray(_RECV_MAX)
        self.view = memoryview(self.buf)

    async def exchange(self, packet: bytes, question: bytes, name_len: int, deadline: float) -> bytes:
        """Send ``packet`` (its first two bytes are the ID) and wait for the matching reply.

        Raises TimeoutError at ``deadline`` (loop time), OSError once the pool is closed;
        cancelling the wait forgets the query.
        """
        if self.closed:
            raise OSError(errno.EBADF, "upstream socket pool is closed")
        loop = asyncio.get_running_loop()
        if loop is not self.loop:
            self._close_ports()  # a new event loop (tests): sockets registered with the old one are useless
            self.loop = loop
        qid = packet[:2]
        port = self._pick(qid, loop.time())
        fut = loop.create_future()
        port.pending[qid] = (fut, question, name_len)
        tick = int(deadline / SWEEP_S) + 1
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = []
            heapq.heappush(self._ticks, tick)
            if self._sweeper is None or tick < self._sweep_tick:
                self._arm(loop, tick)
        due.append(fut)
        try:
            port.sock.send(packet)
            return await fut
        finally:
            if port.pending.get(qid, (None,))[0] is fut:
                del port.pending[qid]
            if port.retired and not port.pending:
                port.close()

    def _arm(self, loop: asyncio.AbstractEventLoop, tick: int) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweep_tick = tick
        self._sweeper = loop.call_at(tick * SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = self.loop
        if loop is None or self.closed:
            return
        now = loop.time()
        ticks, due = self._ticks, self._due
        while ticks and ticks[0] * SWEEP_S <= now + 0.001:  # timers may fire a hair early
            for fut in due.pop(heapq.heappop(ticks)):
                if not fut.done():  # answered and cancelled queries just leave here
                    fut.set_exception(TimeoutError())
        if ticks:
            self._arm(loop, ticks[0])

    def _pick(self, qid: bytes, now: float) -> _Port:
        if self.retiring:
            return self._one_off(now)
        ports = self.ports
        rnd = os.urandom(8)
        for k in range(0, 8, 2):
            i = ((rnd[k] << 8) | rnd[k + 1]) % self.size
            port = ports[i]
            if port is None or port.uses >= self.max_uses or now - port.born > self.max_age:
                if port is not None:
                    self._retire(port)
                port = ports[i] = self._open(now)
            if qid not in port.pending:
                port.uses += 1
                return port
        # Four sockets already waiting on this ID: astronomically unlikely unless something
        # floods one server with queries; a fresh socket always has room.
        return self._one_off(now)

    def _one_off(self, now: float) -> _Port:
        port = self._open(now)
        port.retired = True  # not in the rotation: closes as soon as its one query is done
        port.uses = 1
        return port

    def _open(self, now: float) -> _Port:
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # Port 0: the kernel draws a random free port from ip_local_port_range, skipping
            # ip_local_reserved_ports -- no guessing, no EADDRINUSE retries.
            sock.bind(("::" if self.family == socket.AF_INET6 else "0.0.0.0", 0))
            sock.connect(self.server)
        except OSError:
            sock.close()
            raise
        port = _Port(self, sock, now)
        assert self.loop is not None
        self.loop.add_reader(port.fd, port.readable)
        self.opened += 1
        return port

    def _retire(self, port: _Port) -> None:
        port.retired = True
        if not port.pending:
            port.close()

    def drop(self, port: _Port) -> None:
        for i, p in enumerate(self.ports):
            if p is port:
                self.ports[i] = None
        port.close()

    def retire(self) -> None:
        """Stop using these sockets; each closes once the queries waiting on it are done."""
        self.retiring = True
        for i, port in enumerate(self.ports):
            if port is not None:
                self._retire(port)
                self.ports[i] = None

    def close(self) -> None:
        """Close every socket now (waiting queries are cancelled); later exchanges fail."""
        self.closed = True
        self._close_ports()

    def _close_ports(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._due.clear()
        self._ticks.clear()
        for i, port in enumerate(self.ports):
            if port is not None:
                for fut, _q, _n in port.pending.values():
                    if not fut.done():
                        fut.cancel()
                port.close()
                self.ports[i] = None

    def source_ports(self) -> list[int]:
        return [p.sock.getsockname()[1] for p in self.ports if p is not None]

    def __del__(self) -> None:
        # Sockets must not outlive the pool unclosed (ResourceWarning); the loop may be gone.
        for port in self.ports:
            if port is not None and port.fd >= 0:
                port.close()
