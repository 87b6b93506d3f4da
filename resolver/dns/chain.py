"""The query path: every packet goes through these steps, in this order.

    parse -> client ACL -> policy -> local answers -> cache -> upstream
    (and every outcome, including drops and errors, is logged)

Why this order:
  * parse first: nothing else may look at bytes that are not a valid query;
  * the client ACL before the policy: an unknown client learns nothing, not even
    whether a name is allowed (and dnsguard is never an open resolver);
  * the policy before anything that could leak: a denied name is answered from
    bytes built here and never reaches the cache lookup or an upstream socket;
  * the cache before upstream, of course; the firewall sets are refreshed from
    the cache entry *before* the answer is returned, so a client never connects
    to an address the kernel does not yet allow;
  * serve-stale (RFC 8767) last: only when every upstream failed for an allowed
    name does an expired entry answer (TTL 30, EDE 3). For STALE_RECHECK_S after
    that, the name is answered stale at once while one background refresh at a
    time keeps asking upstream, so an outage costs one timeout, not one per query.

``Resolver.handle`` is synchronous for everything that can be answered
locally (denials, cache hits, errors), which is what keeps the hot path near
the cost of the kernel's own send/receive; a cache miss returns a ``Pending``
that the socket pool's callbacks settle (``dns/miss.py``), no coroutine. It
never raises: a bug in a step becomes SERVFAIL and a traceback on stderr.
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from resolver.core.errors import UpstreamError
from resolver.core.model import Decision
from resolver.dns import wire
from resolver.dns.cache import STALE_TTL, AnswerCache, Entry
from resolver.dns.clean import Cleaned, Cleaner
from resolver.dns.miss import Fetch, Pending, inflight_limit
from resolver.dns.ratelimit import LIMITED_SHARED, RateLimiter, RefusedCounter
from resolver.dns.stats import UpstreamStats
from resolver.dns.upstream import Upstream
from resolver.dns.views import ClientView, classify, named_networks
from resolver.policy.config import Config

Submit = Callable[[tuple], None]
Handled = bytes | None | Pending

# Never forwarded: 0 (reserved), OPT (41, a pseudo-type) and the meta/query types 128-254
# (TKEY, TSIG, IXFR, AXFR, MAILB, MAILA, ...). ANY (255) gets the RFC 8482 answer instead.
_META_TYPES = frozenset((0, 41, *range(128, 255)))
_MAX_VIEWS = 65_536
# Whole UDP answers memoised by (client, packet without its ID); see Resolver.handle. Bounded
# in entries and, per entry, in bytes: a query padded to 64 KB (an OPT may carry anything) or
# a big answer is never kept, so the memo holds at most ~16k x 1 KB, and the cache entries it
# refers to (possibly dropped by the cache meanwhile) hold answers of at most that size too.
_MAX_FAST = 16_384
_FAST_QUERY_MAX = 320  # a question with the longest name (255 octets) and an OPT fits
_FAST_ANSWER_MAX = 640
# Client queries waiting on upstream at once: past this, new misses get SERVFAIL at once
# instead of piling up memory behind a slow or dead upstream (see miss.inflight_limit).
MAX_WAITING = 16_384
# RFC 8767 5: after a failed refresh, answer stale at once for this long ("failure recheck").
STALE_RECHECK_S = 30.0
_MAX_STALE_KEYS = 65_536
# SERVFAIL's OPT when no upstream answered, by (some reply was unparseable, DO bit).
_UPSTREAM_FAILED = {
    (bad, do): wire.opt_record(do, wire.ede_option(
        wire.EDE_NETWORK_ERROR if bad else wire.EDE_NO_REACHABLE_AUTHORITY,
        "dnsguard: upstream replies could not be parsed" if bad else "dnsguard: no upstream answered"))
    for bad in (False, True) for do in (0, 0x80)}


class Resolver:
    """The query path, bound to one policy at a time (``use`` swaps it atomically)."""

    def __init__(self, config: Config, *, submit: Submit | None = None, feeder: Any = None,
                 tap: Callable[[tuple], None] | None = None) -> None:
        self.submit = submit
        self.feeder = feeder
        self.tap = tap  # dnstap sink for upstream exchanges; None when dnstap is off
        # /metrics: queries by (verdict, mode, transport, rcode), one dict update per answer; the
        # collector reads a copy at scrape time. None when metrics are off (one `is None` check).
        self.counts: dict[tuple, int] | None = None
        self.upstream_stats = UpstreamStats()
        self.cache = AnswerCache(config.cache.max_entries)
        self._inflight: dict[bytes, Fetch] = {}  # one upstream resolution per key (serve-stale's too)
        self._stale_until: dict[bytes, float] = {}  # key -> answer stale without waiting until
        self.stale_answers = 0  # answered from an expired entry (for /metrics)
        self._drained: asyncio.Future | None = None  # set while shutdown waits for `waiting` to reach 0
        self.limiter: RateLimiter | None = None
        self.refused = RefusedCounter(submit)
        self.max_inflight = inflight_limit()
        self.waiting = 0  # client queries waiting for an upstream answer
        self._wall_offset = time.time() - time.monotonic()
        self.use(config)

    # -- configuration ----------------------------------------------------------------

    def tick(self) -> None:
        """Called about once a second: follow wall-clock steps in log timestamps, and write the
        rate-limit rows of the seconds that are over."""
        self._wall_offset = time.time() - time.monotonic()
        self.refused.flush(self.config.mode, time.time())

    def close(self) -> None:
        """Before the log closes: the rate-limit counts still held become rows."""
        self.refused.flush(self.config.mode)

    def use(self, config: Config) -> list:
        """Switch to a new policy. Queries already in flight finish under the old one.

        Returns the memos it dropped: the caller may free them off the event loop (a few
        hundred thousand entries take milliseconds to deallocate)."""
        garbage = [getattr(self, name, None) for name in ("_views", "_memo", "_fast", "_deny_opts")]
        self.config = config
        old = getattr(self, "upstream", None)
        if old is not None and old.servers == tuple(config.upstream.servers):
            old.timeout = config.upstream.timeout  # keep the socket pools
        else:
            self.upstream = Upstream(config.upstream.servers, config.upstream.timeout, self.upstream_stats,
                                     self.tap, old.broken if old is not None else None)
            if old is not None:
                old.retire()
        self.cleaner = Cleaner(config.cache.negative_max_ttl, config.allow_cidrs)
        self.cache.max_entries = config.cache.max_entries
        self.cache.stale_max = config.cache.stale_max
        rate = config.server.rate_limit
        if not rate:
            self.limiter = None
        elif self.limiter is None or self.limiter.rate != rate:
            self.limiter = RateLimiter(rate)
        self._views: dict[str, ClientView] = {}
        self._memo: dict[int, dict[bytes, Decision]] = {}
        self._deny_opts: dict[tuple[Decision, int, str | None], bytes] = {}
        self._fast: dict[tuple[str, bytes], tuple] = {}
        # No EDE text for strangers: keep the answer to an unknown client small (no amplification).
        self._refused_opts = {do: wire.opt_record(do, wire.ede_option(wire.EDE_PROHIBITED, ""))
                              for do in (0, 0x80)}
        self._named = named_networks(config)
        return garbage

    def view(self, ip: str) -> ClientView:
        v = self._views.get(ip)
        if v is None:
            v = self._classify(ip)
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            self._views[ip] = v
        return v

    def _classify(self, ip: str) -> ClientView:
        return classify(self.config, ip, self._named, self._memo)

    @staticmethod
    def view_for(config: Config, ip: str) -> ClientView:
        """How ``config`` treats client ``ip`` (for `dnsguard check --client`)."""
        return classify(config, ip, named_networks(config))

    def _deny_opt(self, d: Decision, do: int, label: str | None) -> bytes:
        key = (d, do, label)
        opt = self._deny_opts.get(key)
        if opt is None:
            who = f"dnsguard policy {label!r}" if label else "dnsguard policy"
            why = f"denied by rule {d.rule!r}" if d.rule else "not on the allow list"
            opt = wire.opt_record(do, wire.ede_option(wire.EDE_BLOCKED, f"{who}: {why}"))
            self._deny_opts[key] = opt
        return opt

    # -- the path ---------------------------------------------------------------------

    def handle(self, data: bytes, ip: str, transport: str) -> Handled:
        """Answer one packet: bytes to send, None to stay silent, or a Pending for a miss.

        One function on purpose: every call layer costs on the hot path.
        """
        t0 = time.monotonic()
        try:
            limiter = self.limiter
            if limiter is not None:
                refused = limiter.check(ip, t0)
                if refused:
                    return self._limited(data, ip, transport, t0, refused == LIMITED_SHARED)
            if transport == "udp":
                # A UDP query whose bytes after the ID this client sent before gets the same
                # answer again: a denial always (until the policy changes: `use` drops the
                # memo), a cache hit while its entry is live and of the same age in seconds.
                # Only the ID differs. Parsing, policy and building are skipped, never checks:
                # these bytes passed every one of them when the answer was made.
                fast = self._fast.get((ip, data[2:]))
                if fast is not None:
                    entry, tail, fields, age, key, note, mkey = fast
                    if entry is None or (entry.live and entry.expires > t0 and int(t0 - entry.stored) == age):
                        if entry is not None:
                            self.cache.touch(key)
                        counts = self.counts
                        if counts is not None:
                            counts[mkey] = counts.get(mkey, 0) + 1
                        submit = self.submit
                        if submit is not None:
                            submit((t0 + self._wall_offset, ip, "udp", *fields,
                                    (time.monotonic() - t0) * 1000.0, note))
                        return data[:2] + tail
            try:
                name_end, qend, qtype, qclass, udp_size, do = wire.parse_query(data)
            except wire.BadQuery as bad:
                return self._bad(data, ip, transport, t0, bad)
            view = self._views.get(ip) or self.view(ip)
            qname = data[12:name_end].lower()
            if not view.served:
                resp = wire.local_answer(data, qend, wire.REFUSED, udp_size, do, self._refused_opts[do])
                self._log(t0, ip, transport, qname, qtype, None, view.mode, None, wire.REFUSED, None, False,
                          "client not in [server] clients")
                return resp
            d = view.decisions.get(qname) or view.decide(qname)
            if not d.allowed and not view.audit:
                resp = wire.local_answer(data, qend, wire.NXDOMAIN, udp_size, do,
                                         self._deny_opt(d, do, view.label) if udp_size else None)
                if udp_size and transport == "udp" and len(resp) > min(udp_size, wire.EDNS_PAYLOAD):
                    # A long rule name in the EDE text must not push the answer past the
                    # client's size (RFC 6891): answer without the text rather than truncated.
                    resp = wire.local_answer(data, qend, wire.NXDOMAIN, udp_size, do,
                                             wire.opt_record(do, wire.ede_option(wire.EDE_BLOCKED, "")))
                counts = self.counts
                if counts is not None:
                    mkey = ("deny", view.mode, transport, wire.NXDOMAIN)
                    counts[mkey] = counts.get(mkey, 0) + 1
                submit = self.submit
                if submit is not None:  # inlined self._log: this is the hot path
                    submit((t0 + self._wall_offset, ip, transport, qname, qtype, "deny", view.mode, d.rule,
                            wire.NXDOMAIN, None, False, (time.monotonic() - t0) * 1000.0, None))
                if transport == "udp":
                    self._remember(ip, data, resp, None, (qname, qtype, "deny", view.mode, d.rule,
                                                          wire.NXDOMAIN, None, False), 0, b"", None)
                return resp
            if qclass != wire.CLASS_IN or qtype in _META_TYPES:
                rcode = wire.REFUSED if qclass != wire.CLASS_IN else wire.NOTIMP
                self._log(t0, ip, transport, qname, qtype, d.verdict, view.mode, d.rule, rcode, None, False,
                          "class/type not served")
                return wire.local_answer(data, qend, rcode, udp_size, do)
            if qtype == wire.TYPE_ANY:  # RFC 8482: a minimal answer, not forwarded
                self._log(t0, ip, transport, qname, qtype, d.verdict, view.mode, d.rule, wire.NOERROR, None,
                          False, "ANY (RFC 8482)")
                return wire.local_answer(data, qend, wire.NOERROR, udp_size, do, None, wire.HINFO_RFC8482, 1)
            key = qname + data[name_end:qend] + (b"\x01" if do else b"\x00")
            entry = self.cache.get(key, t0)
            if entry is not None:
                if self.feeder is not None and entry.addrs:
                    self._feed(entry, qname, t0)
                resp = entry.response(data, qend, udp_size, do, t0)
                if transport == "udp" and len(resp) > (min(udp_size, wire.EDNS_PAYLOAD) if udp_size else 512):
                    resp = wire.truncated(resp, qend, udp_size, do)
                counts = self.counts
                if counts is not None:
                    mkey = (d.verdict, view.mode, transport, entry.rcode)
                    counts[mkey] = counts.get(mkey, 0) + 1
                submit = self.submit
                if submit is not None:  # inlined self._log: this is the hot path
                    submit((t0 + self._wall_offset, ip, transport, qname, qtype, d.verdict, view.mode, d.rule,
                            entry.rcode, entry.answers_json, True, (time.monotonic() - t0) * 1000.0,
                            entry.note))
                if transport == "udp" and self.feeder is None:  # with a feeder every answer feeds the sets
                    self._remember(ip, data, resp, entry, (qname, qtype, d.verdict, view.mode, d.rule,
                                                           entry.rcode, entry.answers_json, True),
                                   int(t0 - entry.stored), key, entry.note)
                return resp
            if self._stale_until and d.allowed and self._stale_until.get(key, 0.0) > t0:
                resp = self._stale(data, ip, transport, t0, name_end, qend, qtype, udp_size, do, key, qname,
                                   view, d, True)
                if resp is not None:
                    return resp
            if self.waiting >= MAX_WAITING:
                self._log(t0, ip, transport, qname, qtype, d.verdict, view.mode, d.rule, wire.SERVFAIL, None,
                          False, f"overloaded: {MAX_WAITING} queries already waiting for upstream")
                return wire.local_answer(data, qend, wire.SERVFAIL, udp_size, do)
            self.waiting += 1
            return self._miss(data, ip, transport, t0, name_end, qend, qtype, udp_size, do, key, qname,
                              view, d)
        except Exception:  # a bug must cost one answer, never the server
            traceback.print_exc(file=sys.stderr)
            self._log(t0, ip, transport, None, None, None, "enforce", None, wire.SERVFAIL, None,
                      False, "internal error")
            return wire.error_answer(data, wire.SERVFAIL) if len(data) >= 12 else None

    def _remember(self, ip: str, data: bytes, resp: bytes, entry: Entry | None, fields: tuple, age: int,
                  key: bytes, note: str | None) -> None:
        if len(data) > _FAST_QUERY_MAX or len(resp) > _FAST_ANSWER_MAX:
            return
        fast = self._fast
        if len(fast) >= _MAX_FAST:
            fast.clear()  # bounded: a client cycling through names only costs re-memoising
        # fields: (qname, qtype, verdict, mode, rule, rcode, answers, cached); the metrics key is
        # made here once, not on every memoised answer.
        fast[(ip, data[2:])] = (entry, resp[2:], fields, age, key, note,
                                (fields[2], fields[3], "udp", fields[5]))

    def _miss(self, data: bytes, ip: str, transport: str, t0: float, name_end: int, qend: int, qtype: int,
              udp_size: int, do: int, key: bytes, qname: bytes, view: ClientView, d: Decision) -> Handled:
        """Ask upstream, or join the resolution of the same key under way."""
        w = Pending(data, ip, transport, t0, name_end, qend, qtype, udp_size, do, key, qname, view, d)
        fetch = self._inflight.get(key)
        if fetch is not None:
            if not fetch.orphaned():
                fetch.waiters.append(w)
                return w
            fetch.cancel()  # its event loop is gone: its queries are logged as cut off
        if len(self._inflight) >= self.max_inflight:
            busy = UpstreamError(f"overloaded: {self.max_inflight} upstream queries already in flight")
            self._answer(w, None, busy)
            return w.resp
        self._fetch(key, qname + data[name_end:qend], len(qname), do, w)
        return w.resp if w.settled else w  # every upstream failed at once: answered already

    def _fetch(self, key: bytes, question: bytes, name_len: int, do: int, waiter: Pending | None) -> None:
        """Start the one upstream resolution for ``key``; ``waiter`` (if any) is answered by it."""
        fetch = self._inflight[key] = Fetch(self, key, question, name_len, do)
        if waiter is not None:
            fetch.waiters.append(waiter)
        fetch.start()

    def _answer(self, w: Pending, entry: Entry | None, exc: BaseException | None) -> None:
        """Answer a query whose miss is over: from ``entry``, or after ``exc``. Never raises."""
        data, qend, udp_size, do, transport, d = w.data, w.qend, w.udp_size, w.do, w.transport, w.d
        note = None
        try:
            if entry is not None:
                now = time.monotonic()
                if self.feeder is not None and entry.addrs:
                    self._feed(entry, w.qname, now)
                resp = entry.response(data, qend, udp_size, do, now)
                rcode, answers, note = entry.rcode, entry.answers_json, entry.note
            elif isinstance(exc, UpstreamError):
                if d.allowed and self.cache.stale_max:
                    stale = self._stale(data, w.ip, transport, w.t0, w.name_end, qend, w.qtype, udp_size, do,
                                        w.key, w.qname, w.view, d, False)
                    if stale is not None:
                        self._settle(w, stale)
                        return
                note = f"upstream: {exc}"
                rcode, answers = wire.SERVFAIL, None
                resp = wire.local_answer(data, qend, wire.SERVFAIL, udp_size, do,
                                         _UPSTREAM_FAILED[exc.unparseable, do] if udp_size else None)
            elif isinstance(exc, asyncio.CancelledError):  # shutdown cut it off: no answer, still its row
                resp, rcode, answers, note = None, None, None, "cancelled at shutdown"
            else:
                traceback.print_exception(exc, file=sys.stderr)
                note = "internal error"
                rcode, answers = wire.SERVFAIL, None
                resp = wire.local_answer(data, qend, wire.SERVFAIL, udp_size, do)
            if (resp is not None and transport == "udp"
                    and len(resp) > (min(udp_size, wire.EDNS_PAYLOAD) if udp_size else 512)):
                resp = wire.truncated(resp, qend, udp_size, do)
            self._log(w.t0, w.ip, transport, w.qname, w.qtype, d.verdict, w.view.mode, d.rule, rcode, answers,
                      False, note)
        except Exception:  # a bug must cost one answer, never the others waiting on this key
            traceback.print_exc(file=sys.stderr)
            self._log(w.t0, w.ip, transport, None, None, None, "enforce", None, wire.SERVFAIL, None,
                      False, "internal error")
            resp = wire.error_answer(data, wire.SERVFAIL)
        self._settle(w, resp)

    def _settle(self, w: Pending, resp: bytes | None) -> None:
        self.waiting -= 1
        drained = self._drained
        if drained is not None and not self.waiting and not drained.done():
            drained.set_result(None)
        try:
            w.settle(resp)
        except Exception:  # the server's send: never into the socket pool's reader
            traceback.print_exc(file=sys.stderr)

    def _store(self, key: bytes, cleaned: Cleaned) -> Entry:
        """Cache what upstream answered (within [cache] min/max TTL) and return its entry."""
        cache_cfg = self.config.cache
        ttl = cleaned.cache_ttl
        if ttl:
            ttl = max(cache_cfg.min_ttl, min(ttl, cache_cfg.max_ttl))
        entry = Entry(cleaned.rcode, cleaned.an, cleaned.ns, cleaned.ar, cleaned.body, cleaned.offsets,
                      cleaned.ttls, ttl, time.monotonic(), cleaned.answers_json, cleaned.addrs,
                      f"rebinding: stripped {', '.join(cleaned.stripped)}" if cleaned.stripped else None)
        if ttl > 0:
            self.cache.put(key, entry)
        if self._stale_until:
            self._stale_until.pop(key, None)
        return entry

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for every query waiting on upstream to be answered."""
        if not self.waiting:
            return
        self._drained = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._drained, timeout)
        except TimeoutError:
            pass
        finally:
            self._drained = None

    def cancel_pending(self) -> None:
        """Shutdown: the misses still under way are logged as cut off and get no answer."""
        for fetch in list(self._inflight.values()):
            fetch.cancel()

    def _stale(self, data: bytes, ip: str, transport: str, t0: float, name_end: int, qend: int, qtype: int,
               udp_size: int, do: int, key: bytes, qname: bytes, view: ClientView, d: Decision,
               refresh: bool) -> bytes | None:
        """Answer from the expired entry for ``key``, if there is one young enough (RFC 8767)."""
        now = time.monotonic()
        entry = self.cache.stale(key, now)
        if entry is None:
            self._stale_until.pop(key, None)
            return None
        if refresh:
            # One refresh at a time per key, nobody waiting on it (a Fetch with no waiters).
            if key not in self._inflight and len(self._inflight) < self.max_inflight:
                self._fetch(key, qname + data[name_end:qend], len(qname), do, None)
        else:  # every upstream just failed: answer stale at once for a while
            if len(self._stale_until) >= _MAX_STALE_KEYS:
                self._stale_until.clear()
            self._stale_until[key] = now + STALE_RECHECK_S
        if self.feeder is not None and entry.addrs:
            # The client is told STALE_TTL: the set entries must last that long, not the
            # expired record's (negative) remainder.
            self._feed(entry, qname, now, STALE_TTL)
        self.stale_answers += 1
        resp = entry.stale_response(data, qend, udp_size, do)
        if transport == "udp" and len(resp) > (min(udp_size, wire.EDNS_PAYLOAD) if udp_size else 512):
            resp = wire.truncated(resp, qend, udp_size, do)
        self._log(t0, ip, transport, qname, qtype, d.verdict, view.mode, d.rule, entry.rcode,
                  entry.answers_json, True, "stale")
        return resp

    def _feed(self, entry: Entry, qname: bytes, now: float, ttl: int | None = None) -> None:
        try:
            self.feeder.feed(entry, qname, now, ttl)
        except Exception as exc:  # the fence must not take DNS down with it
            print(f"dnsguard: firewall set update failed: {exc}", file=sys.stderr)

    # -- outcomes that are not answers ------------------------------------------------

    def _limited(self, data: bytes, ip: str, transport: str, t0: float, shared: bool) -> bytes | None:
        """Past the client's rate: counted for one row a second, REFUSED with EDE 18, no text."""
        mode = self.config.mode
        self.refused.count(ip, transport, t0 + self._wall_offset, mode, shared)
        try:
            _, qend, _, _, udp_size, do = wire.parse_query(data)
        except wire.BadQuery:
            self._count(None, mode, transport, None)
            return None  # over its rate and not even a valid query: not worth a packet
        self._count(None, mode, transport, wire.REFUSED)
        return wire.local_answer(data, qend, wire.REFUSED, udp_size, do,
                                 self._refused_opts[do] if udp_size else None)

    def _bad(self, data: bytes, ip: str, transport: str, t0: float, bad: wire.BadQuery) -> bytes | None:
        rcode = bad.rcode
        if rcode is None:
            resp = None
        elif rcode == wire.BADVERS:
            resp = wire.badvers_answer(data, bad.question_end)
        else:
            resp = wire.error_answer(data, rcode)
        # Log what could be read: a question that parsed before the packet went wrong is evidence.
        ne = bad.name_end
        qname = data[12:ne].lower() if ne else None
        qtype = int.from_bytes(data[ne:ne + 2], "big") if ne and ne + 2 <= len(data) else None
        self._log(t0, ip, transport, qname, qtype, None, self.config.mode, None, rcode, None, False,
                  f"{'dropped' if rcode is None else 'malformed'}: {bad.reason}")
        return resp

    def _count(self, verdict: str | None, mode: str, transport: str, rcode: int | None) -> None:
        """One answer for /metrics (the hot paths inline this: a call costs there)."""
        counts = self.counts
        if counts is not None:
            mkey = (verdict, mode, transport, rcode)
            counts[mkey] = counts.get(mkey, 0) + 1

    def _log(self, t0: float, ip: str, transport: str, qname: bytes | None, qtype: int | None,
             verdict: str | None, mode: str, rule: str | None, rcode: int | None, answers: str | None,
             cached: bool, note: str | None) -> None:
        self._count(verdict, mode, transport, rcode)
        submit = self.submit
        if submit is not None:
            submit((t0 + self._wall_offset, ip, transport, qname, qtype, verdict, mode, rule, rcode, answers,
                    cached, (time.monotonic() - t0) * 1000.0, note))
