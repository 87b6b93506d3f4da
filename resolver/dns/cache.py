"""The answer cache: upstream answers kept in wire form, served by patching.

An entry holds the answer *body* (the records after the question, without any
OPT) and where each TTL sits in it. Serving a hit is concatenation: the
client's ID and flags, counts, the client's own question bytes (exact case), the
body with TTLs aged to the second, and an OPT when the client used EDNS. The
aged body is rebuilt at most once per second per entry, so a hot name costs a
dictionary lookup and a few byte concatenations.

Keys are ``lower-cased question name + qtype + qclass + DO bit``: the same name
asked in different case shares an entry, and DNSSEC-OK answers (with RRSIGs)
are kept apart from plain ones. Size is capped (LRU), so memory stays flat.

Serve-stale (RFC 8767): an expired entry is kept (still within the LRU's bounds)
for ``stale_max`` seconds after it expired; ``get`` never returns it, ``stale``
does -- the chain asks for it only when every upstream has failed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from resolver.dns import wire

_HEADS: dict[tuple[int, int, int], tuple[bytes, bytes]] = {}
_MAX_HEADS = 4096


def _heads(an: int, ns: int, ar: int) -> tuple[bytes, bytes]:
    """QDCOUNT..ARCOUNT without and with the client's OPT record, ready to concatenate;
    one shared pair per combination of counts (a handful in practice)."""
    heads = _HEADS.get((an, ns, ar))
    if heads is None:
        counts = b"\x00\x01" + bytes((an >> 8, an & 0xFF, ns >> 8, ns & 0xFF))
        heads = (counts + bytes((ar >> 8, ar & 0xFF)), counts + bytes(((ar + 1) >> 8, (ar + 1) & 0xFF)))
        if len(_HEADS) < _MAX_HEADS:  # bounded: odd counts from a hostile upstream are just built
            _HEADS[(an, ns, ar)] = heads
    return heads


class Entry:
    """One cached answer. Immutable after construction except the aged-body memo."""

    __slots__ = ("rcode", "counts", "body", "offsets", "ttls", "stored", "expires", "answers_json",
                 "addrs", "note", "fed_at", "live", "_heads", "_age", "_aged", "_stale")

    def __init__(self, rcode: int, an: int, ns: int, ar: int, body: bytes, offsets: Sequence[int],
                 ttls: Sequence[int], ttl: int, now: float, answers_json: str | None,
                 addrs: tuple[tuple[str, int], ...] = (), note: str | None = None) -> None:
        self.rcode = rcode
        self._heads = _heads(an, ns, ar)
        self.body = body
        # Tuples of ints, not lists: the collector stops tracking them, so a full cache costs a
        # full (generation-2) collection one object per entry instead of three -- at 100,000
        # entries that pause (it comes every ~25% of churn) went from ~70 ms to ~35 ms here.
        self.offsets = tuple(offsets)
        self.ttls = tuple(ttls)
        self.stored = now
        self.expires = now + ttl
        self.answers_json = answers_json
        self.addrs = addrs  # (ip, ttl) pairs for the firewall sets
        self.note = note  # e.g. which rebinding addresses were stripped; logged with every use
        self.fed_at = -1e18  # when the firewall sets were last refreshed from this entry
        self.live = True  # False once the cache has dropped it (answers memoised from it are stale)
        self._age = 0
        self._aged = body
        self._stale: bytes | None = None

    def _age_to(self, age: int) -> bytes:
        buf = bytearray(self.body)
        for off, ttl in zip(self.offsets, self.ttls, strict=True):
            left = ttl - age
            buf[off:off + 4] = (left if left > 0 else 0).to_bytes(4, "big")
        self._aged = bytes(buf)
        self._age = age
        return self._aged

    def response(self, data: bytes, qend: int, udp_size: int, do: int, now: float) -> bytes:
        """This answer for the query ``data`` (its ID, flags and question bytes)."""
        # QR, RA, the client's RD and CD, our rcode (as wire.response_flags, inlined: hot path).
        flags = bytes((0x80 | (data[2] & 0x01), 0x80 | (data[3] & 0x10) | self.rcode))
        age = int(now - self.stored)
        body = self._aged if age == self._age else self._age_to(age)
        if udp_size:
            return data[:2] + flags + self._heads[1] + data[12:qend] + body + wire.PLAIN_OPT[do]
        return data[:2] + flags + self._heads[0] + data[12:qend] + body

    def stale_response(self, data: bytes, qend: int, udp_size: int, do: int) -> bytes:
        """This expired answer with every TTL set to STALE_TTL and EDE 3 (RFC 8767 4, RFC 8914)."""
        body = self._stale
        if body is None:
            buf = bytearray(self.body)
            ttl = STALE_TTL.to_bytes(4, "big")
            for off in self.offsets:
                buf[off:off + 4] = ttl
            body = self._stale = bytes(buf)
        flags = wire.response_flags(data, self.rcode)
        if udp_size:
            return data[:2] + flags + self._heads[1] + data[12:qend] + body + STALE_OPT[do]
        return data[:2] + flags + self._heads[0] + data[12:qend] + body


# RFC 8767 4: "a TTL of 30 seconds is RECOMMENDED" for stale answers.
STALE_TTL = 30
STALE_OPT = {do: wire.opt_record(do, wire.ede_option(wire.EDE_STALE_ANSWER,
                                                     "dnsguard: upstream down, stale answer"))
             for do in (0, 0x80)}


MAX_BYTES = 128 * 1024 * 1024


class AnswerCache:
    """An LRU of Entry objects keyed by question bytes, bounded in entries *and* bytes.

    Counting entries alone would let a zone that answers with 50 KB RRsets (an attacker's,
    reached in audit mode) grow 100,000 entries into gigabytes.
    """

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic,
                 max_bytes: int = MAX_BYTES, stale_max: float = 0.0) -> None:
        self.max_entries = max_entries
        self.stale_max = stale_max  # seconds an expired entry is kept for serve-stale
        self.max_bytes = max_bytes
        self.bytes = 0
        self.clock = clock
        self._data: OrderedDict[bytes, Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes, now: float) -> Entry | None:
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires <= now:
            if now - entry.expires >= self.stale_max:
                del self._data[key]
                entry.live = False
                self.bytes -= _size(key, entry)
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return entry

    def stale(self, key: bytes, now: float) -> Entry | None:
        """The expired entry for ``key`` if it expired less than ``stale_max`` seconds ago."""
        entry = self._data.get(key)
        if entry is None or entry.expires > now or now - entry.expires >= self.stale_max:
            return None
        self._data.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry) -> None:
        if self.max_entries <= 0:
            return
        data = self._data
        old = data.get(key)
        if old is not None:
            old.live = False
            self.bytes -= _size(key, old)
        data[key] = entry
        data.move_to_end(key)
        self.bytes += _size(key, entry)
        while len(data) > self.max_entries or (self.bytes > self.max_bytes and len(data) > 1):
            k, e = data.popitem(last=False)
            e.live = False
            self.bytes -= _size(k, e)

    def touch(self, key: bytes) -> None:
        """Count a hit served without `get` (a memoised answer) and keep its LRU place fresh."""
        self._data.move_to_end(key)
        self.hits += 1

    def clear(self) -> None:
        for entry in self._data.values():
            entry.live = False
        self._data.clear()
        self.bytes = 0


def _size(key: bytes, entry: Entry) -> int:
    # The body dominates; the aged copy and the per-entry overhead are counted roughly.
    return 2 * len(entry.body) + len(key) + 400
