"""The egress fence: iptables/ip6tables rules that only let an agent reach what dnsguard resolved.

Everything here is data until `execute()` runs it: `fence_rules()` turns a
`FenceSpec` into iptables-restore lines, `plan_apply()` / `plan_remove()`
turn the current ruleset (an iptables-save dump) plus those lines into a list
of `Step`s, and `execute()` -- the one runner -- carries the steps out. The CLI
(`dnsguard firewall ...`) is a thin layer over these.

Shape of the rules (IPv4; IPv6 is the same with dnsguard6 and icmp6 rejects)::

    <builtin> -j DNSGUARD          one jump, inserted first: DOCKER-USER if it exists,
                                   else FORWARD (container mode) / OUTPUT (user mode)
    DNSGUARD                       who is fenced: -s CIDR / -i IFACE / -m owner --uid-owner UID
                                   -> goto DNSGUARD-OUT
    DNSGUARD-OUT                   what they may reach:
      ESTABLISHED,RELATED          RETURN (an open connection survives its set entry expiring)
      dnsguard's listen addresses  udp+tcp to the DNS port: RETURN
      any other DNS / DoT / DoQ    (udp+tcp 53, 853) -> goto DNSGUARD-REJECT
      loopback (user mode)         RETURN (unless --no-loopback)
      [allow] cidrs                -> goto DNSGUARD-ALLOW (all ports)
      set dnsguard4 dst            on [firewall] ports (default tcp/80, tcp/443, udp/443):
                                   -> goto DNSGUARD-ALLOW
      everything else              -> goto DNSGUARD-REJECT
    DNSGUARD-ALLOW                 connmark 0x100000/0x300000 (allowed), then back to the host's
                                   rules: the conntrack recorder follows these flows
    DNSGUARD-REJECT                NFLOG (rate limited, group 53, prefix dnsguard:blocked), then
                                   tcp-reset / icmp port-unreachable (udp) / admin-prohibited;
                                   with --audit: connmark 0x200000/0x300000 (would-block), NFLOG
                                   prefix dnsguard:would-block, then back to the host's own rules.

Allowed traffic is RETURNed, never ACCEPTed: the fence only ever takes away,
whatever the host's own rules (Docker's included) say still applies.

User mode also adds, in the nat table, DNSGUARD-DNS (OUTPUT: the user's udp/tcp
53 to any address -> DNAT to dnsguard's listen address) and DNSGUARD-SNAT
(POSTROUTING: those redirected packets get dnsguard's own address as source,
so the default `[server] clients` = loopback accepts them).

Every apply first removes whatever dnsguard rules are there, in the same
iptables-restore --noflush transaction (one per family), so applying twice is
applying once, and `remove` leaves exactly the rules that were there before.

The code: ``rules`` (spec, rules as data, parsed state), ``runner`` (plans, the runner,
apply/remove), ``status``; this module is their public face.
"""

from __future__ import annotations

from resolver.fence.rules import (
    ALL_OURS,
    CHAIN,
    CHAIN_ALLOW,
    CHAIN_OUT,
    CHAIN_REJECT,
    COMMENT_PREFIX,
    DEFAULT_PORTS,
    DNS_PORTS,
    LOG_BURST,
    LOG_LIMIT,
    NAT_DNS,
    NAT_SNAT,
    NFLOG_SIZE,
    OUR_CHAINS,
    TOOLS,
    FenceSpec,
    FirewallError,
    HostPort,
    IPNetwork,
    Ports,
    Ruleset,
    SavedRule,
    dns_target,
    fence_rules,
    jump_chain,
    jump_comment,
    notes,
    parse_ports,
    parse_save,
    removal_lines,
    render,
    resolve_user,
    spec_from_config,
)
from resolver.fence.runner import (
    Plan,
    Runner,
    Step,
    apply,
    current,
    execute,
    plan_apply,
    plan_remove,
    remove,
)
from resolver.fence.status import (
    FamilyStatus,
    ResolverStatus,
    Status,
    family_status,
    status,
)

__all__ = [
    "ALL_OURS",
    "CHAIN",
    "CHAIN_ALLOW",
    "CHAIN_OUT",
    "CHAIN_REJECT",
    "COMMENT_PREFIX",
    "DEFAULT_PORTS",
    "DNS_PORTS",
    "FamilyStatus",
    "FenceSpec",
    "FirewallError",
    "HostPort",
    "IPNetwork",
    "LOG_BURST",
    "LOG_LIMIT",
    "NAT_DNS",
    "NAT_SNAT",
    "NFLOG_SIZE",
    "OUR_CHAINS",
    "Plan",
    "Ports",
    "ResolverStatus",
    "Ruleset",
    "Runner",
    "SavedRule",
    "Status",
    "Step",
    "TOOLS",
    "apply",
    "current",
    "dns_target",
    "execute",
    "family_status",
    "fence_rules",
    "jump_chain",
    "jump_comment",
    "notes",
    "parse_ports",
    "parse_save",
    "plan_apply",
    "plan_remove",
    "removal_lines",
    "remove",
    "render",
    "resolve_user",
    "spec_from_config",
    "status",
]
