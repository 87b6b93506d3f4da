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
      [allow] cidrs                RETURN (all ports)
      set dnsguard4 dst            on [firewall] ports (default tcp/80, tcp/443, udp/443): RETURN
      everything else              -> goto DNSGUARD-REJECT
    DNSGUARD-REJECT                NFLOG (rate limited, group 53, prefix dnsguard:blocked), then
                                   tcp-reset / icmp port-unreachable (udp) / admin-prohibited;
                                   with --audit: NFLOG prefix dnsguard:would-block, then back to
                                   the host's own rules.

Allowed traffic is RETURNed, never ACCEPTed: the fence only ever takes away,
whatever the host's own rules (Docker's included) say still applies.

User mode also adds, in the nat table, DNSGUARD-DNS (OUTPUT: the user's udp/tcp
53 to any address -> DNAT to dnsguard's listen address) and DNSGUARD-SNAT
(POSTROUTING: those redirected packets get dnsguard's own address as source,
so the default `[server] clients` = loopback accepts them).

Every apply first removes whatever dnsguard rules are there, in the same
iptables-restore --noflush transaction (one per family), so applying twice is
applying once, and `remove` leaves exactly the rules that were there before.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from resolver.core.errors import DnsguardError
from resolver.fence.ipsets import DEFAULT_SET4, DEFAULT_SET6, IpsetError, SetFeeder, SetInfo, open_socket
from resolver.fence.nflog import DEFAULT_GROUP, PREFIX_AUDIT, PREFIX_BLOCKED

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HostPort = tuple[str, int]
Ports = tuple[tuple[str, int], ...] | None  # None = every port and protocol

CHAIN = "DNSGUARD"
CHAIN_OUT = "DNSGUARD-OUT"
CHAIN_REJECT = "DNSGUARD-REJECT"
NAT_DNS = "DNSGUARD-DNS"
NAT_SNAT = "DNSGUARD-SNAT"
OUR_CHAINS = {"filter": (CHAIN, CHAIN_OUT, CHAIN_REJECT), "nat": (NAT_DNS, NAT_SNAT)}
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
    for net in spec.allow_cidrs:
        if net.version == family:
            filt.append(f"-A {out} -d {_dst(net)} -j RETURN")
    for match in _port_matches(spec.ports):
        sep = " " if match else ""
        filt.append(f"-A {out}{sep}{match} -m set --match-set {set_name} dst -j RETURN")
    filt.append(f"-A {out} -g {CHAIN_REJECT}")

    # the end of the line
    rej = CHAIN_REJECT
    prefix = PREFIX_AUDIT if spec.audit else PREFIX_BLOCKED
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
                           f"-m conntrack --ctstate DNAT --ctorigdstport 53 -j SNAT --to-source {host}")
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
            addr = ipaddress.ip_address(target[0])
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


# ------------------------------------------------------------------ plans and the runner

@dataclass(frozen=True)
class Step:
    """One thing to do: run `argv` (with `input` on stdin), or an ipset action."""

    argv: tuple[str, ...]
    input: str | None = None
    why: str = ""
    sets: tuple[str, ...] = ()  # for ipset steps: set names
    action: str = "run"  # "run" | "ensure-sets" | "destroy-sets"

    def describe(self) -> str:
        if self.action == "ensure-sets":
            return (f"# {self.why}\n" + "\n".join(
                f"ipset create {n} hash:ip family {'inet' if i == 0 else 'inet6'} timeout 300 "
                f"hashsize 1024 maxelem 262144 -exist" for i, n in enumerate(self.sets)))
        if self.action == "destroy-sets":
            return f"# {self.why}\n" + "\n".join(f"ipset destroy {n}" for n in self.sets)
        text = f"# {self.why}\n{shlex.join(self.argv)}"
        if self.input is not None:
            text += " <<'EOF'\n" + self.input + "EOF"
        return text


@dataclass
class Plan:
    steps: list[Step]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [s.describe() for s in self.steps] or ["# nothing to do"]
        parts += [f"# note: {n}" for n in self.notes]
        return "\n".join(parts) + "\n"


class Runner:
    """Runs commands (optionally inside `ip netns exec NETNS`) and ipset actions. The only executor."""

    def __init__(self, netns: str | None = None, timeout: float = 30.0) -> None:
        self.netns = netns
        self.timeout = timeout

    def argv(self, argv: Sequence[str]) -> list[str]:
        return (["ip", "netns", "exec", self.netns] if self.netns else []) + list(argv)

    def run(self, argv: Sequence[str], input: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        full = self.argv(argv)
        if shutil.which(full[0]) is None:
            raise FirewallError(f"{full[0]} not found: install iptables (and run as root)")
        try:
            proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=self.timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise FirewallError(f"{shlex.join(full)} did not finish in {self.timeout:.0f}s") from None
        if check and proc.returncode != 0:
            where = f" (input:\n{input})" if input else ""
            raise FirewallError(f"{shlex.join(full)} failed ({proc.returncode}): "
                                f"{proc.stderr.strip() or proc.stdout.strip()}{where}")
        return proc

    def save(self, family: int) -> str:
        return self.run([TOOLS[family][1]]).stdout


def execute(plan: Plan, runner: Runner, set_names: tuple[str, str] = (DEFAULT_SET4, DEFAULT_SET6)) -> None:
    """Carry out a plan, step by step; stops at the first failure (FirewallError)."""
    for step in plan.steps:
        if step.action == "run":
            runner.run(step.argv, step.input)
            continue
        try:
            with SetFeeder(1, 1, *(step.sets or set_names), netns=runner.netns) as feeder:
                if step.action == "ensure-sets":
                    feeder.ensure_sets()
                else:
                    for name in step.sets:
                        feeder.destroy_set(name)
        except IpsetError as exc:
            raise FirewallError(str(exc)) from None
        except OSError as exc:
            raise FirewallError(f"ipset netlink: {exc} (run as root)") from None


def current(runner: Runner) -> dict[int, Ruleset]:
    return {family: parse_save(runner.save(family)) for family in (4, 6)}


def plan_apply(spec: FenceSpec, state: dict[int, Ruleset], clients: Sequence[IPNetwork] = ()) -> Plan:
    """Steps that replace whatever dnsguard rules exist with the ones for `spec`."""
    steps = [Step((), why="the sets the rules match on (kept if they exist)", sets=(spec.set4, spec.set6),
                  action="ensure-sets")]
    restores = []
    for family in (4, 6):
        rs = state[family]
        new = fence_rules(spec, family, docker_user=rs.has_chain("filter", "DOCKER-USER"))
        declared = {(t, line[1:].split()[0]) for t, lines in new.items() for line in lines
                    if line.startswith(":")}
        existing = {(t, c) for t in rs.chains for c in rs.ours(t)}
        removal = removal_lines(rs, keep_declared=declared & existing)
        merged: dict[str, list[str]] = {}
        for table in dict.fromkeys([*removal, *new]):
            # declare only chains that do not exist yet; existing ones were flushed above
            creating = [ln for ln in new.get(table, [])
                        if not (ln.startswith(":") and (table, ln[1:].split()[0]) in existing)]
            merged[table] = removal.get(table, []) + creating
        text = render(merged)
        tool = TOOLS[family][2]
        restores.append(Step((tool, "--noflush"), text,
                             why=f"IPv{family}: remove old dnsguard rules and add new ones, atomically"))
    # Check both families' input before touching either (catches syntax and missing modules).
    for step in restores:
        steps.append(replace(step, argv=(*step.argv, "--test"), why=step.why.split(":")[0] + ": dry run"))
    steps.extend(restores)
    return Plan(steps, notes(spec, clients))


def plan_remove(state: dict[int, Ruleset], sets: Sequence[str] = (DEFAULT_SET4, DEFAULT_SET6),
                destroy_sets: bool = True) -> Plan:
    steps = []
    for family in (4, 6):
        text = render(removal_lines(state[family]))
        if text:
            steps.append(Step((TOOLS[family][2], "--noflush"), text,
                              why=f"IPv{family}: delete the jump rules and the DNSGUARD chains"))
    if destroy_sets:
        steps.append(Step((), why="the address sets (kept if another rule still uses them)",
                          sets=tuple(sets), action="destroy-sets"))
    return Plan(steps)


def apply(spec: FenceSpec, runner: Runner | None = None, clients: Sequence[IPNetwork] = ()) -> Plan:
    runner = runner or Runner()
    plan = plan_apply(spec, current(runner), clients)
    execute(plan, runner, (spec.set4, spec.set6))
    return plan


def remove(runner: Runner | None = None, sets: Sequence[str] = (DEFAULT_SET4, DEFAULT_SET6),
           destroy_sets: bool = True) -> Plan:
    runner = runner or Runner()
    plan = plan_remove(current(runner), sets, destroy_sets=False)
    execute(plan, runner)
    if destroy_sets:
        _destroy_sets_best_effort(runner, sets, plan)
    return plan


def _destroy_sets_best_effort(runner: Runner, sets: Sequence[str], plan: Plan) -> None:
    try:
        with SetFeeder(1, 1, *sets, netns=runner.netns) as feeder:
            for name in sets:
                try:
                    feeder.destroy_set(name)
                except IpsetError as exc:
                    plan.notes.append(f"ipset {name} kept: {exc}")
    except OSError as exc:
        plan.notes.append(f"ipsets not removed: {exc}")


# ------------------------------------------------------------------ status

@dataclass
class FamilyStatus:
    family: int
    chains: list[str]
    jumps: list[str]  # "table/CHAIN" the jumps are in
    comment: str | None  # dnsguard:<mode>:<fingerprint> of the jump rule
    rule_count: int
    sets_used: list[str]
    audit: bool | None


@dataclass
class ResolverStatus:
    address: HostPort
    ok: bool
    detail: str


@dataclass
class Status:
    families: dict[int, FamilyStatus]
    sets: dict[str, SetInfo | None]
    resolver: list[ResolverStatus]
    problems: list[str]
    expected: str | None = None  # fingerprint the given spec would produce

    @property
    def installed(self) -> bool:
        return any(f.jumps for f in self.families.values())

    @property
    def ok(self) -> bool:
        return self.installed and not self.problems

    def describe(self) -> str:
        lines = []
        for fam, fs in sorted(self.families.items()):
            if fs.jumps:
                lines.append(f"IPv{fam} rules: in place ({fs.rule_count} rules; jump from "
                             f"{', '.join(fs.jumps)}; {fs.comment}{'; AUDIT' if fs.audit else ''})")
            elif fs.chains:
                lines.append(f"IPv{fam} rules: chains {', '.join(fs.chains)} exist but nothing jumps to them")
            else:
                lines.append(f"IPv{fam} rules: none")
        for name, info in self.sets.items():
            if info is None:
                lines.append(f"set {name}: missing")
            else:
                lines.append(f"set {name}: {info.type} {info.family}, {info.entries} entries, "
                             f"referenced by {info.references} rules")
        for r in self.resolver:
            host, port = r.address
            addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            lines.append(f"resolver {addr}: {'answering' if r.ok else 'NOT answering'} ({r.detail})")
        if self.problems:
            lines.append("problems:")
            lines.extend(f"  - {p}" for p in self.problems)
        elif self.installed:
            lines.append("consistent: rules, sets and resolver are in place")
        return "\n".join(lines) + "\n"


def _probe_resolver(host: str, port: int, netns: str | None, timeout: float = 2.0) -> tuple[bool, str]:
    import dns.message

    if _is_unspecified(host):
        host = "127.0.0.1" if _family_of(host) == 4 else "::1"
    family = socket.AF_INET if _family_of(host) == 4 else socket.AF_INET6
    query = dns.message.make_query("dnsguard-status.invalid.", "A")
    wire = query.to_wire()
    try:
        sock = open_socket(family, socket.SOCK_DGRAM, netns=netns)
    except OSError as exc:
        return False, str(exc)
    with sock:
        try:
            sock.connect((host, port))
            sock.send(wire)
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False, f"no answer in {timeout:.0f}s"
                sock.settimeout(left)
                data = sock.recv(4096)
                if data[:2] == wire[:2]:
                    reply = dns.message.from_wire(data)
                    return True, f"rcode {dns.rcode.to_text(reply.rcode())}"
        except TimeoutError:
            return False, f"no answer in {timeout:.0f}s"
        except OSError as exc:
            return False, os.strerror(exc.errno) if exc.errno else str(exc)
        except Exception as exc:  # noqa: BLE001 - a garbled reply is still "not working"
            return False, f"bad reply: {exc}"


def family_status(rs: Ruleset, family: int) -> FamilyStatus:
    jumps = rs.jumps()
    comment = None
    for j in jumps:
        m = re.search(r'--comment "?(dnsguard:[^"\s]+)', j.args)
        if m and j.table == "filter":
            comment = m.group(1)
    chains = [c for t in rs.chains for c in rs.ours(t)]
    ours = [r for r in rs.rules if r.chain in ALL_OURS]
    used = sorted({m.group(1) for r in ours for m in [re.search(r"--match-set (\S+) dst", r.args)] if m})
    reject = [r.args for r in rs.chain_rules("filter", CHAIN_REJECT)]
    audit = None
    if reject:
        audit = any(PREFIX_AUDIT in a for a in reject) and not any("REJECT" in a for a in reject)
    return FamilyStatus(family, chains, [f"{j.table}/{j.chain}" for j in jumps], comment, len(ours),
                        used, audit)


def status(runner: Runner | None = None, listen: Sequence[HostPort] = (), spec: FenceSpec | None = None,
           sets: Sequence[str] = (DEFAULT_SET4, DEFAULT_SET6)) -> Status:
    """Are rules, sets and resolver in place, and do they agree?"""
    runner = runner or Runner()
    state = current(runner)
    fams = {f: family_status(state[f], f) for f in (4, 6)}
    problems = []
    set_info: dict[str, SetInfo | None] = {}
    try:
        with SetFeeder(1, 1, *sets, netns=runner.netns) as feeder:
            for name in dict.fromkeys([*sets, *(s for f in fams.values() for s in f.sets_used)]):
                set_info[name] = feeder.info(name)
    except (OSError, IpsetError) as exc:
        problems.append(f"cannot read ipsets: {exc}")
    resolver = []
    for host, port in listen:
        ok, detail = _probe_resolver(host, port, runner.netns)
        resolver.append(ResolverStatus((host, port), ok, detail))

    installed = [f for f in fams.values() if f.jumps]
    if installed:
        for f in fams.values():
            if not f.jumps:
                problems.append(f"IPv{f.family} has no dnsguard rules (the other family has)")
            elif not any(j.startswith("filter/") for j in f.jumps):
                problems.append(f"IPv{f.family}: no jump into DNSGUARD in the filter table; nothing is "
                                "fenced")
        comments = {f.comment for f in installed}
        if len(comments) > 1:
            problems.append(f"IPv4 and IPv6 rules come from different applies: {sorted(map(str, comments))}")
        if spec is not None:
            want = jump_comment(spec)
            if comments != {want}:
                problems.append(f"rules were applied with other settings ({', '.join(map(str, comments))}; "
                                f"these would give {want}): re-run `dnsguard firewall apply`")
        for f in installed:
            for name in f.sets_used:
                if set_info.get(name) is None:
                    problems.append(f"IPv{f.family} rules match on set {name}, which does not exist: every "
                                    "connection is rejected")
        if resolver and not any(r.ok for r in resolver):
            problems.append("the resolver is not answering: no new destinations become reachable (fail "
                            "closed); allowed addresses expire with their TTL")
    else:
        for f in fams.values():
            if f.chains:
                problems.append(f"IPv{f.family}: leftover chains {', '.join(f.chains)} without a jump "
                                "(run `dnsguard firewall remove`)")
    return Status(fams, set_info, resolver, problems, jump_comment(spec) if spec else None)
