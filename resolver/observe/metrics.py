"""Prometheus ``/metrics``: figures the components count in plain integers, read at scrape time.

Nothing here runs on the query path. The chain adds one to ``Resolver.counts[(verdict,
mode, transport, rcode)]`` per answer when metrics are on (a dict update; the key of a
memoised answer is made once, with the memo); every other figure is an integer attribute
the owning component bumps anyway (``cache.hits``, ``querylog.overflow``...). A scrape runs
in prometheus_client's HTTP thread and only *reads*: copies of dicts (atomic under the GIL)
and ints. Kernel figures (ipset entries) are asked over a netlink socket of the scrape's
own, never the event loop's.

Adding a figure: give the component a plain counter, write a reader here that turns it into
metric families, and register the reader in ``resolver.app`` (``Metrics.add``).
"""

from __future__ import annotations

import platform
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from resolver import __version__
from resolver.core.errors import DnsguardError
from resolver.core.logdb import open_readonly

Reader = Callable[[], Iterable[Metric]]

RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
               16: "BADVERS"}


def _rcode(rc: int | None) -> str:
    return "none" if rc is None else RCODE_NAMES.get(rc, str(rc))


def counter(name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> Metric:
    fam = CounterMetricFamily(name, doc, labels=labels)
    for values, v in samples:
        fam.add_metric(values, v)
    return fam


def gauge(name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> Metric:
    fam = GaugeMetricFamily(name, doc, labels=labels)
    for values, v in samples:
        fam.add_metric(values, v)
    return fam


# ------------------------------------------------------------------------ readers
def build_reader() -> Iterator[Metric]:
    info = InfoMetricFamily("dnsguard_build", "dnsguard version and the Python running it.",
                            labels=["version", "python", "implementation"])
    info.add_metric([__version__, platform.python_version(), sys.implementation.name], {})
    yield info


def query_reader(resolver: Any) -> Reader:
    """``resolver.counts``: (verdict, mode, transport, rcode) -> queries."""
    def read() -> Iterator[Metric]:
        snap = dict(resolver.counts or {})
        rows = ([[v or "none", m or "", t or "", _rcode(rc)], n]
                for (v, m, t, rc), n in sorted(snap.items(), key=repr))
        yield counter("dnsguard_queries", "Queries answered (or dropped), by policy verdict, mode, transport "
                      "and response code. verdict=none: no policy decision (a malformed packet, or a client "
                      "not allowed to ask: the rcode says which); "
                      "rcode=none: no answer was sent.", ["verdict", "mode", "transport", "rcode"], rows)
    return read


def resolver_reader(resolver: Any) -> Reader:
    """The chain's own integers: the answer cache, upstream exchanges, queries waiting."""
    def read() -> Iterator[Metric]:
        cache = resolver.cache
        yield counter("dnsguard_cache_hits", "Answers served from the cache (memoised answers included).",
                      [], [([], cache.hits)])
        yield counter("dnsguard_cache_misses", "Cache lookups that found nothing live (then asked upstream).",
                      [], [([], cache.misses)])
        yield gauge("dnsguard_cache_entries", "Entries in the answer cache.", [], [([], len(cache))])
        yield gauge("dnsguard_cache_bytes", "Approximate size of the answer cache.", [], [([], cache.bytes)])
        yield gauge("dnsguard_upstream_waiting", "Client queries waiting for an upstream answer.", [],
                    [([], resolver.waiting)])
        stats = resolver.upstream_stats
        hist = HistogramMetricFamily("dnsguard_upstream_duration_seconds",
                                     "Time from sending a query upstream to its reply, per server.",
                                     labels=["server"])
        for server, (buckets, total) in sorted(stats.snapshot().items()):
            cumulative, acc = [], 0
            for le, n in zip(stats.bounds, buckets, strict=False):
                acc += n
                cumulative.append((repr(float(le)), acc))
            acc += buckets[-1]
            cumulative.append(("+Inf", acc))
            hist.add_metric([server], cumulative, total)
        yield hist
        yield counter("dnsguard_stale_answers", "Answers served stale (RFC 8767: every upstream failed, "
                      "an expired entry answered with TTL 30 and EDE 3).", [], [([], resolver.stale_answers)])
        yield counter("dnsguard_rate_limited", "Queries refused by the per-client [server] rate_limit.", [],
                      [([], resolver.refused.total)])
        yield counter("dnsguard_upstream_errors", "Upstream exchanges that failed, by server and kind "
                      "(timeout, network, malformed, rcode).", ["server", "kind"],
                      ([[s, k], n] for (s, k), n in sorted(dict(stats.errors).items())))
    return read


def log_reader(querylog: Any) -> Reader:
    def read() -> Iterator[Metric]:
        yield counter("dnsguard_log_rows_handed", "Lookup-log rows handed to the writer process.", [],
                      [([], querylog.handed)])
        yield gauge("dnsguard_log_queue_depth", "Lookup-log rows waiting in the server for the writer.", [],
                    [([], len(querylog._pending))])
        yield counter("dnsguard_log_overflow", "Lookups not logged because the log queue was full.", [],
                      [([], querylog.overflow)])
    return read


def fence_reader(fence: Any) -> Reader:
    def read() -> Iterator[Metric]:
        feeder = fence.feeder
        yield counter("dnsguard_fence_feeds", "Answers whose addresses were sent to the firewall sets.", [],
                      [([], fence.feeds)])
        yield counter("dnsguard_fence_feed_errors", "Set additions the kernel refused.", [],
                      [([], feeder.errors)])
        yield gauge("dnsguard_fence_set_entries", "Addresses in the firewall sets, per family.", ["family"],
                    ([[fam], n] for fam, n in sorted(fence.set_entries().items())))
        rec = fence.recorder
        if rec is not None:
            yield counter("dnsguard_fence_blocked_recorded", "Blocked connection attempts recorded (NFLOG).",
                          [], [([], rec.recorded)])
            yield counter("dnsguard_fence_nflog_overruns", "NFLOG buffer overruns (attempts not recorded).",
                          [], [([], rec.overruns)])
        conn = fence.connections
        if conn is not None:
            yield gauge("dnsguard_connection_recorder_up", "1 while the conntrack recorder process runs; 0 "
                        "while it is down (connections are not recorded meanwhile).", [],
                        [([], int(conn.up))])
            yield counter("dnsguard_connection_recorder_restarts", "Times the conntrack recorder process "
                          "died and was restarted.", [], [([], conn.restarts)])
            yield counter("dnsguard_connection_names_lost", "Addresses whose name could not be handed to the "
                          "recorder (their connections may be recorded without a name).", [],
                          [([], conn.lost_notes)])
    return read


def policy_reader(app: Any) -> Reader:
    """The loaded policy (``app.config``) and reloads (``app.reloads``: result -> count)."""
    def read() -> Iterator[Metric]:
        cfg = app.config
        rules = cfg.matcher.rule_count + sum(c.matcher.rule_count for c in cfg.clients)
        yield gauge("dnsguard_policy_rules", "Rules in the loaded policy ([[clients]] matchers included).",
                    [], [([], rules)])
        yield counter("dnsguard_policy_reloads", "Policy reloads by result (ok, rejected).", ["result"],
                      ([[r], n] for r, n in sorted(dict(app.reloads).items())))
        info = InfoMetricFamily("dnsguard_policy", "The loaded policy: its SHA-256, mode and file.",
                                labels=["sha256", "mode", "path"])
        info.add_metric([cfg.sha256, cfg.mode, cfg.path], {})
        yield info
    return read


def dnstap_reader(writer: Any) -> Reader:
    def read() -> Iterator[Metric]:
        yield counter("dnsguard_dnstap_sent", "dnstap messages written to the collector.", [],
                      [([], writer.sent)])
        yield counter("dnsguard_dnstap_dropped",
                      "dnstap events (1-2 messages each) dropped: queue full, collector away.", [],
                      [([], writer.dropped)])
        yield counter("dnsguard_dnstap_connects", "Frame Streams sessions opened with the collector.", [],
                      [([], writer.connects)])
        yield gauge("dnsguard_dnstap_connected", "1 while a collector session is open.", [],
                    [([], 1 if writer.connected else 0)])
        yield gauge("dnsguard_dnstap_queue_depth", "dnstap messages waiting for the writer.", [],
                    [([], writer.depth())])
    return read


def _max_connection_id(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT coalesce(max(id), 0) FROM connections").fetchone()[0]


class LogFigures:
    """Figures only the log database knows, read at scrape time over a read-only connection:
    rows the writer deleted for ``[log] max_size_mb`` (it runs in its own process) and the
    connections the conntrack recorder wrote (also its own process).

    Connections are counted incrementally by row id from the moment this reader is made, so a
    scrape reads only the rows written since the last one. Scrapes may come from several HTTP
    threads at once; one lock serialises them on the one connection.
    """

    def __init__(self, path: str, connections: bool) -> None:
        self.path = path
        self.connections = connections
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._by_verdict: dict[str, int] = {}
        # Highest connections.id counted; None until the database can be read.
        self._mark: int | None = self._read(_max_connection_id, None)

    def _read(self, query: Callable[[sqlite3.Connection], Any], default: Any) -> Any:
        """Run ``query``; the database may not exist yet, or lack a table an older one lacks."""
        try:
            if self._conn is None:
                self._conn = open_readonly(self.path, "lookup_rows", DnsguardError, missing_file="not yet",
                                           missing_table="not yet", timeout=1.0)
            return query(self._conn)
        except (sqlite3.Error, DnsguardError):
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            return default

    def __call__(self) -> Iterator[Metric]:
        with self._lock:
            lookups = self._read(lambda c: c.execute(
                "SELECT coalesce(sum(dropped), 0) FROM log_size_drops").fetchone()[0], 0)
            conns = self._read(lambda c: c.execute(  # schema 6; an older log has no such column
                "SELECT coalesce(sum(connections), 0) FROM log_size_drops").fetchone()[0], 0)
            families = [counter("dnsguard_log_size_dropped", "Rows the writer deleted, oldest first, to keep "
                                "the log under [log] max_size_mb, by table (lookups, connections).",
                                ["table"],
                                [(["lookups"], lookups), (["connections"], conns)])]
            if self.connections:
                families += self._connection_families()
        yield from families

    def _connection_families(self) -> list[Metric]:
        if self._mark is None:
            self._mark = self._read(_max_connection_id, None)
        if self._mark is not None:
            rows = self._read(lambda c: c.execute(
                "SELECT verdict, count(*), max(id) FROM connections WHERE id > ? GROUP BY verdict",
                (self._mark,)).fetchall(), [])
            for verdict, n, top in rows:
                self._by_verdict[verdict] = self._by_verdict.get(verdict, 0) + n
                self._mark = max(self._mark, top)
        lost = self._read(lambda c: c.execute("SELECT coalesce(sum(dropped), 0), coalesce(sum(overruns), 0) "
                                              "FROM connection_overflow").fetchone(), (0, 0))
        open_now = self._read(lambda c: c.execute(
            "SELECT count(*) FROM connections WHERE end_ts IS NULL").fetchone()[0], 0)
        return [
            counter("dnsguard_connections", "Outbound connections of the fenced agent recorded since start, "
                    "by verdict (allowed, blocked, would-block).", ["verdict"],
                    ([[v], n] for v, n in sorted(self._by_verdict.items()))),
            gauge("dnsguard_connections_open", "Recorded connections still open.", [], [([], open_now)]),
            counter("dnsguard_connections_unrecorded", "Connections the recorder could not record.", [],
                    [([], lost[0])]),
            counter("dnsguard_conntrack_overruns", "conntrack event buffer overruns (each answered by a "
                    "resync dump).", [], [([], lost[1])]),
        ]


# ------------------------------------------------------------------------ serving
class Metrics:
    """The registry of readers, and the HTTP endpoint that runs them on each scrape."""

    def __init__(self) -> None:
        self.readers: list[Reader] = [build_reader]
        self.read_errors = 0
        self._server: Any = None
        self.port = 0

    def add(self, reader: Reader) -> None:
        self.readers.append(reader)

    def collect(self) -> Iterator[Metric]:
        for read in self.readers:
            try:
                # Whole families only: a reader that fails half-way must not emit a partial family.
                families = list(read())
            except Exception as exc:  # one broken figure must not hide the others
                self.read_errors += 1
                print(f"dnsguard: metrics: {getattr(read, '__qualname__', read)} failed: {exc!r}",
                      file=sys.stderr, flush=True)
                continue
            yield from families
        yield counter("dnsguard_metrics_read_errors", "Metric readers that raised during a scrape.", [],
                      [([], self.read_errors)])

    def start(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on host:port from a daemon thread; return the bound port."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)  # type: ignore[arg-type]
        ProcessCollector(registry=registry)  # process_* (CPU, memory, open fds): read from /proc per scrape
        self._server, _ = start_http_server(port, host, registry)
        self.port = self._server.server_port
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
