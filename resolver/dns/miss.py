"""A cache miss, from the client's query to its answer, with no task per query.

``Resolver.handle`` turns a miss into a ``Pending`` (one client query, waiting) attached to a
``Fetch`` (one upstream resolution per cache key: identical misses share it). The upstream's
socket pool calls the Fetch back when the reply comes (``Upstream.start``); the Fetch hands
the cleaned reply to the resolver, which stores it and answers each Pending through the
callback its server gave (``then``).

Why callbacks: as a coroutine, a miss cost a Task, a Future, four coroutine frames and an
extra pass of the event loop to wake the task, on top of the work itself (see
docs/performance.md, "Issue #15").
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from resolver.core.errors import UpstreamError

if TYPE_CHECKING:
    from resolver.core.model import Decision
    from resolver.dns.clean import Cleaned
    from resolver.dns.upstream import _Ask
    from resolver.dns.views import ClientView

Then = Callable[[bytes | None, Any], None]

# Upstream resolutions in flight at once. Past this, new misses get SERVFAIL at once instead
# of piling up memory behind a slow or dead upstream (a flood of unique names). UDP exchanges
# share the pooled sockets (dns/outgoing.py); a TCP retry still holds a socket of its own,
# hence the bound by file descriptors.
MAX_INFLIGHT = 4096


def inflight_limit() -> int:
    """Upstream sockets we may open: half the file descriptors we can have, at most MAX_INFLIGHT."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return MAX_INFLIGHT
    return max(16, min(MAX_INFLIGHT, (soft - 256) // 2))


class Pending:
    """A client query waiting for its miss: settled once, with the answer's bytes or None
    (stay silent). What the query path parsed is kept to build the answer then."""

    __slots__ = ("data", "ip", "transport", "t0", "name_end", "qend", "qtype", "udp_size", "do", "key",
                 "qname", "view", "d", "fn", "arg", "resp", "settled")

    def __init__(self, data: bytes, ip: str, transport: str, t0: float, name_end: int, qend: int, qtype: int,
                 udp_size: int, do: int, key: bytes, qname: bytes, view: ClientView, d: Decision) -> None:
        self.data, self.ip, self.transport, self.t0 = data, ip, transport, t0
        self.name_end, self.qend, self.qtype, self.udp_size, self.do = name_end, qend, qtype, udp_size, do
        self.key, self.qname, self.view, self.d = key, qname, view, d
        self.fn: Then | None = None
        self.arg: Any = None
        self.resp: bytes | None = None
        self.settled = False

    def then(self, fn: Then, arg: Any) -> None:
        """Call ``fn(answer, arg)`` once the answer is known (now, if it already is). One
        consumer: a second would silently replace the first, which would then never hear."""
        if self.fn is not None:
            raise RuntimeError("this query's answer already has a consumer")
        if self.settled:
            fn(self.resp, arg)
        else:
            self.fn, self.arg = fn, arg

    def settle(self, resp: bytes | None) -> None:
        self.resp = resp
        self.settled = True
        fn = self.fn
        if fn is not None:
            self.fn = None
            fn(resp, self.arg)

    def __await__(self) -> Generator[Any, None, bytes | None]:
        # For callers that have a coroutine anyway (tests, scripts/bench_miss.py); the servers
        # use ``then``.
        if not self.settled:
            fut = asyncio.get_running_loop().create_future()
            self.then(_set_result, fut)
            yield from fut
        return self.resp


def _set_result(resp: bytes | None, fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(resp)


class Fetch:
    """One upstream resolution for one cache key, and the client queries waiting for it.

    ``resolver`` is the query path (``chain.Resolver``): it owns ``_inflight``, stores what
    came back (``_store``) and answers each waiting query (``_answer``).
    """

    __slots__ = ("resolver", "key", "question", "name_len", "do", "waiters", "ask", "over")

    def __init__(self, resolver: Any, key: bytes, question: bytes, name_len: int, do: int) -> None:
        self.resolver = resolver
        self.key, self.question, self.name_len, self.do = key, question, name_len, do
        self.waiters: list[Pending] = []
        self.ask: _Ask | None = None
        self.over = False

    def start(self) -> None:
        """Ask upstream. Every server may fail at once: then ``done`` has run when this returns."""
        r = self.resolver
        try:
            ask = r.upstream.start(self.question, self.name_len, self.do, r.cleaner.clean, self.done)
        except Exception as bug:  # e.g. no running loop: the waiting queries still get answers
            self.done(None, bug)
            return
        if not self.over:
            self.ask = ask

    def orphaned(self) -> bool:
        """Whether this resolution's event loop has stopped under it (tests and scripts that
        end a loop without ``Resolver.cancel_pending``): nobody will ever complete it."""
        ask = self.ask
        return ask is not None and not ask.loop.is_running()

    def done(self, cleaned: Cleaned | None, exc: BaseException | None) -> None:
        if self.over:
            return
        self.over = True
        # The exchange holds this method and this holds the exchange: break the cycle now, or
        # each miss would wait for the cyclic garbage collector (13% of the CPU when it did).
        self.ask = None
        r = self.resolver
        inflight = r._inflight
        if inflight.get(self.key) is self:
            del inflight[self.key]
        entry = None
        if exc is None:
            try:
                entry = r._store(self.key, cleaned)
            except Exception as bug:
                exc = bug
        if not self.waiters:  # a background refresh (serve-stale): nobody to answer
            # Still down is expected; a bug must not die unseen.
            if exc is not None and not isinstance(exc, UpstreamError | asyncio.CancelledError):
                traceback.print_exception(exc, file=sys.stderr)
            return
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            r._answer(w, entry, exc)

    def cancel(self) -> None:
        """Shutdown: stop asking; every waiting query is logged as cut off and gets no answer."""
        if self.ask is not None:
            self.ask.cancel()
        self.done(None, asyncio.CancelledError())
