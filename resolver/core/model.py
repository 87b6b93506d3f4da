"""Plain values shared by every layer.

The lookup-log record is a bare tuple, not a dataclass: it is built once per
query on the hot path, and a tuple is the cheapest thing Python can make.
Its field order is the contract between the server (producer) and the log
writer (consumer); `LOG_FIELDS` names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Verdict = Literal["allow", "deny"]

# One lookup-log record, in this order:
#   ts          float   seconds since the epoch (UTC), when the packet arrived
#   client      str     source IP address
#   transport   str     "udp" or "tcp"
#   qname       bytes | None   question name in lower-cased DNS wire form
#                              (b"\x04pypi\x03org\x00"); None if unreadable
#   qtype       int | None     numeric query type
#   verdict     str | None     "allow" / "deny" (policy decision); None if not a valid query
#   mode        str            "enforce" / "audit" in force for this client
#   rule        str | None     policy entry that decided; None for default deny
#   rcode       int | None     rcode sent to the client; None when no reply was sent (dropped)
#   answers     str | None     JSON text: list of A/AAAA addresses and CNAME targets returned
#   cached      bool           answered from dnsguard's cache
#   latency_ms  float          receive -> reply handed to the kernel
#   note        str | None     why a packet was malformed/dropped/failed (e.g. "formerr: label > 63")
LOG_FIELDS = (
    "ts", "client", "transport", "qname", "qtype", "verdict", "mode", "rule",
    "rcode", "answers", "cached", "latency_ms", "note",
)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy says about one name, and why."""

    allowed: bool
    rule: str | None  # the policy entry that matched, e.g. "*.github.com"; None = default deny
    source: str  # "allow", "deny" or "default"

    @property
    def verdict(self) -> Verdict:
        return "allow" if self.allowed else "deny"


DEFAULT_DENY = Decision(False, None, "default")
