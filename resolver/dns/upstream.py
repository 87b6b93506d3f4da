"""Asking the upstream resolvers.

Every upstream query is built afresh from the parsed question (the client's
packet is never relayed, so nothing it smuggled in reaches upstream) with a
random ID from the kernel's CSPRNG (``outgoing.entropy``), sent on a socket drawn at random from a pool of
sockets on random source ports that is re-randomised as it is used
(``outgoing.PortPool``). A reply counts only if it comes from the server asked
(connected socket), carries our ID, and echoes our question; anything else is
ignored while we keep waiting, so a spoofed packet cannot end the wait early.

Failover: servers are tried in order, each with a share of the overall
deadline; a timeout, ICMP refusal, SERVFAIL, REFUSED or an unparseable reply
moves on. A truncated UDP reply is asked again over TCP, on a connection to that
server kept for such retries (``tcpconn``, RFC 7766). When all fail the
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
import sys
import time
import traceback
from collections.abc import Callable
from typing import Generic, TypeVar

from resolver.core.errors import UpstreamError
from resolver.dns import wire
from resolver.dns.clean import BadReply
from resolver.dns.outgoing import PortPool, entropy
from resolver.dns.stats import UpstreamStats
from resolver.dns.tcpconn import TcpUpstream

HostPort = tuple[str, int]
T = TypeVar("T")
Use = Callable[[bytes, bytes, int], T]  # (reply, question, name_len) -> result; raises BadReply
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
        self.tcp = {server: TcpUpstream(server, _matches) for server in self.servers}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()  # TCP retries under way

    def close(self) -> None:
        """Close the pooled sockets (queries still waiting on them are cancelled)."""
        for pool in self.pools.values():
            pool.close()
        for task in list(self._tasks):
            task.cancel()
        for tcp in self.tcp.values():
            tcp.close()

    def retire(self) -> None:
        """Replaced by another Upstream: close each socket once its waiting queries are done."""
        for pool in self.pools.values():
            pool.retire()
        for tcp in self.tcp.values():
            tcp.idle_s = 0.0  # a connection closes as soon as nothing waits on it
            if tcp.conn is not None and not tcp.conn.pending:
                tcp.close()

    async def query(self, question: bytes, name_len: int, do: int) -> bytes:
        """Resolve ``question`` (lower-cased name + type + class); return the raw reply."""
        return await self.resolve(question, name_len, do, _raw)

    async def resolve(self, question: bytes, name_len: int, do: int, use: Use[T]) -> T:
        """``start`` as a coroutine: returns ``use(reply, question, name_len)``."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()

        def done(result: object, exc: BaseException | None) -> None:
            if not fut.done():
                fut.set_result(result) if exc is None else fut.set_exception(exc)

        ask = self.start(question, name_len, do, use, done)
        try:
            return await fut
        except asyncio.CancelledError:
            ask.cancel()
            raise

    def start(self, question: bytes, name_len: int, do: int, use: Use[T],
              done: Callable[[T | None, BaseException | None], None]) -> _Ask:
        """Resolve ``question``: ``done(use(reply, question, name_len), None)`` for the first
        reply ``use`` accepts, ``done(None, UpstreamError)`` once every server failed, or
        ``done(None, exc)`` if ``use`` raised anything but BadReply or the exchange was
        cancelled. ``done`` is called exactly once, from the event loop -- possibly before
        this returns (every server failed at once). A reply ``use`` rejects with BadReply
        counts as that server failing, and the next one is asked."""
        loop = self._loop
        if loop is None or not loop.is_running():
            # Once per loop: asyncio.get_running_loop() costs a getpid(2) on Python 3.11.
            loop = self._loop = asyncio.get_running_loop()
        ask = _Ask(self, loop, question, name_len, do, use, done)
        ask.guarded(ask.next)
        return ask

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


class _Ask(Generic[T]):
    """One resolution: the servers in order, each with a share of what is left of the
    deadline, until one gives a reply ``use`` accepts. Driven by the socket pool's callbacks
    (``reply``/``fail``): a UDP exchange costs no task, future or timer; only a TC retry
    over TCP runs as a task."""

    __slots__ = ("up", "loop", "question", "name_len", "do", "use", "done", "deadline", "idx", "reasons",
                 "unparseable", "server", "name", "packet", "qid", "proto", "sent", "until", "port",
                 "task", "finished")

    def __init__(self, up: Upstream, loop: asyncio.AbstractEventLoop, question: bytes, name_len: int, do: int,
                 use: Use[T], done: Callable[[T | None, BaseException | None], None]) -> None:
        self.up, self.loop, self.question, self.name_len, self.do = up, loop, question, name_len, do
        self.use, self.done = use, done
        self.deadline = loop.time() + up.timeout
        self.idx = 0
        self.reasons: list[str] = []
        self.unparseable = False
        self.port = self.task = None
        self.finished = False

    def next(self) -> None:
        """Ask the next server, or end with UpstreamError when none is left (or no time)."""
        up, loop = self.up, self.loop
        servers = up.servers
        while self.idx < len(servers):
            idx = self.idx
            server = servers[idx]
            now = loop.time()
            left = self.deadline - now
            if left <= 0:
                self.reasons.append(f"{up._names[server]}: no time left")
                break
            self.idx = idx + 1
            # Share what is left between the servers not yet tried.
            self.until = until = now + left / (len(servers) - idx)
            self.qid = qid = entropy.take(2)
            self.packet = packet = wire.build_query(qid, self.question, self.do)
            self.server, self.name, self.proto = server, up._names[server], "udp"
            self.sent = time.monotonic()  # not loop.time(): uvloop's ticks in whole milliseconds
            try:
                # The pool keeps the deadline (one timer per pool, none per miss).
                self.port = up.pools[server].send(packet, self.question, self.name_len, until, self, loop)
                return
            except OSError as exc:
                self._failed("network", f"{exc.__class__.__name__}: {exc}")
        self._finish(None, UpstreamError("; ".join(self.reasons) or "no upstream answered",
                                         unparseable=self.unparseable))

    def guarded(self, step: Callable[..., None], *args: object) -> None:
        """Run one step; a bug in it ends this resolution (``done`` hears of it) instead of
        leaving the caller waiting for a ``done`` that never comes."""
        try:
            step(*args)
        except Exception as exc:
            done = self.done
            self.cancel()  # forget whatever exchange the step may have left registered
            self.done = done
            self._finish(None, exc, force=True)

    def reply(self, reply: bytes) -> None:
        self.guarded(self._reply, reply)

    def fail(self, exc: BaseException) -> None:
        self.guarded(self._fail, exc)

    def _reply(self, reply: bytes) -> None:
        self.port = None
        if reply[2] & 0x02:  # TC: the full answer only fits over TCP
            self._tap(reply)
            self.proto, self.sent = "tcp", time.monotonic()
            task = self.task = self.loop.create_task(self._tcp())
            self.up._tasks.add(task)
            task.add_done_callback(self.up._tasks.discard)
            return
        self._answered(reply)

    def _fail(self, exc: BaseException) -> None:
        self.port = None
        if isinstance(exc, asyncio.CancelledError):
            self._tap(None)
            self._finish(None, exc)
        elif isinstance(exc, TimeoutError):
            self._failed("timeout", "timeout")
            self.next()
        else:
            self._failed("network" if isinstance(exc, OSError) else "malformed",
                         f"{exc.__class__.__name__}: {exc}")
            self.next()

    def cancel(self) -> None:
        """Stop waiting (the caller went away): no ``done`` call follows."""
        finished, self.finished = self.finished, True
        self.done = _nothing
        port, self.port = self.port, None
        task, self.task = self.task, None
        if port is not None:
            port.settle((self.qid[0] << 8) | self.qid[1], self)
        if task is not None:
            task.cancel()
        if not finished and (port is not None or task is not None):
            self._tap(None)  # the exchange under way ends here, unanswered

    async def _tcp(self) -> None:
        try:
            async with asyncio.timeout_at(self.until):
                reply = await self.up.tcp[self.server].exchange(self.packet, self.question, self.name_len)
        except asyncio.CancelledError:
            if not self.finished:
                self.task = None
                self.fail(asyncio.CancelledError())
            raise
        except Exception as exc:  # TimeoutError, OSError, ValueError (closed early)
            if not self.finished:
                self.task = None
                self.fail(exc)
            return
        if not self.finished:
            self.task = None
            self.guarded(self._answered, reply)

    def _answered(self, reply: bytes) -> None:
        up, name = self.up, self.name
        self._tap(reply)
        up.stats.observe(name, time.monotonic() - self.sent)
        rcode = reply[3] & 0x0F
        if rcode in _RETRY_RCODES:
            up.stats.error(name, "rcode")
            self.reasons.append(f"{name}: rcode {rcode}")
            self.next()
            return
        try:
            result = self.use(reply, self.question, self.name_len)
        except BadReply as exc:
            up.stats.error(name, "malformed")
            self.reasons.append(f"{name}: {exc}")
            self.unparseable = True
            up._episode(self.server, True)
            self.next()
            return
        except Exception as exc:  # a bug in ``use``: the caller answers SERVFAIL and says why
            self._finish(None, exc)
            return
        if up.broken:  # almost always empty: no loop.time() per miss
            up._episode(self.server, False)
        self._finish(result, None)

    def _failed(self, kind: str, why: str) -> None:
        """This server failed without a reply: recorded, and the exchange tapped as unanswered."""
        self._tap(None)
        self.up.stats.error(self.name, kind)
        self.reasons.append(f"{self.name}: {why}")

    def _tap(self, reply: bytes | None) -> None:
        tap = self.up.tap
        if tap is not None:
            Upstream._tap(tap, self.server, self.proto, self.packet, reply, self.sent, time.monotonic())

    def _finish(self, result: T | None, exc: BaseException | None, force: bool = False) -> None:
        if self.finished and not force:
            return
        self.finished = True
        done, self.done = self.done, _nothing  # no cycle left through the caller's callback
        try:
            done(result, exc)
        except Exception:  # never into the socket pool's reader
            traceback.print_exc(file=sys.stderr)


def _nothing(result: object, exc: BaseException | None) -> None:
    pass


def _raw(reply: bytes, question: bytes, name_len: int) -> bytes:
    return reply


def _fmt(server: HostPort) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _matches(reply: bytes, qid: bytes, question: bytes, name_len: int) -> bool:
    qend = 12 + len(question)
    return (len(reply) >= qend and reply[:2] == qid and reply[2] & 0x80 == 0x80
            and reply[4:6] == b"\x00\x01"
            and reply[12:12 + name_len].lower() == question[:name_len]
            and reply[12 + name_len:qend] == question[name_len:])
