"""The fence as data: the FenceSpec (who is fenced, what they may reach), the iptables-restore
lines it becomes, and the parsed iptables-save state those lines are compared with.
Shape of the rules and why: ``resolver.fence.firewall``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import pwd
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from resolver.core.addrs import user_source
from resolver.core.errors import DnsguardError
from resolver.fence.conntrack import MARK_ALLOWED, MARK_AUDIT, MARK_MASK
from resolver.fence.netlink import DEFAULT_SET4, DEFAULT_SET6
from resolver.fence.nflog import DEFAULT_GROUP, PREFIX_AUDIT, PREFIX_BLOCKED

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HostPort = tuple[str, int]
Ports = tuple[tuple[str, int], ...] | None  # None = every port and protocol

CHAIN = "DNSGUARD"
CHAIN_OUT = "DNSGUARD-OUT"
CHAIN_REJECT = "DNSGUARD-REJECT"
CHAIN_ALLOW = "DNSGUARD-ALLOW"
NAT_DNS = "DNSGUARD-DNS"
NAT_SNAT = "DNSGUARD-SNAT"
OUR_CHAINS = {"filter": (CHAIN, CHAIN_OUT, CHAIN_ALLOW, CHAIN_REJECT), "nat": (NAT_DNS, NAT_SNAT)}
ALL_OURS = frozenset(c for cs in OUR_CHAINS.values() for c in cs)
DEFAULT_PORTS: Ports = (("tcp", 80), ("tcp", 443), ("udp", 443))
DNS_PORTS = (53, 853)  # DNS, DNS over TLS (tcp) / over QUIC (udp)
LOG_LIMIT = "20/sec"
LOG_BURST = 100
NFLOG_SIZE = 128
COMMENT_PREFIX = "dnsguard:"

TOOLS = {
    4: ("iptables", "iptables-save", "iptables-restore"),
    6: ("ip6tables", "ip6tables-save", "ip6tables-restore"),
}


class FirewallError(DnsguardError):
    """The fence cannot be built, applied or removed."""


# ------------------------------------------------------------------ the specification

@dataclass(frozen=True)
class FenceSpec:
    """Everything the rules depend on. Build with `spec_from_config` or directly."""

    mode: str  # "container" | "user"
    sources: tuple[IPNetwork, ...] = ()  # container mode: fenced source subnets
    interfaces: tuple[str, ...] = ()  # container mode: fenced input interfaces
    user: str | None = None  # user mode: name (for messages)
    uid: int | None = None  # user mode: fenced uid
    listen: tuple[HostPort, ...] = (("127.0.0.1", 5353),)
    ports: Ports = DEFAULT_PORTS
    allow_cidrs: tuple[IPNetwork, ...] = ()
    audit: bool = False
    loopback: bool = True  # user mode: the user may talk to local services on lo
    nflog_group: int = DEFAULT_GROUP
    set4: str = DEFAULT_SET4
    set6: str = DEFAULT_SET6
    # Turn on conntrack byte counters where the fence is applied, for the connection recorder
    # (`serve` cannot: its unit makes /proc/sys read-only). Not part of the fingerprint: no rule
    # depends on it.
    accounting: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("container", "user"):
            raise FirewallError(f"unknown fence mode {self.mode!r}")
        if self.mode == "container" and not (self.sources or self.interfaces):
            raise FirewallError("container mode needs at least one --source CIDR (or --interface)")
        if self.mode == "user":
            if self.uid is None:
                raise FirewallError("user mode needs --user")
            if self.uid == 0:
                raise FirewallError("refusing to fence root: root can remove the fence, and dnsguard's own "
                                    "upstream queries (as root) would be redirected back to itself")
        for iface in self.interfaces:
            if not re.fullmatch(r"[A-Za-z0-9_.:@+-]{1,15}", iface):
                raise FirewallError(f"bad interface name {iface!r}")
        if not self.listen:
            raise FirewallError("no listen address for dnsguard")
        if not 0 <= self.nflog_group <= 65535:
            raise FirewallError("NFLOG group must be 0..65535")

    @property
    def fingerprint(self) -> str:
        """Short hash of the spec; stored in the jump rule's comment."""
        parts = [self.mode, ",".join(sorted(map(str, self.sources))), ",".join(sorted(self.interfaces)),
                 str(self.uid), ",".join(f"{h}:{p}" for h, p in self.listen),
                 "any" if self.ports is None else ",".join(f"{p}/{n}" for p, n in self.ports),
                 ",".join(sorted(map(str, self.allow_cidrs))), str(self.audit), str(self.loopback),
                 str(self.nflog_group), self.set4, self.set6]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def resolve_user(user: str) -> int:
    """A user name or numeric uid -> uid."""
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise FirewallError(f"no such user: {user!r}") from None


def parse_ports(items: Iterable[str]) -> Ports:
    """["tcp/443", "udp/443"] or ["any"] -> ports tuple (None = any)."""
    out: list[tuple[str, int]] = []
    for item in items:
        item = item.strip().lower()
        if item == "any":
            return None
        m = re.fullmatch(r"(tcp|udp)/(\d{1,5})", item)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise FirewallError(f"bad port {item!r}: use tcp/443, udp/443 or any")
        out.append((m.group(1), int(m.group(2))))
    return tuple(out)


def spec_from_config(config: object, *, sources: Sequence[str] = (), interfaces: Sequence[str] = (),
                     user: str | None = None, audit: bool = False, **overrides: object) -> FenceSpec:
    """A FenceSpec from a `resolver.config.Config` plus the command line's who-to-fence."""
    nets = []
    for s in sources:
        try:
            nets.append(ipaddress.ip_network(s, strict=False))
        except ValueError:
            raise FirewallError(f"--source {s!r} is not a CIDR or address") from None
    fw = getattr(config, "firewall", None)
    kwargs: dict[str, object] = {
        "mode": "user" if user else "container",
        "sources": tuple(nets),
        "interfaces": tuple(interfaces),
        "user": user,
        "uid": resolve_user(user) if user else None,
        "listen": tuple(getattr(config, "listen", (("127.0.0.1", 5353),))),
        "ports": getattr(fw, "ports", DEFAULT_PORTS) if fw is not None else DEFAULT_PORTS,
        "allow_cidrs": tuple(getattr(config, "allow_cidrs", ())),
        "audit": audit,
        "accounting": bool(getattr(fw, "record_connections", True)) if fw is not None else True,
    }
    kwargs.update(overrides)
    return FenceSpec(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------ rules as data

def _is_unspecified(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def _family_of(host: str) -> int:
    return ipaddress.ip_address(host).version


def _dst(net: IPNetwork | str) -> str:
    return str(net)


def _port_matches(ports: Ports) -> list[str]:
    """One match string per rule needed; [""] for any port."""
    if ports is None:
        return [""]
    out = []
    for proto in ("tcp", "udp"):
        nums = sorted({n for p, n in ports if p == proto})
        for i in range(0, len(nums), 15):  # multiport takes at most 15 ports
            chunk = nums[i:i + 15]
            if len(chunk) == 1:
                out.append(f"-p {proto} -m {proto} --dport {chunk[0]}")
            else:
                out.append(f"-p {proto} -m multiport --dports {','.join(map(str, chunk))}")
    return out


def _listen_for(spec: FenceSpec, family: int) -> list[HostPort]:
    return [(h, p) for h, p in spec.listen if _family_of(h) == family]


def dns_target(spec: FenceSpec, family: int) -> HostPort | None:
    """Where user-mode DNS of this family is redirected: dnsguard's first listen address."""
    for host, port in _listen_for(spec, family):
        if _is_unspecified(host):
            return ("127.0.0.1" if family == 4 else "::1"), port
        return host, port
    return None


def snat_source(spec: FenceSpec, family: int) -> str | None:
    """The source user-mode DNS reaches dnsguard from: for an IPv4 loopback target, an address
    that names the user (`resolver.core.addrs.user_source`), else the target address itself."""
    target = dns_target(spec, family)
    if target is None:
        return None
    host = target[0]
    if family == 4 and spec.uid is not None and ipaddress.ip_address(host).is_loopback:
        return user_source(spec.uid) or host
    return host


def jump_chain(spec: FenceSpec, docker_user: bool) -> str:
    if spec.mode == "user":
        return "OUTPUT"
    return "DOCKER-USER" if docker_user else "FORWARD"


def jump_comment(spec: FenceSpec) -> str:
    return f"{COMMENT_PREFIX}{spec.mode}:{spec.fingerprint}"


def fence_rules(spec: FenceSpec, family: int, *, docker_user: bool = False) -> dict[str, list[str]]:
    """table -> iptables-restore lines (chain declarations, rules, the jump) for one family.

    Pure: reads nothing from the system. `docker_user` says whether the
    DOCKER-USER chain exists (container mode jumps from there).
    """
    v4 = family == 4
    set_name = spec.set4 if v4 else spec.set6
    unreach_udp = "icmp-port-unreachable" if v4 else "icmp6-port-unreachable"
    unreach_other = "icmp-admin-prohibited" if v4 else "icmp6-adm-prohibited"
    filt: list[str] = [f":{c} - [0:0]" for c in OUR_CHAINS["filter"]]

    # who is fenced
    if spec.mode == "container":
        for net in spec.sources:
            if net.version == family:
                filt.append(f"-A {CHAIN} -s {net} -g {CHAIN_OUT}")
        for iface in spec.interfaces:
            filt.append(f"-A {CHAIN} -i {iface} -g {CHAIN_OUT}")
    else:
        filt.append(f"-A {CHAIN} -m owner --uid-owner {spec.uid} -g {CHAIN_OUT}")

    # what they may reach
    out = CHAIN_OUT
    filt.append(f"-A {out} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN")
    for host, port in _listen_for(spec, family):
        where = "-m addrtype --dst-type LOCAL" if _is_unspecified(host) else f"-d {host}"
        for proto in ("udp", "tcp"):
            filt.append(f"-A {out} {where} -p {proto} -m {proto} --dport {port} -j RETURN")
    dns = ",".join(map(str, DNS_PORTS))
    for proto in ("udp", "tcp"):
        filt.append(f"-A {out} -p {proto} -m multiport --dports {dns} -g {CHAIN_REJECT}")
    if spec.mode == "user" and spec.loopback:
        filt.append(f"-A {out} -o lo -j RETURN")
    # Egress that is let through goes via DNSGUARD-ALLOW, which marks the connection (connmark,
    # only our bits) so the conntrack recorder can tell the fenced flows from the host's own;
    # reached by gotos only, its end returns to the built-in chain like RETURN here would.
    for net in spec.allow_cidrs:
        if net.version == family:
            filt.append(f"-A {out} -d {_dst(net)} -g {CHAIN_ALLOW}")
    for match in _port_matches(spec.ports):
        sep = " " if match else ""
        filt.append(f"-A {out}{sep}{match} -m set --match-set {set_name} dst -g {CHAIN_ALLOW}")
    filt.append(f"-A {out} -g {CHAIN_REJECT}")
    filt.append(f"-A {CHAIN_ALLOW} -j CONNMARK --set-xmark {MARK_ALLOWED:#x}/{MARK_MASK:#x}")

    # the end of the line
    rej = CHAIN_REJECT
    prefix = PREFIX_AUDIT if spec.audit else PREFIX_BLOCKED
    if spec.audit:  # let through, so conntrack confirms it: recorded with bytes as would-block
        filt.append(f"-A {rej} -j CONNMARK --set-xmark {MARK_AUDIT:#x}/{MARK_MASK:#x}")
    filt.append(f"-A {rej} -m limit --limit {LOG_LIMIT} --limit-burst {LOG_BURST} -j NFLOG "
                f"--nflog-prefix {prefix} --nflog-group {spec.nflog_group} --nflog-size {NFLOG_SIZE}")
    if not spec.audit:
        filt.append(f"-A {rej} -p tcp -j REJECT --reject-with tcp-reset")
        filt.append(f"-A {rej} -p udp -j REJECT --reject-with {unreach_udp}")
        filt.append(f"-A {rej} -j REJECT --reject-with {unreach_other}")
    filt.append(f'-I {jump_chain(spec, docker_user)} 1 -m comment --comment "{jump_comment(spec)}" '
                f"-j {CHAIN}")

    tables = {"filter": filt}
    if spec.mode == "user":
        target = dns_target(spec, family)
        if target is not None:
            host, port = target
            to = f"{host}:{port}" if v4 else f"[{host}]:{port}"
            nat = [f":{c} - [0:0]" for c in OUR_CHAINS["nat"]]
            for proto in ("udp", "tcp"):
                nat.append(f"-A {NAT_DNS} -p {proto} -m owner --uid-owner {spec.uid} -m {proto} --dport 53 "
                           f"-j DNAT --to-destination {to}")
                nat.append(f"-A {NAT_SNAT} -d {host} -p {proto} -m owner --uid-owner {spec.uid} "
                           f"-m conntrack --ctstate DNAT --ctorigdstport 53 -j SNAT "
                           f"--to-source {snat_source(spec, family)}")
            nat.append(f'-I OUTPUT 1 -m comment --comment "{jump_comment(spec)}" -j {NAT_DNS}')
            nat.append(f'-I POSTROUTING 1 -m comment --comment "{jump_comment(spec)}" -j {NAT_SNAT}')
            tables["nat"] = nat
    return tables


def render(tables: dict[str, list[str]]) -> str:
    """iptables-restore text for table -> lines."""
    out = []
    for table, lines in tables.items():
        if not lines:
            continue
        out.append(f"*{table}")
        out.extend(lines)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def notes(spec: FenceSpec, clients: Sequence[IPNetwork] = ()) -> list[str]:
    """Things the operator must know or do for this spec to work."""
    out = []
    if spec.mode == "container":
        if not any(ipaddress.ip_address(h).version == 6 for h, _ in spec.listen) and not any(
                n.version == 6 for n in spec.sources) and not spec.interfaces:
            out.append("no IPv6 --source given: IPv6 from these containers is fenced only if you pass "
                       "their IPv6 subnet (or --interface); with Docker's IPv6 off there is none")
        if all(ipaddress.ip_address(h).is_loopback for h, _ in spec.listen):
            out.append("dnsguard listens only on loopback, which containers cannot reach: listen on the "
                       "bridge address (e.g. [server] listen = [\"172.17.0.1:53\"]) and start containers "
                       "with --dns 172.17.0.1")
        if not any(n.version == 4 for n in spec.sources) and not spec.interfaces:
            out.append("no IPv4 --source given: only IPv6 is fenced")
    else:
        for family in (4, 6):
            target = dns_target(spec, family)
            name = "IPv4" if family == 4 else "IPv6"
            if target is None:
                out.append(f"dnsguard has no {name} listen address: {spec.user}'s {name} DNS is rejected, "
                           f"not redirected (resolvers fall back to the next nameserver)")
                continue
            addr = ipaddress.ip_address(snat_source(spec, family) or target[0])
            if clients and not any(addr.version == n.version and addr in n for n in clients):
                out.append(f"redirected DNS reaches dnsguard from {addr}: add \"{addr}/"
                           f"{addr.max_prefixlen}\" to [server] clients")
    if spec.audit:
        out.append("audit mode: nothing is blocked; would-be blocks are logged as 'would-block'")
    return out


# ------------------------------------------------------------------ reading the current state

@dataclass
class SavedRule:
    table: str
    chain: str
    args: str  # everything after "-A CHAIN", as iptables-save printed it

    @property
    def target(self) -> str | None:
        toks = shlex.split(self.args)
        for i, tok in enumerate(toks[:-1]):
            if tok in ("-j", "-g", "--jump", "--goto"):
                return toks[i + 1]
        return None


@dataclass
class Ruleset:
    """One family's iptables-save output, parsed."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # table -> chain names
    rules: list[SavedRule] = field(default_factory=list)

    def has_chain(self, table: str, chain: str) -> bool:
        return chain in self.chains.get(table, [])

    def ours(self, table: str) -> list[str]:
        return [c for c in self.chains.get(table, []) if c in ALL_OURS]

    def jumps(self) -> list[SavedRule]:
        """Rules outside our chains that lead into them."""
        return [r for r in self.rules if r.chain not in ALL_OURS and r.target in ALL_OURS]

    def chain_rules(self, table: str, chain: str) -> list[SavedRule]:
        return [r for r in self.rules if r.table == table and r.chain == chain]


def parse_save(text: str) -> Ruleset:
    rs = Ruleset()
    table = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            rs.chains.setdefault(table, [])
        elif table is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            rs.chains[table].append(line[1:].split()[0])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            rs.rules.append(SavedRule(table, chain, rest[0] if rest else ""))
    return rs


def removal_lines(rs: Ruleset, keep_declared: Iterable[tuple[str, str]] = ()) -> dict[str, list[str]]:
    """table -> lines that delete every dnsguard rule and chain in `rs`.

    Chains listed in `keep_declared` (table, chain) are only flushed (the
    caller re-declares them), the rest are deleted.
    """
    keep = set(keep_declared)
    out: dict[str, list[str]] = {}
    for rule in rs.jumps():
        out.setdefault(rule.table, []).append(f"-D {rule.chain} {rule.args}")
    for table in rs.chains:
        ours = rs.ours(table)
        for chain in ours:
            out.setdefault(table, []).append(f"-F {chain}")
        for chain in ours:
            if (table, chain) not in keep:
                out[table].append(f"-X {chain}")
    return out


