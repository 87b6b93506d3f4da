"""`dnsguard learn`: turn what an agent looked up into a reviewed, commented policy.

Run the agent against ``dnsguard serve --mode audit --db log.db`` for a while, then
``dnsguard learn --db log.db --output policy.toml``. The steps, each a function here:

1. :func:`read_log` -- one pass over the lookup log's window, grouped per name and
   client, plus the firewall's ``connections`` table (issue #5) when it exists.
2. :func:`plan` -- decide, per policy section (top-level ``[allow]`` or one
   ``[[clients]]`` entry), what to add and what to leave out, and why:

   * a name is *learned* when upstream answered it: rcode NOERROR with addresses or
     a CNAME (for A/AAAA/CNAME questions; other types cannot show their data in the
     log, so NOERROR is enough), with verdict allow or deny-in-audit-mode. Denials in
     enforce mode were answered locally and prove nothing about the name.
   * names upstream only ever answered NXDOMAIN (typos, search-domain expansions
     such as ``pypi.org.lan``), names with no usable answer (SERVFAIL, NODATA),
     names only ever denied in enforce mode, and names an explicit deny rule covers
     are left out and listed in comments;
   * exfiltration-shaped names (:mod:`resolver.suspicious`, judged over *every* name
     looked up, whatever the answer -- a query leaks even when it fails) are never
     allowed: they are listed in comments with the reason and counts;
   * a wildcard ``*.parent`` replaces exact names only when at least
     ``collapse_threshold`` distinct learned names sit below ``parent``, ``parent`` is
     at or below its registrable domain (never ``*.com``, ``*.co.uk``, ``*.github.io``,
     ``*.s3.amazonaws.com``: the public-suffix list decides, private section
     included), no public suffix sits below ``parent`` (never ``*.amazonaws.com``,
     which would cover every S3 bucket), and no suspicious name sits below it.
     Deeper parents win.

3. :func:`render_new`, :func:`merge` (tomlkit: the existing file's comments and order
   are kept, new entries are appended with a comment each) or :func:`render_diff`.

Every policy produced is checked with :func:`resolver.config.parse_config` before it
is returned, and the allow lists are compared with what was intended.
"""

from __future__ import annotations

import ipaddress
import re
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dns.rdatatype
import tomlkit
from tomlkit.items import AoT, Array, Table

from resolver.core.errors import DnsguardError, PolicyError
from resolver.core.logdb import MODE_CODES, VERDICT_CODES, open_readonly, window
from resolver.core.names import text_to_wire
from resolver.policy import suspicious
from resolver.policy.config import Config, parse_config
from resolver.policy.matcher import Matcher, compile_rule

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
class LogWindow:
    db_path: str
    since: float | None
    until: float | None
    client_filter: tuple[str, ...]
    names: dict[str, NameStats]
    connections: list[Connection]
    lookups: int

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
    return LogWindow(db_path, since, until, tuple(clients), names, connections, total)


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


# ------------------------------------------------------------------------- plan
@dataclass
class Entry:
    """One rule to add: an exact name or a ``*.parent`` wildcard, with its evidence."""

    rule: str
    names: tuple[str, ...]
    lookups: int
    clients: tuple[str, ...]        # most lookups first
    qtypes: tuple[str, ...]
    first: float
    last: float

    @property
    def wildcard(self) -> bool:
        return self.rule.startswith("*.")

    def comment(self) -> str:
        parts = []
        if self.wildcard:
            shown = ", ".join(self.names[:_COMMENT_NAMES])
            more = f" +{len(self.names) - _COMMENT_NAMES} more" if len(self.names) > _COMMENT_NAMES else ""
            parts.append(f"wildcard for {len(self.names)} names ({shown}{more});")
        parts.append(_n(self.lookups, "lookup"))
        if self.qtypes:
            parts.append(f"({'/'.join(self.qtypes)})")
        parts.append(f"from {_clients_text(self.clients)};")
        parts.append(f"first {_time(self.first)}, last {_time(self.last)}")
        return _one_line(" ".join(parts))


@dataclass
class LeftOut:
    name: str
    category: str      # nxdomain | no-answer | denied | deny-rule
    detail: str
    lookups: int
    clients: tuple[str, ...]
    first: float
    last: float


@dataclass
class Plan:
    window: LogWindow
    collapse_threshold: int
    sections: dict[str | None, list[Entry]]             # what to add, per section
    already: dict[str | None, list[tuple[str, str]]]    # (name, rule that already allows it)
    left_out: list[LeftOut]
    findings: list[suspicious.Finding]
    unused: list[tuple[str | None, str]]                # existing allow rules nobody used
    connections: list[Connection]
    policy: Config | None

    def added(self) -> int:
        return sum(len(v) for v in self.sections.values())


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _clients_text(clients: Sequence[str]) -> str:
    shown = ", ".join(clients[:_COMMENT_CLIENTS])
    return shown + (f" +{len(clients) - _COMMENT_CLIENTS} more" if len(clients) > _COMMENT_CLIENTS else "")


def _time(ts: float | None) -> str:
    if ts is None or ts in (float("inf"), float("-inf")):
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(text: str) -> str:
    return _CONTROL.sub("?", text)


def _section_of(addr: str, named: list[tuple]) -> str | None:
    """Which [[clients]] entry a source address belongs to (longest prefix wins), else TOP."""
    a = _addr(addr)
    if a is None:
        return TOP
    for net, name in named:
        if a.version == net.version and a in net:
            return name
    return TOP


def _labels(name: str) -> list[str]:
    return suspicious.split_labels(name)


def _ancestors(name: str) -> list[str]:
    """Proper ancestors of ``name`` at or below its registrable domain, deepest first."""
    labels = _labels(name)
    reg = suspicious.registrable_domain(name)
    if reg is None:
        return []
    stop = len(labels) - len(_labels(reg))
    return [".".join(labels[i:]) for i in range(1, stop + 1)]


def _sort_key(rule: str) -> tuple:
    wild = rule.startswith("*.")
    labels = _labels(rule[2:] if wild else rule)
    return (tuple(reversed(labels)), 0 if wild else 1)


def collapse(names: Iterable[str], threshold: int, forbidden: Iterable[str] = ()) -> dict[str, list[str]]:
    """Group names into rules: ``{rule: [names it covers]}``.

    ``*.parent`` is proposed when at least ``threshold`` names (not yet covered by a
    deeper wildcard) sit strictly below ``parent``, ``parent`` is at or below its
    registrable domain and has no public suffix below it (so never ``*.co.uk``,
    ``*.github.io`` or ``*.amazonaws.com``), and no name in ``forbidden`` (suspicious
    names) sits below it. Everything else stays an exact name.
    """
    if threshold < 2:
        raise ValueError("collapse threshold must be at least 2")
    names = sorted(set(names))
    forbidden_parents: set[str] = set()
    for bad in forbidden:
        labels = _labels(bad)
        forbidden_parents.update(".".join(labels[i:]) for i in range(1, len(labels)))
    below: dict[str, set[str]] = defaultdict(set)
    for name in names:
        for parent in _ancestors(name):
            below[parent].add(name)
    covered: set[str] = set()
    rules: dict[str, list[str]] = {}
    # Deepest parents first: the narrowest wildcard the evidence supports.
    for parent in sorted(below, key=lambda p: (-len(_labels(p)), p)):
        members = below[parent] - covered
        if len(members) < threshold or parent in forbidden_parents:
            continue
        if not suspicious.wildcard_ok(parent):
            continue
        rule = f"*.{parent}"
        try:
            compile_rule(rule)
        except ValueError:
            continue
        rules[rule] = sorted(members)
        covered |= members
    for name in names:
        if name not in covered:
            rules[name] = [name]
    return rules


def _base_named(policy: Config | None) -> list[tuple]:
    if policy is None:
        return []
    return sorted(((net, c.name) for c in policy.clients for net in c.sources),
                  key=lambda nc: -nc[0].prefixlen)


def _matcher_for(policy: Config, section: str | None) -> Matcher:
    if section is TOP:
        return policy.matcher
    for c in policy.clients:
        if c.name == section:
            return c.matcher
    return policy.matcher


def plan(window: LogWindow, *, policy: Config | None = None,
         collapse_threshold: int = DEFAULT_COLLAPSE_THRESHOLD,
         thresholds: suspicious.Thresholds = suspicious.DEFAULT_THRESHOLDS) -> Plan:
    """Decide what to add (per section), what to leave out and why."""
    findings = suspicious.detect(_observations(window), thresholds)
    flagged = suspicious.flagged_names(findings)
    named = _base_named(policy)

    candidates: dict[str | None, dict[str, set[str]]] = defaultdict(dict)  # section -> name -> clients
    already: dict[str | None, list[tuple[str, str]]] = defaultdict(list)
    left_out: list[LeftOut] = []

    def leave(ns: NameStats, category: str, detail: str) -> None:
        st = ns.stats()
        left_out.append(LeftOut(ns.name, category, detail, st.lookups, _by_count(ns, None),
                                st.first, st.last))

    for name in sorted(window.names):
        ns = window.names[name]
        if name in flagged:
            continue  # reported through the findings
        if ns.ok == 0:
            if ns.nxdomain and not (ns.nodata or ns.failed):
                leave(ns, "nxdomain", f"NXDOMAIN x{ns.nxdomain}")
            elif ns.nxdomain or ns.nodata or ns.failed:
                bits = [f"{what} x{n}" for what, n in (("NXDOMAIN", ns.nxdomain), ("NODATA", ns.nodata),
                                                      ("failed", ns.failed)) if n]
                leave(ns, "no-answer", ", ".join(bits))
            else:
                rules = ", ".join(sorted(r for r in ns.deny_rules if r)) or "default deny"
                leave(ns, "denied", f"denied in enforce mode x{ns.denied} ({rules})")
            continue
        try:
            wire = text_to_wire(name)
        except ValueError:
            leave(ns, "no-answer", "not a name a policy can list")
            continue
        ok_clients = [a for a, cs in ns.clients.items() if cs.ok]
        sections = {_section_of(a, named) for a in ok_clients}
        if TOP in sections:
            sections = {TOP}
        if policy is None and ns.deny_rules:
            leave(ns, "deny-rule", f"matched deny rule {', '.join(sorted(ns.deny_rules))} when logged")
            continue
        for section in sorted(sections, key=lambda s: "" if s is None else s):
            if policy is not None:
                d = _matcher_for(policy, section).decide(wire)
                if d.allowed:
                    already[section].append((name, d.rule or ""))
                    continue
                if d.source == "deny":
                    leave(ns, "deny-rule", f"the policy denies it (rule {d.rule!r})")
                    continue
            members = (set(ok_clients) if section is TOP
                       else {a for a in ok_clients if _section_of(a, named) == section})
            candidates[section][name] = members

    bad_names = set(flagged)
    sections: dict[str | None, list[Entry]] = {}
    for section, names in candidates.items():
        entries = []
        for rule, members in collapse(names, collapse_threshold, bad_names).items():
            addrs = set().union(*(names[m] for m in members))
            entries.append(_entry(rule, members, addrs, window))
        entries.sort(key=lambda e: _sort_key(e.rule))
        sections[section] = entries

    connections = window.connections
    if policy is not None and policy.allow_cidrs:
        # Destinations the policy already lets through need no suggestion.
        connections = [c for c in connections if not _in_any(c.destination, policy.allow_cidrs)]
    return Plan(window, collapse_threshold, sections, dict(already), left_out, findings,
                unused_rules(window, policy) if policy is not None else [], connections, policy)


def _by_count(ns: NameStats, addrs: set[str] | None) -> tuple[str, ...]:
    items = [(a, cs) for a, cs in ns.clients.items() if addrs is None or a in addrs]
    return tuple(a for a, _ in sorted(items, key=lambda ac: (-ac[1].lookups, ac[0])))


def _entry(rule: str, members: list[str], addrs: set[str], window: LogWindow) -> Entry:
    lookups, first, last = 0, float("inf"), float("-inf")
    per_client: Counter = Counter()
    qtypes: Counter = Counter()
    for m in members:
        ns = window.names[m]
        st = ns.stats(addrs)
        lookups += st.lookups
        first, last = min(first, st.first), max(last, st.last)
        qtypes.update(st.qtypes)
        for a in addrs:
            if a in ns.clients:
                per_client[a] += ns.clients[a].lookups
    clients = tuple(a for a, _ in sorted(per_client.items(), key=lambda ac: (-ac[1], ac[0])))
    return Entry(rule, tuple(members), lookups, clients,
                 tuple(q for q, _ in sorted(qtypes.items(), key=lambda qc: (-qc[1], qc[0]))), first, last)


def unused_rules(window: LogWindow, policy: Config) -> list[tuple[str | None, str]]:
    """Allow rules of ``policy`` that no lookup in the window matched (candidates to remove).

    Top-level rules count lookups from every client; a ``[[clients]]`` entry's own
    rules count only lookups from its sources.
    """
    named = _base_named(policy)
    seen: dict[str | None, set[bytes]] = defaultdict(set)
    for ns in window.names.values():
        try:
            wire = text_to_wire(ns.name)
        except ValueError:
            continue
        seen[TOP].add(wire)
        for addr in ns.clients:
            section = _section_of(addr, named)
            if section is not TOP:
                seen[section].add(wire)

    def used(rule: str, names: set[bytes], parents: set[bytes]) -> bool:
        try:
            wild, key = compile_rule(rule)
        except ValueError:
            return True
        return key in parents if wild else key in names

    def proper_suffixes(names: set[bytes]) -> set[bytes]:
        out = set()
        for w in names:
            i = 0
            while w[i]:
                i += w[i] + 1
                out.add(w[i:])
        return out

    out: list[tuple[str | None, str]] = []
    lists: list[tuple[str | None, Sequence[str]]] = [(TOP, policy.allow_domains)]
    lists += [(c.name, c.allow) for c in policy.clients]
    for section, rules in lists:
        names = seen.get(section, set())
        parents = proper_suffixes(names)
        out.extend((section, r) for r in rules if not used(r, names, parents))
    return out


# ----------------------------------------------------------------------- render
_NEW_POLICY = """\
mode = "enforce"

[allow]
domains = []
cidrs = []

[deny]
domains = []
"""


def _header(p: Plan) -> list[str]:
    w = p.window
    window = f"{_time(w.since) if w.since is not None else 'start of log'} to " \
             f"{_time(w.until) if w.until is not None else 'now'}"
    lines = [
        f"Generated by `dnsguard learn` at {_time(time.time())} from {w.db_path}",
        f"window {window}: {w.lookups} lookups of {len(w.names)} names from {len(w.clients)} client(s)"
        + (f" (only clients {', '.join(w.client_filter)})" if w.client_filter else ""),
        "Each entry was answered by upstream during the window; its comment says how often, for which",
        "query types, from which clients, first and last seen (UTC). A wildcard stands for at least",
        f"{p.collapse_threshold} distinct names under one parent (--collapse-threshold), never at or above",
        "a public suffix. Names left out are listed at the end. Review before enforcing.",
    ]
    return lines


def _footer(p: Plan) -> list[str]:
    """Comment lines (without '# ') for everything that was not added."""
    out: list[str] = []
    by_cat: dict[str, list[LeftOut]] = defaultdict(list)
    for lo in p.left_out:
        by_cat[lo.category].append(lo)
    titles = {
        "nxdomain": "only ever NXDOMAIN from upstream (typos, search-domain expansions)",
        "no-answer": "no usable answer from upstream (SERVFAIL, NODATA, timeouts)",
        "denied": "denied in enforce mode, never resolved (add by hand if the agent needs them)",
        "deny-rule": "covered by an explicit deny rule",
    }
    if p.findings:
        out += ["", "Left out: exfiltration-shaped names -- never allowed by learn; investigate "
                    "(`dnsguard report`)"]
        by_domain: dict[str, list[suspicious.Finding]] = defaultdict(list)
        for f in p.findings:
            by_domain[f.domain].append(f)
        for domain in sorted(by_domain):
            fs = by_domain[domain]
            names = sorted({n for f in fs for n in f.names})
            lookups = sum(p.window.names[n].lookups for n in names if n in p.window.names)
            first, last = min(f.first_seen for f in fs), max(f.last_seen for f in fs)
            out.append(f"  {domain}: {_n(len(names), 'name')}, {_n(lookups, 'lookup')}, "
                       f"first {_time(first)}, last {_time(last)}")
            out.extend(f"    - {f.reason}" for f in fs)
            out.extend(f"      {name}" for name in names[:_LISTED_PER_GROUP])
            if len(names) > _LISTED_PER_GROUP:
                out.append(f"      ... and {len(names) - _LISTED_PER_GROUP} more")
    for cat in ("nxdomain", "no-answer", "denied", "deny-rule"):
        items = by_cat.get(cat)
        if not items:
            continue
        out += ["", f"Left out: {titles[cat]} ({len(items)} name{'s' if len(items) != 1 else ''})"]
        for lo in items:
            out.append(f"  {lo.name}  {lo.detail}; {_n(lo.lookups, 'lookup')} from "
                       f"{_clients_text(lo.clients)}; last {_time(lo.last)}")
    if p.connections:
        out += ["", "Firewall: connections that would have been blocked (not added; to allow one, move it",
                "into [allow] cidrs):"]
        for c in p.connections:
            net = ipaddress.ip_network(c.destination)
            via = f" to {', '.join(sorted(c.names)[:3])}" if c.names else ""
            out.append(f'  "{net}",  # {_n(c.count, "connection")} '
                       f"{'/'.join(sorted(c.ports)) or '-'}{via} from {_clients_text(sorted(c.sources))}; "
                       f"first {_time(c.first)}, last {_time(c.last)}")
    return [_one_line(line) for line in out]


def render_new(p: Plan) -> str:
    """A fresh, complete policy.toml (top-level [allow] only)."""
    head = "".join(f"# {line}\n" if line else "#\n" for line in _header(p))
    return _apply(head + "\n" + _NEW_POLICY, p, "<learned policy>")


def merge(policy_text: str, p: Plan, path: str = "<policy>") -> str:
    """``policy_text`` with the plan's entries appended; its comments and order are kept."""
    return _apply(policy_text, p, path, note=f"additions by `dnsguard learn` at {_time(time.time())} "
                                              f"from {p.window.db_path}")


def _array_indent(arr: Array) -> str:
    m = re.search(r"\[\s*?\n([ \t]+)\S", arr.as_string())
    return m.group(1) if m else "    "


def _append(arr: Array, entries: list[Entry], note: str | None) -> None:
    closed_on_own_line = re.search(r"\n[ \t]*\]$", arr.as_string()) is not None
    indent = _array_indent(arr)
    if note:
        arr.add_line(comment=note, indent=indent)
    for e in entries:
        arr.add_line(e.rule, comment=e.comment(), indent=indent)
    if not closed_on_own_line:
        arr.add_line(indent="")


def _apply(text: str, p: Plan, path: str, note: str | None = None) -> str:
    try:
        doc = tomlkit.parse(text)
    except Exception as exc:  # tomlkit raises its own ParseError family
        raise LearnError(f"{path}: cannot parse: {exc}") from None
    expected: dict[str | None, list[str]] = {}
    for section, entries in p.sections.items():
        if not entries:
            continue
        if section is TOP:
            allow = doc.get("allow")
            if allow is None:
                allow = tomlkit.table()
                doc["allow"] = allow
            target = allow
            key = "domains"
        else:
            target = _client_table(doc, section)
            key = "allow"
        arr = target.get(key)
        if arr is None:
            arr = tomlkit.array()
            target[key] = arr
            arr = target[key]
        if not isinstance(arr, Array):
            raise LearnError(f"{path}: cannot add to {key} of {section or '[allow]'}: not an array")
        before = [str(x) for x in arr]
        _append(arr, entries, note)
        expected[section] = before + [e.rule for e in entries]
    footer = _footer(p)
    if footer:
        doc.add(tomlkit.nl())
        doc.add(tomlkit.comment("---- dnsguard learn: not added, for review " + "-" * 40))
        for line in footer[1:] if footer[0] == "" else footer:
            doc.add(tomlkit.comment(line) if line else tomlkit.comment(""))
    out = doc.as_string()
    try:
        cfg = parse_config(out, path)
    except PolicyError as exc:
        raise LearnError(f"the learned policy would not load ({exc}); nothing written") from None
    for section, rules in expected.items():
        got = list(cfg.allow_domains) if section is TOP else next(
            list(c.allow) for c in cfg.clients if c.name == section)
        if got != rules:
            raise LearnError(f"internal error: {section or '[allow]'} came out as {got}, not {rules}")
    return out


def _client_table(doc: tomlkit.TOMLDocument, name: str) -> Table:
    clients = doc.get("clients")
    if isinstance(clients, AoT | list):
        for t in clients:
            if t.get("name") == name:
                return t
    raise LearnError(f"no [[clients]] entry named {name!r} in the policy")


def _section_title(section: str | None) -> str:
    return "[allow] domains" if section is TOP else f'[[clients]] "{section}" allow'


def render_diff(p: Plan) -> str:
    """What `--merge` would add, and which existing allow rules nobody used."""
    lines: list[str] = []
    w = p.window
    lines.append(f"window {_time(w.since) if w.since is not None else 'start of log'} to "
                 f"{_time(w.until) if w.until is not None else 'now'}: {w.lookups} lookups of "
                 f"{len(w.names)} names")
    if not p.added():
        lines += ["", "nothing to add: every name answered in the window is already allowed"]
    for section in sorted(p.sections, key=lambda s: "" if s is None else s):
        entries = p.sections[section]
        if not entries:
            continue
        lines += ["", f"would add to {_section_title(section)} ({len(entries)}):"]
        width = max(len(e.rule) for e in entries) + 2
        for e in entries:
            lines.append(f'  + {f"{chr(34)}{e.rule}{chr(34)}":<{width}}  # {e.comment()}')
    for section, items in sorted(p.already.items(), key=lambda kv: "" if kv[0] is None else kv[0]):
        lines += ["", f"already allowed by {_section_title(section)}: {len(items)} name(s)"]
    if p.unused:
        lines += ["", f"allow rules no lookup matched in the window (candidates to remove, {len(p.unused)}):"]
        for section, rule in p.unused:
            lines.append(f'  - "{rule}"  ({_section_title(section)})')
    else:
        lines += ["", "every allow rule was used in the window"]
    lines += _footer(p)
    return "\n".join(_one_line(x) for x in lines) + "\n"


def summary(p: Plan) -> str:
    """One line for stderr after writing."""
    wild = sum(1 for es in p.sections.values() for e in es if e.wildcard)
    cats = Counter(lo.category for lo in p.left_out)
    flagged = len(suspicious.flagged_names(p.findings))
    return (f"learned {p.added()} rule(s) ({wild} wildcard) from {p.window.lookups} lookups; left out "
            f"{cats['nxdomain']} NXDOMAIN-only, {flagged} exfiltration-shaped, "
            f"{cats['no-answer'] + cats['denied'] + cats['deny-rule']} other name(s)")
