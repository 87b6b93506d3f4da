"""Asking the upstream resolvers.

Every upstream query is built afresh from the parsed question (the client's
packet is never relayed, so nothing it smuggled in reaches upstream) with a
random ID from ``os.urandom``, sent on a socket drawn at random from a pool of
sockets on random source ports that is re-randomised as it is used
(``outgoing.PortPool``). A reply counts only if it comes from the server asked
(connected socket), carries our ID, and echoes our question; anything else is
ignored while we keep waiting, so a spoofed packet cannot end the wait early.

Failover: servers are tried in order, each with a share of the overall
deadline; a timeout, ICMP refusal, SERVFAIL, REFUSED or an unparseable reply
moves on. A truncated UDP reply is asked again over TCP. When all fail the
caller gets UpstreamError and answers SERVFAIL -- never a hang.

Hostile or broken upstreams: a reply that does not match our ID, question and
QR=1 is ignored (we keep waiting, as for a spoofed packet); a matching reply
whose records do not parse is a failure of that server (``BadReply``), never an
exception that escapes. Such a server is reported on stderr once per episode
and once more when its replies parse again.

Replies are cleaned by ``clean.Cleaner`` (the caller's ``use``).
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from resolver.core.errors import UpstreamError
from resolver.dns import wire
from resolver.dns.clean import BadReply
from resolver.dns.outgoing import PortPool
from resolver.dns.stats import UpstreamStats

HostPort = tuple[str, int]
T = TypeVar("T")
_RETRY_RCODES = frozenset((wire.SERVFAIL, wire.REFUSED, wire.NOTIMP, wire.FORMERR))


class Upstream:
    """A list of upstream servers with failover and a shared deadline.

    ``tap``, when set, is called with ("fwd", server, protocol, query, reply or None, sent,
    received) -- wall-clock times -- for every exchange (dnstap FORWARDER_QUERY/RESPONSE).

    ``broken`` maps a server whose replies do not parse to when the last such reply came;
    pass the previous instance's map on reload so an episode is announced once, not once
    per policy. An episode ends when the server's replies have parsed for ``QUIET_S``: an
    upstream alternating good and bad replies costs two stderr lines per QUIET_S, not two
    per query.
    """

    QUIET_S = 10.0

    def __init__(self, servers: tuple[HostPort, ...], timeout: float, stats: UpstreamStats | None = None,
                 tap: Callable[[tuple], None] | None = None,
                 broken: dict[HostPort, float] | None = None) -> None:
        if not servers:
            raise UpstreamError("no upstream servers configured (and none in /etc/resolv.conf)")
        self.servers = tuple(servers)
        self.timeout = timeout
        self.stats = stats if stats is not None else UpstreamStats()
        self.tap = tap
        self._names = {s: _fmt(s) for s in self.servers}
        self.broken: dict[HostPort, float] = {} if broken is None else broken
        self.pools = {server: PortPool(server, _matches) for server in self.servers}

    def close(self) -> None:
        """Close the pooled sockets (queries still waiting on them are cancelled)."""
        for pool in self.pools.values():
            pool.close()

    def retire(self) -> None:
        """Replaced by another Upstream: close each socket once its waiting queries are done."""
        for pool in self.pools.values():
            pool.retire()

    async def query(self, question: bytes, name_len: int, do: int) -> bytes:
        """Resolve ``question`` (lower-cased name + type + class); return the raw reply."""
        return await self.resolve(question, name_len, do, bytes)

    async def resolve(self, question: bytes, name_len: int, do: int, use: Callable[[bytes], T]) -> T:
        """Resolve ``question`` and return ``use(reply)``; a reply ``use`` rejects with
        BadReply counts as that server failing, and the next one is asked."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        reasons = []
        unparseable = False
        for idx, server in enumerate(self.servers):
            left = deadline - loop.time()
            if left <= 0:
                reasons.append(f"{_fmt(server)}: no time left")
                break
            # Share what is left between the servers not yet tried.
            budget = left / (len(self.servers) - idx)
            qid = os.urandom(2)
            packet = wire.build_query(qid, question, do)
            name = self._names[server]
            tap = self.tap
            clock = time.monotonic  # not loop.time(): uvloop's ticks in whole milliseconds
            sent = clock()
            proto = "udp"
            reply = None
            try:
                # The pool keeps its own deadline (one timer, no timeout scope: this is per miss).
                until = loop.time() + budget
                reply = await self.pools[server].exchange(packet, question, name_len, until)
                if reply[2] & 0x02:  # TC: the full answer only fits over TCP
                    if tap is not None:
                        self._tap(tap, server, proto, packet, reply, sent, clock())
                    proto, sent, reply = "tcp", clock(), None
                    async with asyncio.timeout_at(until):
                        reply = await _tcp(server, packet, qid, question, name_len)
            except TimeoutError:
                self.stats.error(name, "timeout")
                reasons.append(f"{name}: timeout")
                continue
            except (OSError, ValueError) as exc:
                self.stats.error(name, "network" if isinstance(exc, OSError) else "malformed")
                reasons.append(f"{name}: {exc.__class__.__name__}: {exc}")
                continue
            finally:
                if tap is not None:
                    self._tap(tap, server, proto, packet, reply, sent, clock())
            self.stats.observe(name, clock() - sent)
            rcode = reply[3] & 0x0F
            if rcode in _RETRY_RCODES:
                self.stats.error(name, "rcode")
                reasons.append(f"{name}: rcode {rcode}")
                continue
            try:
                result = use(reply)
            except BadReply as exc:
                self.stats.error(name, "malformed")
                reasons.append(f"{name}: {exc}")
                unparseable = True
                self._episode(server, True)
                continue
            if self.broken:  # almost always empty: no loop.time() per miss
                self._episode(server, False)
            return result
        raise UpstreamError("; ".join(reasons) or "no upstream answered", unparseable=unparseable)

    def _episode(self, server: HostPort, bad: bool) -> None:
        last = self.broken.get(server)
        now = asyncio.get_running_loop().time()
        if bad:
            self.broken[server] = now
            if last is not None:
                return
            line = f"dnsguard: upstream {_fmt(server)}: unparseable replies, answering SERVFAIL"
        else:
            if last is None or now - last < self.QUIET_S:
                return
            del self.broken[server]
            line = f"dnsguard: upstream {_fmt(server)}: replies parse again"
        try:
            print(line, file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # stderr gone: never fail a query over it

    @staticmethod
    def _tap(tap: Callable[[tuple], None], server: HostPort, proto: str, packet: bytes, reply: bytes | None,
             sent: float, received: float) -> None:
        # The clock is monotonic; dnstap wants wall-clock seconds.
        off = time.time() - time.monotonic()
        tap(("fwd", server, proto, packet, reply, sent + off, received + off))


def _fmt(server: HostPort) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _matches(reply: bytes, qid: bytes, question: bytes, name_len: int) -> bool:
    qend = 12 + len(question)
    return (len(reply) >= qend and reply[:2] == qid and reply[2] & 0x80 == 0x80
            and reply[4:6] == b"\x00\x01"
            and reply[12:12 + name_len].lower() == question[:name_len]
            and reply[12 + name_len:qend] == question[name_len:])


async def _tcp(server: HostPort, packet: bytes, qid: bytes, question: bytes, name_len: int) -> bytes:
    reader, writer = await asyncio.open_connection(server[0], server[1])
    try:
        writer.write(struct.pack(">H", len(packet)) + packet)
        await writer.drain()
        while True:  # bounded by the caller's timeout
            size = struct.unpack(">H", await reader.readexactly(2))[0]
            reply = await reader.readexactly(size)
            if _matches(reply, qid, question, name_len):
                return reply
    except asyncio.IncompleteReadError:
        raise ValueError("upstream closed the TCP connection early") from None
    finally:
        writer.close()
