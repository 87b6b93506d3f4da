"""Outgoing UDP to one upstream server through a pool of long-lived sockets on random ports.

A fresh socket per query gives every query its own random source port, but opening,
connecting, registering and closing a socket costs more than the rest of a cache miss. This
pool keeps that property in the form unbound (``outgoing-range``) and dnsmasq (its random
port pool) use: ``SIZE`` sockets, each bound to a port drawn from ``os.urandom`` within the
kernel's ephemeral range and connected to the server (the kernel drops datagrams from anyone
else), and each query goes out on a socket drawn at random. A socket is retired after
``USES`` queries or ``MAX_AGE`` seconds and replaced by one on a new random port, so the set
of ports an off-path attacker would have to guess keeps moving; together with the random
16-bit ID that is ~22 bits per query to guess at any moment, for a port set that changes
every few hundred queries.

A reply is handed to the query waiting on that socket under that ID only if it also echoes
the question (``match``); anything else is ignored and the query keeps waiting (the caller
owns the deadline). Each socket has one reader registered with the loop for its lifetime, so
a query costs one ``send`` and one ``recv``: no socket, connect, register or close per query.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable

HostPort = tuple[str, int]
Match = Callable[[bytes, bytes, bytes, int], bool]

SIZE = 64  # sockets per server (dnsmasq's RANDOM_SOCKS)
USES = 256  # queries a socket carries before it is replaced by one on a new random port
MAX_AGE = 60.0  # seconds, likewise
_BIND_TRIES = 16
_RECV_MAX = 65535


def _port_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low, high = (int(x) for x in fh.read().split())
        if 1024 <= low < high <= 65535:
            return low, high
    except (OSError, ValueError):
        pass
    return 32768, 60999


_LOW, _HIGH = _port_range()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _random_port() -> int:
    return _LOW + int.from_bytes(os.urandom(2), "big") % (_HIGH - _LOW + 1)


class _Port:
    """One connected UDP socket and the queries waiting on it, by ID."""

    __slots__ = ("sock", "pending", "uses", "born", "retired", "pool", "_buf", "_view")

    def __init__(self, pool: PortPool, sock: socket.socket, now: float) -> None:
        self.pool = pool
        self.sock = sock
        self.pending: dict[bytes, tuple[asyncio.Future, bytes, int]] = {}
        self.uses = 0
        self.born = now
        self.retired = False
        self._buf = bytearray(_RECV_MAX)
        self._view = memoryview(self._buf)

    def readable(self) -> None:
        sock, pending, view = self.sock, self.pending, self._view
        match = self.pool.match
        while True:
            try:
                n = sock.recv_into(self._buf)
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
                if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    self.pool.drop(self)
                    return
                continue
            if n < 12:
                continue
            waiter = pending.get(bytes(view[:2]))
            if waiter is None:
                continue
            fut, question, name_len = waiter
            reply = bytes(view[:n])
            if match(reply, reply[:2], question, name_len) and not fut.done():
                fut.set_result(reply)

    def close(self) -> None:
        try:
            self.pool.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError, RuntimeError):
            pass  # the loop may already be closed
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
        self.opened = 0  # sockets opened over the pool's life (tests and the bench read it)

    async def exchange(self, packet: bytes, question: bytes, name_len: int, deadline: float) -> bytes:
        """Send ``packet`` (its first two bytes are the ID) and wait for the matching reply.

        Raises TimeoutError at ``deadline`` (loop time); cancelling the wait forgets the query.
        """
        loop = asyncio.get_running_loop()
        if loop is not self.loop:
            self.close()  # a new event loop (tests): sockets registered with the old one are useless
            self.loop = loop
        qid = packet[:2]
        port = self._pick(qid, loop.time())
        fut = loop.create_future()
        port.pending[qid] = (fut, question, name_len)
        timer = loop.call_at(deadline, _expire, fut)
        try:
            port.sock.send(packet)
            return await fut
        finally:
            timer.cancel()
            if port.pending.get(qid, (None,))[0] is fut:
                del port.pending[qid]
            if port.retired and not port.pending:
                port.close()

    def _pick(self, qid: bytes, now: float) -> _Port:
        if self.retiring:
            port = self._open(now)
            port.retired = True  # not in the rotation: closes as soon as this one query is done
            port.uses += 1
            return port
        ports = self.ports
        for _ in range(4):
            i = int.from_bytes(os.urandom(2), "big") % self.size
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
        port = self._open(now)
        port.retired = True
        port.uses += 1
        return port

    def _open(self, now: float) -> _Port:
        last: OSError | None = None
        for _ in range(_BIND_TRIES):
            sock = socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind(("::" if self.family == socket.AF_INET6 else "0.0.0.0", _random_port()))
                sock.connect(self.server)
            except OSError as exc:
                sock.close()
                last = exc
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            port = _Port(self, sock, now)
            assert self.loop is not None
            self.loop.add_reader(sock.fileno(), port.readable)
            self.opened += 1
            return port
        raise OSError(errno.EADDRINUSE, f"no free random source port after {_BIND_TRIES} tries") from last

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
            if port is not None and port.sock.fileno() >= 0:
                port.sock.close()
