"""Step 1 of learn: read the log's window into per-name and per-client evidence (and the
firewall's connection records), and judge every name with the exfiltration detector.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import dns.rdatatype

from resolver.core.errors import DnsguardError
from resolver.core.logdb import MODE_CODES, VERDICT_CODES, open_readonly, window
from resolver.policy import suspicious

DEFAULT_COLLAPSE_THRESHOLD = 10
TOP = None  # the section key of the top-level [allow] list; named clients use their name

_A, _CNAME, _AAAA = 1, 5, 28
_NOERROR, _NXDOMAIN = 0, 3
_DENY, _ALLOW = VERDICT_CODES["deny"], VERDICT_CODES["allow"]
_ENFORCE = MODE_CODES["enforce"]
_COMMENT_CLIENTS = 4
_COMMENT_NAMES = 4
_LISTED_PER_GROUP = 20


class LearnError(DnsguardError):
    """learn cannot do what was asked (no log, bad policy, result would not load)."""


# --------------------------------------------------------------------- evidence
@dataclass
class ClientStats:
    lookups: int = 0
    ok: int = 0
    first: float = float("inf")
    last: float = float("-inf")
    qtypes: Counter = field(default_factory=Counter)

    def add(self, n: int, first: float, last: float, qtype: str | None, ok: bool) -> None:
        self.lookups += n
        self.ok += n if ok else 0
        self.first = min(self.first, first)
        self.last = max(self.last, last)
        if qtype:
            self.qtypes[qtype] += n


@dataclass
class NameStats:
    """Everything the window says about one name."""

    name: str
    ok: int = 0             # answered by upstream with data (the evidence for allowing it)
    nxdomain: int = 0       # upstream said the name does not exist
    nodata: int = 0         # upstream said NOERROR without addresses
    failed: int = 0         # SERVFAIL, REFUSED, timeouts, dropped, local refusals
    denied: int = 0         # denied in enforce mode: answered locally, never asked upstream
    deny_rules: set = field(default_factory=set)     # explicit deny rules that matched (any mode)
    clients: dict = field(default_factory=dict)      # addr -> ClientStats

    def stats(self, addrs: Iterable[str] | None = None) -> ClientStats:
        """Merged stats over ``addrs`` (all clients when None)."""
        out = ClientStats()
        for addr, cs in self.clients.items():
            if addrs is None or addr in addrs:
                out.lookups += cs.lookups
                out.ok += cs.ok
                out.first = min(out.first, cs.first)
                out.last = max(out.last, cs.last)
                out.qtypes.update(cs.qtypes)
        return out

    @property
    def lookups(self) -> int:
        return sum(cs.lookups for cs in self.clients.values())

    @property
    def first(self) -> float:
        return min(cs.first for cs in self.clients.values())

    @property
    def last(self) -> float:
        return max(cs.last for cs in self.clients.values())


@dataclass
class Connection:
    """A destination the firewall would have blocked (``connections`` verdict would-block)."""

    destination: str
    count: int
    ports: set = field(default_factory=set)     # "tcp/443"
    names: set = field(default_factory=set)
    sources: set = field(default_factory=set)
    first: float = float("inf")
    last: float = float("-inf")


@dataclass
class Egress:
    """Connections the fence let through to one name from one source (conntrack rows)."""

    connections: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


@dataclass
class LogWindow:
    db_path: str
    since: float | None
    until: float | None
    client_filter: tuple[str, ...]
    names: dict[str, NameStats]
    connections: list[Connection]
    lookups: int
    # (name, source address) -> Egress; None when the log has no per-connection counters
    # (no `serve --firewall`, or a log from before connections were recorded)
    egress: dict[tuple[str, str], Egress] | None = None

    def egress_of(self, names: Iterable[str], source_ok: Callable[[str], bool] | None = None) -> Egress:
        """Summed over ``names`` and the sources ``source_ok`` accepts (every source when None)."""
        out = Egress()
        if not self.egress:
            return out
        wanted = set(names)
        for (name, source), e in self.egress.items():
            if name in wanted and (source_ok is None or source_ok(source)):
                out.connections += e.connections
                out.bytes_out += e.bytes_out
                out.bytes_in += e.bytes_in
        return out

    @property
    def clients(self) -> set[str]:
        return {a for ns in self.names.values() for a in ns.clients}


def _networks(specs: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for spec in specs:
        try:
            nets.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise LearnError(f"--client must be an IP address or CIDR, not {spec!r}") from None
    return nets


def _addr(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if text is None:
        return None
    try:
        a = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if a.version == 6 and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def _in_any(text: str | None, nets: Sequence) -> bool:
    a = _addr(text)
    return a is not None and any(a.version == n.version and a in n for n in nets)


def open_db(path: str) -> sqlite3.Connection:
    """Open a lookup log read-only (safe while `dnsguard serve` writes to it)."""
    return open_readonly(
        path, "lookup_rows", LearnError,
        missing_file=f"no lookup log at {path} (run `dnsguard serve --db {path}` first, or pass --db PATH)",
        missing_table=f"{path} is not a dnsguard lookup log (no lookup_rows table)")


def _qtype_text(code: int | None) -> str | None:
    if code is None:
        return None
    try:
        return dns.rdatatype.to_text(code)
    except (ValueError, dns.rdatatype.UnknownRdatatype):  # pragma: no cover - to_text never fails today
        return f"TYPE{code}"


def read_log(db_path: str, *, since: float | None = None, until: float | None = None,
             clients: Sequence[str] = ()) -> LogWindow:
    """Read the window ``[since, until)`` of a lookup log, grouped per name and client.

    ``clients`` (addresses or CIDRs) restricts the lookups read. Queries that were not
    a readable question, and those refused by the client ACL, are skipped.
    """
    nets = _networks(clients)
    conn = open_db(db_path)
    try:
        cond, params = window(since, until, "r.ts")
        cond += ["r.name_id IS NOT NULL", "r.verdict IS NOT NULL"]
        rows = conn.execute(
            "SELECT n.name, c.addr, g.qtype, g.verdict, g.mode, u.rule, g.rcode, g.has_answers, g.clean, "
            "g.n, g.first, g.last FROM ("
            "  SELECT r.name_id, r.client_id, r.qtype, r.verdict, r.mode, r.rule_id, r.rcode,"
            "   (r.answers IS NOT NULL AND r.answers NOT IN ('', '[]')) AS has_answers,"
            "   (r.note IS NULL) AS clean, count(*) AS n, min(r.ts) AS first, max(r.ts) AS last"
            f"  FROM lookup_rows r WHERE {' AND '.join(cond)}"
            "  GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9) g "
            "JOIN names n ON n.id = g.name_id LEFT JOIN clients c ON c.id = g.client_id "
            "LEFT JOIN rules u ON u.id = g.rule_id",
            params,
        ).fetchall()
        connections = _read_connections(conn, since, until, nets)
        egress = _read_egress(conn, since, until, nets)
    except sqlite3.Error as exc:
        raise LearnError(f"reading {db_path} failed: {exc}") from None
    finally:
        conn.close()

    names: dict[str, NameStats] = {}
    total = 0
    for (name, addr, qtype, verdict, mode, rule, rcode, has_answers, clean, n, first,
         last) in rows:
        if nets and not _in_any(addr, nets):
            continue
        total += n
        ns = names.get(name)
        if ns is None:
            ns = names[name] = NameStats(name)
        local_deny = verdict == _DENY and mode == _ENFORCE
        ok = False
        if verdict == _DENY and rule is not None:
            ns.deny_rules.add(rule)
        if local_deny:
            ns.denied += n
        elif rcode == _NOERROR and clean and (has_answers or qtype not in (_A, _AAAA, _CNAME)):
            ok = True
            ns.ok += n
        elif rcode == _NOERROR and clean:
            ns.nodata += n
        elif rcode == _NXDOMAIN and clean:
            ns.nxdomain += n
        else:
            ns.failed += n
        key = addr or "?"
        cs = ns.clients.get(key)
        if cs is None:
            cs = ns.clients[key] = ClientStats()
        cs.add(n, first, last, _qtype_text(qtype), ok)
    return LogWindow(db_path, since, until, tuple(clients), names, connections, total, egress)


def _read_egress(conn: sqlite3.Connection, since: float | None, until: float | None,
                 nets: Sequence) -> dict[tuple[str, str], Egress] | None:
    cols = {r[1] for r in conn.execute("PRAGMA table_info(connections)")}
    if "bytes_out" not in cols:
        return None
    # Connections recorded at all (any time): otherwise `serve --firewall` never ran on this
    # log, and "0 connections" would be a claim nobody measured.
    if conn.execute("SELECT 1 FROM connections WHERE bytes_out IS NOT NULL LIMIT 1").fetchone() is None:
        return None
    cond, params = window(since, until)
    cond += ["verdict IN ('allowed', 'would-block')", "name IS NOT NULL"]
    out: dict[tuple[str, str], Egress] = {}
    for name, source, n, bytes_out, bytes_in in conn.execute(
        "SELECT name, source, count(*), sum(coalesce(bytes_out, 0)), sum(coalesce(bytes_in, 0)) "
        f"FROM connections WHERE {' AND '.join(cond)} GROUP BY name, source", params,
    ):
        if nets and not _in_any(source, nets):
            continue
        out[(name, source or "?")] = Egress(n, bytes_out, bytes_in)
    return out


def _read_connections(conn: sqlite3.Connection, since: float | None, until: float | None,
                      nets: Sequence) -> list[Connection]:
    cols = {r[1] for r in conn.execute("PRAGMA table_info(connections)")}
    if not {"ts", "source", "destination", "protocol", "port", "verdict", "name"} <= cols:
        return []
    cond, params = window(since, until)
    cond += ["verdict = 'would-block'", "destination IS NOT NULL"]
    out: dict[str, Connection] = {}
    for dest, proto, port, name, source, n, first, last in conn.execute(
        "SELECT destination, protocol, port, name, source, count(*), min(ts), max(ts) FROM connections "
        f"WHERE {' AND '.join(cond)} GROUP BY destination, protocol, port, name, source", params,
    ):
        if nets and not _in_any(source, nets):
            continue
        addr = _addr(str(dest))
        if addr is None:
            continue
        c = out.get(str(addr))
        if c is None:
            c = out[str(addr)] = Connection(str(addr), 0)
        c.count += n
        if proto or port:
            c.ports.add(f"{proto or '?'}/{port if port is not None else '?'}")
        if name:
            c.names.add(name)
        if source:
            c.sources.add(source)
        c.first = min(c.first, first)
        c.last = max(c.last, last)
    return sorted(out.values(), key=lambda c: (-c.count, c.destination))


def find_suspicious(db_path: str, *, since: float | None = None, until: float | None = None,
                    clients: Sequence[str] = (),
                    thresholds: suspicious.Thresholds = suspicious.DEFAULT_THRESHOLDS,
                    ) -> list[suspicious.Finding]:
    """Exfiltration-shaped names in a lookup log's window (what `learn` refuses to allow)."""
    window = read_log(db_path, since=since, until=until, clients=clients)
    return suspicious.detect(_observations(window), thresholds)


def _observations(window: LogWindow) -> list[suspicious.Observation]:
    return [suspicious.Observation(ns.name, ns.first, ns.last, ns.lookups) for ns in window.names.values()]


