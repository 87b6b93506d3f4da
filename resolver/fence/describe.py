"""Who a recorded connection belongs to and which rule let it through, from the running policy.

Used by the connection recorders (``connrec`` in its process, ``nflog`` for a blocked
attempt's client); plain functions over a Config, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

__all__ = ["Describe", "policy_describer"]

# (source, destination, name, allowed) -> (client, rule)
Describe = Callable[[str, str, "str | None", bool], "tuple[str | None, str | None]"]


def policy_describer(config_of: Callable[[], object]) -> Describe:
    """(client, rule) for a flow from the running policy (``config_of()`` -> Config).

    client: the first ``[[clients]]`` entry whose sources hold the source address. rule: for
    an allowed flow, the ``[allow] cidrs`` entry holding the destination (the fence checks
    those first), else the allow rule that matched the name (the client's own list if it
    has one). A would-block flow has no rule.
    """
    from resolver.core.names import text_to_wire

    def describe(src: str, dst: str, name: str | None, allowed: bool) -> tuple[str | None, str | None]:
        cfg = config_of()
        try:
            s_ip = ipaddress.ip_address(src)
            d_ip = ipaddress.ip_address(dst)
        except ValueError:
            return None, None
        client = None
        matcher = getattr(cfg, "matcher", None)
        for c in getattr(cfg, "clients", ()):
            if any(n.version == s_ip.version and s_ip in n for n in c.sources):
                client, matcher = c.name, c.matcher
                break
        if not allowed:
            return client, None
        for net in getattr(cfg, "allow_cidrs", ()):
            if net.version == d_ip.version and d_ip in net:
                return client, str(net)
        if name and matcher is not None:
            decision = matcher.decide(text_to_wire(name))
            if decision.allowed:
                return client, decision.rule
        return client, None

    return describe
