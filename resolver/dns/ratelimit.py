"""Per-client rate limiting: a token bucket per source address, and one log row per second.

A client past ``[server] rate_limit`` queries a second gets REFUSED (EDE 18, no text: a
small answer, nothing to amplify) and its refused queries are *counted*, not logged one
by one: a flood of 100,000 unique names a second becomes one row per client per second
(``verdict`` NULL, ``rcode`` REFUSED, ``note`` 'rate-limited: N queries').

Both tables are bounded, so spoofed source addresses cannot grow them. At ``max_clients``
buckets, at most once a second, buckets that have refilled completely (they hold nothing
but the client's history) are dropped -- first those of addresses seen fewer than
``KEEP_HITS`` times, which is what a flood of spoofed, single-use addresses leaves; a real
client that has asked more than that keeps its bucket through the flood, unless idle buckets
of such clients fill half the table. If every bucket is still active, addresses not yet known
share one overflow bucket until room appears, and their refusals are logged as one row a
second for all of them ("N queries from M addresses").
"""

from __future__ import annotations

from collections.abc import Callable

MAX_CLIENTS = 65_536
PRUNE_INTERVAL = 1.0
KEEP_HITS = 8  # a bucket used this often is a real client's: the last to be dropped

Row = tuple

ALLOWED, LIMITED, LIMITED_SHARED = 0, 1, 2


class RateLimiter:
    """Token buckets keyed by client address; ``check(ip, now)`` takes one token or says why not:
    ALLOWED (0, falsy), LIMITED (its own bucket is empty) or LIMITED_SHARED (an address without
    a bucket of its own, in the shared overflow bucket, is refused)."""

    __slots__ = ("rate", "burst", "max_clients", "_buckets", "_shared", "_next_prune")

    def __init__(self, rate: float, burst: float | None = None, max_clients: int = MAX_CLIENTS) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)  # one second's worth
        self.max_clients = max_clients
        self._buckets: dict[str, list[float]] = {}  # ip -> [tokens, last, hits]
        self._shared = [self.burst, 0.0, 0.0]
        self._next_prune = 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: str, now: float) -> bool:
        return self.check(ip, now) == ALLOWED

    def check(self, ip: str, now: float) -> int:
        b = self._buckets.get(ip)
        refused = LIMITED
        if b is None:
            if len(self._buckets) >= self.max_clients:
                self._prune(now)
            if len(self._buckets) < self.max_clients:
                b = self._buckets[ip] = [self.burst, now, 0.0]
            else:
                b = self._shared
                refused = LIMITED_SHARED
        b[2] += 1.0
        tokens = b[0] + (now - b[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        b[1] = now
        if tokens >= 1.0:
            b[0] = tokens - 1.0
            return ALLOWED
        b[0] = tokens
        return refused

    def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_INTERVAL
        refill = self.burst / self.rate  # idle this long = full again = nothing to remember
        buckets = self._buckets
        idle = [ip for ip, b in buckets.items() if now - b[1] >= refill]
        # Addresses seen only a few times go (a spoofed flood's); idle ones seen often (real
        # clients) only when they are most of the table, so it can never stay full of them.
        few = [ip for ip in idle if buckets[ip][2] < KEEP_HITS]
        drop = idle if len(idle) - len(few) > self.max_clients // 2 else few
        for ip in drop:
            del buckets[ip]


class RefusedCounter:
    """Counts rate-limited queries per client and second; emits one log record for each.

    Refusals from the shared overflow bucket (addresses without a bucket of their own: a
    spoofing flood) are counted together, one record a second for all of them, naming the
    first address and how many there were; so is anything past ``max_clients`` addresses in a
    second. Nothing here emits more than ``max_clients`` + 1 records a second.
    """

    __slots__ = ("submit", "max_clients", "_counts", "_shared", "_shared_ips", "total")

    MAX_SHARED_IPS = 4096  # distinct addresses counted exactly in the shared record; past it, "more than"

    def __init__(self, submit: Callable[[Row], None] | None, max_clients: int = MAX_CLIENTS) -> None:
        self.submit = submit
        self.max_clients = max_clients
        self.total = 0  # refused since start (for /metrics)
        self._counts: dict[str, list] = {}  # ip -> [second, count, transport]
        self._shared: list | None = None  # [second, count, transport, first ip]
        self._shared_ips: set[str] = set()

    def count(self, ip: str, transport: str, wall: float, mode: str, shared: bool = False) -> None:
        self.total += 1
        second = int(wall)
        if not shared:
            c = self._counts.get(ip)
            if c is not None:
                if c[0] == second:
                    c[1] += 1
                    return
                self._emit(ip, c, mode)
                self._counts[ip] = [second, 1, transport]
                return
            if len(self._counts) < self.max_clients:
                self._counts[ip] = [second, 1, transport]
                return
        # Shared: one record a second for every address without a bucket (or a row) of its own.
        sh = self._shared
        if sh is not None and sh[0] != second:
            self._emit_shared(mode)
            sh = None
        if sh is None:
            sh = self._shared = [second, 0, transport, ip]
        sh[1] += 1
        if len(self._shared_ips) < self.MAX_SHARED_IPS:
            self._shared_ips.add(ip)

    def flush(self, mode: str, before: float | None = None) -> None:
        """Emit the counts of seconds before ``before`` (all of them if None)."""
        cutoff = None if before is None else int(before)
        done = [ip for ip, c in self._counts.items() if cutoff is None or c[0] < cutoff]
        for ip in done:
            self._emit(ip, self._counts.pop(ip), mode)
        if self._shared is not None and (cutoff is None or self._shared[0] < cutoff):
            self._emit_shared(mode)

    def _emit(self, ip: str, c: list, mode: str) -> None:
        self._row(c[0], ip, c[2], mode, f"rate-limited: {c[1]} queries")

    def _row(self, second: int, ip: str, transport: str, mode: str, note: str) -> None:
        if self.submit is not None:
            # LOG_FIELDS order: ts, client, transport, qname, qtype, verdict, mode, rule, rcode
            # (REFUSED), answers, cached, latency_ms, note.
            self.submit((float(second), ip, transport, None, None, None, mode, None, 5, None, False, 0.0,
                         note))

    def _emit_shared(self, mode: str) -> None:
        sh, ips = self._shared, len(self._shared_ips)
        self._shared = None
        self._shared_ips = set()
        if sh is not None:
            many = f"more than {ips}" if ips >= self.MAX_SHARED_IPS else str(ips)
            self._row(sh[0], sh[3], sh[2], mode,
                      f"rate-limited: {sh[1]} queries from {many} addresses (shared bucket)")
