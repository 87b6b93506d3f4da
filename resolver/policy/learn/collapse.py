"""Step 2 of learn: decide per policy section what to allow and what to leave out (and why),
collapsing exact names into a wildcard only where the evidence and the public-suffix list
allow it.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from resolver.core.names import text_to_wire
from resolver.core.units import human_bytes
from resolver.policy import suspicious
from resolver.policy.config import Config
from resolver.policy.learn.collect import (
    _COMMENT_CLIENTS,
    _COMMENT_NAMES,
    DEFAULT_COLLAPSE_THRESHOLD,
    TOP,
    Connection,
    Egress,
    LogWindow,
    NameStats,
    _addr,
    _in_any,
    _observations,
)
from resolver.policy.matcher import Matcher, compile_rule


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
    egress: Egress | None = None   # None: the log has no connection records

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
        if self.egress is not None:
            parts[-1] += ","
            out = human_bytes(self.egress.bytes_out)
            parts.append(f"{_n(self.egress.connections, 'connection')}, {out} out")
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
    upload_warn_mb: float = 10.0

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
         thresholds: suspicious.Thresholds = suspicious.DEFAULT_THRESHOLDS,
         upload_warn_mb: float | None = None) -> Plan:
    """Decide what to add (per section), what to leave out and why.

    ``upload_warn_mb`` (default: the policy's ``[report] upload_warn_mb``, else 10) marks
    the uploads `--diff` lists.
    """
    if upload_warn_mb is None:
        upload_warn_mb = policy.report.upload_warn_mb if policy is not None else 10.0
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
            # Connection sources are not always lookup clients (user mode: DNS arrives from
            # loopback, connections leave from the host's address), so a top-level entry
            # counts every source and a [[clients]] entry the sources in that client's nets.
            source_ok = None if section is TOP else (lambda a, s=section: _section_of(a, named) == s)
            entries.append(_entry(rule, members, addrs, window, source_ok))
        entries.sort(key=lambda e: _sort_key(e.rule))
        sections[section] = entries

    connections = window.connections
    if policy is not None and policy.allow_cidrs:
        # Destinations the policy already lets through need no suggestion.
        connections = [c for c in connections if not _in_any(c.destination, policy.allow_cidrs)]
    return Plan(window, collapse_threshold, sections, dict(already), left_out, findings,
                unused_rules(window, policy) if policy is not None else [], connections, policy,
                upload_warn_mb)


def _by_count(ns: NameStats, addrs: set[str] | None) -> tuple[str, ...]:
    items = [(a, cs) for a, cs in ns.clients.items() if addrs is None or a in addrs]
    return tuple(a for a, _ in sorted(items, key=lambda ac: (-ac[1].lookups, ac[0])))


def _entry(rule: str, members: list[str], addrs: set[str], window: LogWindow,
           source_ok: Callable[[str], bool] | None = None) -> Entry:
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
                 tuple(q for q, _ in sorted(qtypes.items(), key=lambda qc: (-qc[1], qc[0]))), first, last,
                 window.egress_of(members, source_ok) if window.egress is not None else None)


def never_connected(p: Plan) -> list[str]:
    """Names upstream answered (allowed or proposed) that no recorded connection went to.

    Empty when the log has no connection records: nothing can be said then.
    """
    w = p.window
    if w.egress is None:
        return []
    used = {name for name, _ in w.egress}
    resolved = {n for entries in p.sections.values() for e in entries for n in e.names}
    resolved |= {n for items in p.already.values() for n, _ in items}
    return sorted(resolved - used)


def large_uploads(p: Plan) -> list[tuple[str, str, Egress]]:
    """(name, source, egress) where one source sent more than ``upload_warn_mb`` to one name."""
    w = p.window
    limit = p.upload_warn_mb * 1_000_000
    out = [(name, source, e) for (name, source), e in (w.egress or {}).items() if e.bytes_out > limit]
    return sorted(out, key=lambda t: (-t[2].bytes_out, t[0], t[1]))


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


