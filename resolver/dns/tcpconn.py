"""TCP to one upstream server, one connection reused for TC retries (RFC 7766).

A truncated UDP answer is asked again over TCP. Opening a connection per retry costs a
handshake (and a TIME_WAIT socket) each time; RFC 7766 6.2.1 has clients keep a connection
and pipeline queries on it, answers coming back in any order, matched by ID. Here: at most
one open connection per server, opened on first use; a reply is handed to the query waiting
under its ID only if it echoes that query's question (``match``), anything else is ignored;
the connection is closed after ``IDLE_S`` seconds with nothing waiting (6.2.3: clients
should close idle connections, servers may close them any time), and a query whose
connection the server closed before answering is asked once more on a fresh one -- the
server may have timed the connection out just as the query left.

Off-path spoofing is not a concern on TCP (an attacker would have to guess the sequence
numbers), so reusing one source port is safe here, unlike for UDP (see ``outgoing``).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from resolver.dns import wire

HostPort = tuple[str, int]
Match = Callable[[bytes, bytes, bytes, int], bool]

IDLE_S = 10.0


class Closed(OSError):
    """The connection went away before this query's answer came."""


class _IdInUse(Exception):
    """Another query on this connection waits under the same ID (1 in 65,536 per query in
    flight on it): this one goes on a connection of its own."""


class _Conn(asyncio.Protocol):
    """One TCP connection and the queries waiting on it, by ID."""

    def __init__(self, owner: TcpUpstream, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: dict[bytes, tuple[asyncio.Future, bytes, int]] = {}
        self.answered = 0  # replies accepted: a connection that served is one a server may time out
        self.closed = False
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        for reply in wire.tcp_frames(self.buf):
            waiting = self.pending.get(reply[:2]) if len(reply) >= 12 else None
            if waiting is None:
                continue
            fut, question, name_len = waiting
            if self.owner.match(reply, reply[:2], question, name_len) and not fut.done():
                self.answered += 1
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.forget(self)
        if self.idle is not None:
            self.idle.cancel()
        for fut, _q, _n in self.pending.values():
            if not fut.done():
                fut.set_exception(Closed(f"upstream closed the TCP connection{f' ({exc})' if exc else ''}"))
        self.pending.clear()

    async def ask(self, packet: bytes, question: bytes, name_len: int) -> bytes:
        qid = packet[:2]
        if qid in self.pending:
            raise _IdInUse()
        if self.closed or self.transport is None:
            raise Closed("upstream closed the TCP connection")
        fut = self.loop.create_future()
        self.pending[qid] = (fut, question, name_len)
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        try:
            self.transport.write(struct.pack(">H", len(packet)) + packet)
            return await fut
        finally:
            if self.pending.get(qid, (None,))[0] is fut:
                del self.pending[qid]
            if not self.pending and not self.closed:
                self.idle = self.loop.call_later(self.owner.idle_s, self.close)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class TcpUpstream:
    """The (at most one) reused TCP connection to ``server``."""

    def __init__(self, server: HostPort, match: Match, idle_s: float = IDLE_S) -> None:
        self.server = server
        self.match = match
        self.idle_s = idle_s
        self.conn: _Conn | None = None
        self.opened = 0  # connections opened (tests read it)
        self._opening: asyncio.Future | None = None

    async def exchange(self, packet: bytes, question: bytes, name_len: int) -> bytes:
        """Ask ``packet`` (its first two bytes are the ID) and return the matching reply.
        The caller owns the deadline (cancel the wait to give up)."""
        for attempt in range(2):
            conn = await self._connection()
            reused = conn.answered > 0
            try:
                return await conn.ask(packet, question, name_len)
            except _IdInUse:
                return await self._one_shot(packet, question, name_len)
            except Closed:
                # Asked again only on a fresh connection, and only if the failed one had
                # served before: a server timing out an idle connection, not a broken one.
                if attempt or not reused:
                    raise
        raise AssertionError("unreachable")

    async def _connection(self) -> _Conn:
        loop = asyncio.get_running_loop()
        conn = self.conn
        if conn is not None and not conn.closed and conn.loop is loop:
            return conn
        opening = self._opening
        if opening is None or opening.get_loop() is not loop:
            opening = self._opening = loop.create_task(self._open(loop))
            # Retrieved here: when every query that waited for it gave up, nobody else would.
            opening.add_done_callback(lambda f: f.cancelled() or f.exception())
        # Shielded: one query's deadline must not cancel the connection others wait for.
        return await asyncio.shield(opening)

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Conn:
        try:
            _transport, conn = await loop.create_connection(lambda: _Conn(self, loop), self.server[0],
                                                            self.server[1])
        finally:
            self._opening = None
        if self.conn is not None:
            self.conn.close()  # one from an event loop that is gone (tests)
        self.opened += 1
        self.conn = conn
        return conn

    async def _one_shot(self, packet: bytes, question: bytes, name_len: int) -> bytes:
        """``packet`` on a connection of its own (not the kept one), closed after the answer."""
        loop = asyncio.get_running_loop()
        _transport, conn = await loop.create_connection(lambda: _Conn(self, loop), self.server[0],
                                                        self.server[1])
        try:
            return await conn.ask(packet, question, name_len)
        finally:
            conn.close()

    def forget(self, conn: _Conn) -> None:
        if self.conn is conn:
            self.conn = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

