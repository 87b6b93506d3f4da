"""Which policy a client address gets: its [[clients]] entry, or the global one, and
whether it may ask at all (``[server] clients``). Computed once per address and memoised
by the chain, so none of this runs per query.
"""

from __future__ import annotations

import ipaddress

from resolver.core.model import Decision
from resolver.policy.config import ClientPolicy, Config
from resolver.policy.matcher import Matcher

# Decisions memoised per policy matcher (bounded: a flood of unique names clears it).
_MAX_DECISIONS = 262_144


class ClientView:
    """How one source address is treated; computed once per address and memoised."""

    __slots__ = ("served", "mode", "audit", "matcher", "decisions", "label")

    def __init__(self, served: bool, mode: str, matcher: Matcher, label: str | None,
                 decisions: dict[bytes, Decision] | None = None) -> None:
        self.served = served
        self.mode = mode
        self.audit = mode == "audit"
        self.matcher = matcher
        # Shared by every view of the same matcher, so the memo's bound holds per policy,
        # not per source address (which a spoofing client could multiply).
        self.decisions: dict[bytes, Decision] = {} if decisions is None else decisions
        self.label = label  # the [[clients]] name, if any

    def decide(self, qname: bytes) -> Decision:
        d = self.decisions.get(qname)
        if d is None:
            d = self.matcher.decide(qname)
            if len(self.decisions) >= _MAX_DECISIONS:
                self.decisions.clear()
            self.decisions[qname] = d
        return d


Named = list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ClientPolicy]]


def named_networks(config: Config) -> Named:
    """[[clients]] sources, longest prefix first (the most specific client wins)."""
    return sorted(((net, c) for c in config.clients for net in c.sources), key=lambda nc: -nc[0].prefixlen)


def classify(config: Config, ip: str, named: Named,
             memo: dict[int, dict[bytes, Decision]] | None = None) -> ClientView:
    memo = {} if memo is None else memo

    def view(served: bool, mode: str, matcher: Matcher, label: str | None) -> ClientView:
        return ClientView(served, mode, matcher, label, memo.setdefault(id(matcher), {}))

    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return view(False, config.mode, config.matcher, None)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for net, client in named:  # a named client's sources are implicitly allowed to ask
        if addr.version == net.version and addr in net:
            return view(True, client.mode, client.matcher, client.name)
    served = any(addr.version == net.version and addr in net for net in config.server.clients)
    return view(served, config.mode, config.matcher, None)
