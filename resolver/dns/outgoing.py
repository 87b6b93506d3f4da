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
the question (``match``); anything else is ignored and the query keeps waiting. Each socket
has one reader registered with the loop for its lifetime; one wake-up reads at most ``BURST``
datagram(s), so a flooded socket cannot starve the loop.

The waiting side is a callback object (``Waiter``: ``reply(bytes)``, or ``fail(exc)`` at its
deadline, on an ICMP error or when the pool closes), called from the socket's reader: a cache
miss costs no task, future or timer of its own. ``exchange`` wraps that in a coroutine.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Protocol

HostPort = tuple[str, int]
Match = Callable[[bytes, bytes, bytes, int], bool]

SIZE = 64  # sockets per server (dnsmasq's RANDOM_SOCKS)
# Queries a socket carries, and seconds it lives, before it is replaced by one on a new random
# port. A replacement costs ~22 µs of CPU: 64 uses is ~0.35 µs per miss (256: 0.09, 16: 1.4).
USES = 64
MAX_AGE = 10.0
# Datagrams read per wake-up of one socket. One: the loop's readiness is level-triggered, so a
# datagram left queued brings it back on its next pass, while a second read nearly always finds
# nothing -- a failed recv and a Python exception (~2-3 µs) per reply when it was 64.
BURST = 1
# Deadlines are rounded up to SWEEP_S ticks and kept in one list per tick, swept by one timer
# per pool: a timer per query (call_at + cancel) costs ~5 µs on uvloop, a list append well
# under one, and so does a heap of per-query deadlines once it holds a couple of seconds of
# queries. A query may so wait up to SWEEP_S past its deadline (the default timeout is 2 s).
SWEEP_S = 0.02
_RECV_MAX = 65535
_SOFT_ERRORS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


class Waiter(Protocol):
    """What waits for one reply: exactly one of these is called, once, from the event loop."""

    def reply(self, reply: bytes) -> None: ...

    def fail(self, exc: BaseException) -> None:
        """TimeoutError (deadline), OSError (ICMP error), or CancelledError (the pool closed)."""


class Entropy:
    """os.urandom, drawn 4 KiB at a time: IDs and port choices without a syscall per miss.

    getrandom(2) cost ~1.6 µs a call here, twice per miss. The bytes are the kernel's CSPRNG
    output all the same, kept in memory until used (as arc4random keeps its keystream, which
    unbound draws its IDs and ports from); a forked child starts with an empty buffer so
    parent and child never hand out the same bytes.
    """

    __slots__ = ("buf", "pos")
    CHUNK = 4096

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if end > len(self.buf):
            self.buf = os.urandom(self.CHUNK)
            pos, end = 0, n
        self.pos = end
        return self.buf[pos:end]

    def reset(self) -> None:
        self.buf = b""
        self.pos = 0


entropy = Entropy()
os.register_at_fork(after_in_child=entropy.reset)


def _call(fn: Callable, arg: object) -> None:
    # A waiter's bug must not stop the reader (and the other waiters) it was called from.
    try:
        fn(arg)
    except Exception:
        traceback.print_exc(file=sys.stderr)


class _Port:
    """One connected UDP socket and the queries waiting on it, by ID."""

    __slots__ = ("sock", "fd", "pending", "uses", "born", "retired", "pool", "serial")

    def __init__(self, pool: PortPool, sock: socket.socket, now: float, serial: int) -> None:
        self.pool = pool
        self.sock = sock
        self.fd = sock.fileno()
        self.serial = serial
        # ID (as an int) -> (waiter, question, name length, deadline tick)
        self.pending: dict[int, tuple[Waiter, bytes, int, int]] = {}
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
                waiting = list(pending.values())
                pending.clear()
                if exc.errno not in _SOFT_ERRORS:
                    pool.drop(self)
                else:
                    self.release()
                for waiter, _q, _n, _t in waiting:
                    _call(waiter.fail, OSError(exc.errno, exc.strerror))
                if self.fd < 0:
                    return
                continue
            if n < 12 or not pending:
                continue
            qid = (buf[0] << 8) | buf[1]
            waiting = pending.get(qid)
            if waiting is None:
                continue
            waiter, question, name_len, _tick = waiting
            reply = bytes(view[:n])
            if not match(reply, reply[:2], question, name_len):
                continue
            del pending[qid]
            self.release()
            _call(waiter.reply, reply)
            if self.fd < 0:  # closed: retired above, or by what the waiter did
                return

    def settle(self, qid: int, waiter: Waiter) -> bool:
        """Forget ``waiter``'s query (answered elsewhere, timed out, cancelled); False if gone."""
        waiting = self.pending.get(qid)
        if waiting is None or waiting[0] is not waiter:
            return False
        del self.pending[qid]
        self.release()
        return True

    def release(self) -> None:
        """A retired socket closes once no query waits on it."""
        if self.retired and not self.pending:
            self.close()

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
        self.pool.live.pop(self.serial, None)


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
        # tick -> the queries due in it, as ints (socket serial << 16 | ID): an entry per query
        # that lives until its deadline must not keep the waiter (or anything the garbage
        # collector tracks) alive that long -- holding the waiters cost ~5% of a miss in GC.
        self._due: dict[int, list[int]] = {}
        self.live: dict[int, _Port] = {}  # serial -> open socket
        self._serial = 0
        self._ticks: list[int] = []  # heap of the keys of _due
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_tick = 0
        # One receive buffer for every socket of the pool: a reader runs to completion before
        # the next one, and each reply is copied out of it.
        self.buf = bytearray(_RECV_MAX)
        self.view = memoryview(self.buf)

    def send(self, packet: bytes, question: bytes, name_len: int, deadline: float, waiter: Waiter,
             loop: asyncio.AbstractEventLoop) -> _Port:
        """Send ``packet`` (its first two bytes are the ID); ``waiter`` hears of the matching
        reply, or fails at ``deadline`` (loop time). Raises OSError when it cannot be sent
        (nothing is registered then). Returns the socket it waits on (``settle`` there forgets it)."""
        if self.closed:
            raise OSError(errno.EBADF, "upstream socket pool is closed")
        if loop is not self.loop:
            self._close_ports()  # a new event loop (tests): sockets registered with the old one are useless
            self.loop = loop
        qid = (packet[0] << 8) | packet[1]
        port = self._pick(qid, loop.time())
        try:
            port.sock.send(packet)
        except OSError:
            port.release()
            raise
        tick = int(deadline / SWEEP_S) + 1
        port.pending[qid] = (waiter, question, name_len, tick)
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = []
            heapq.heappush(self._ticks, tick)
            if self._sweeper is None or tick < self._sweep_tick:
                self._arm(loop, tick)
        due.append((port.serial << 16) | qid)
        return port

    async def exchange(self, packet: bytes, question: bytes, name_len: int, deadline: float) -> bytes:
        """``send`` as a coroutine: the reply, TimeoutError at ``deadline``, OSError once the
        pool is closed; cancelling the wait forgets the query."""
        loop = asyncio.get_running_loop()
        waiter = _FutureWaiter(loop.create_future())
        port = self.send(packet, question, name_len, deadline, waiter, loop)
        try:
            return await waiter.fut
        finally:
            port.settle((packet[0] << 8) | packet[1], waiter)

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
        ticks, due, live = self._ticks, self._due, self.live
        while ticks and ticks[0] * SWEEP_S <= now + 0.001:  # timers may fire a hair early
            tick = heapq.heappop(ticks)
            for key in due.pop(tick):
                port = live.get(key >> 16)
                if port is None:
                    continue  # closed: its queries were failed then
                qid = key & 0xFFFF
                waiting = port.pending.get(qid)
                # Answered and cancelled queries just leave here. The same ID on the same
                # socket again is another query -- unless due in this very tick.
                if waiting is not None and waiting[3] == tick:
                    port.settle(qid, waiting[0])
                    _call(waiting[0].fail, TimeoutError())
        if ticks:
            self._arm(loop, ticks[0])

    def _pick(self, qid: int, now: float) -> _Port:
        if self.retiring:
            return self._one_off(now)
        ports = self.ports
        rnd = entropy.take(8)
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
        self._serial += 1
        port = self.live[self._serial] = _Port(self, sock, now, self._serial)
        assert self.loop is not None
        self.loop.add_reader(port.fd, port.readable)
        self.opened += 1
        return port

    def _retire(self, port: _Port) -> None:
        port.retired = True
        port.release()

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
        waiting = []
        for port in list(self.live.values()):  # also the retired ones with queries left
            waiting += port.pending.values()
            port.pending.clear()
            port.close()
        self.ports = [None] * self.size
        for waiter, _q, _n, _t in waiting:
            _call(waiter.fail, asyncio.CancelledError())

    def source_ports(self) -> list[int]:
        return [p.sock.getsockname()[1] for p in self.ports if p is not None]

    def __del__(self) -> None:
        # Sockets must not outlive the pool unclosed (ResourceWarning); the loop may be gone.
        for port in list(getattr(self, "live", {}).values()):
            port.close()


class _FutureWaiter:
    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future) -> None:
        self.fut = fut

    def reply(self, reply: bytes) -> None:
        if not self.fut.done():
            self.fut.set_result(reply)

    def fail(self, exc: BaseException) -> None:
        if self.fut.done():
            return
        if isinstance(exc, asyncio.CancelledError):
            self.fut.cancel()
        else:
            self.fut.set_exception(exc)
