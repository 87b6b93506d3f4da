"""``dnsguard firewall status``: what is applied, per family, and whether the resolvers the
fence sends DNS to answer.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from resolver.fence.conntrack import ACCT_SYSCTLS, accounting_state
from resolver.fence.ipsets import DEFAULT_SET4, DEFAULT_SET6, IpsetError, SetFeeder, SetInfo, open_socket
from resolver.fence.nflog import PREFIX_AUDIT
from resolver.fence.rules import (
    ALL_OURS,
    CHAIN_REJECT,
    FenceSpec,
    HostPort,
    Ruleset,
    _family_of,
    _is_unspecified,
    jump_comment,
)
from resolver.fence.runner import Runner, current

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
    # sysctl -> on/off (None: unreadable) where the fence is; None when it was not looked at.
    accounting: dict[str, bool | None] | None = None

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
        if self.accounting is not None:
            acct = self.accounting.get(ACCT_SYSCTLS[0])
            lines.append("conntrack accounting (connection byte counts): " + (
                "on" if acct else "off" if acct is False else "unknown (nf_conntrack not loaded)"))
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


ACCOUNTING_OFF = ("conntrack accounting is off (net.netfilter.nf_conntrack_acct=0): recorded connections "
                  "get no byte counts; re-run `dnsguard firewall apply` as root (dnsguard-fence.service "
                  "does at boot), or `sysctl -w net.netfilter.nf_conntrack_acct=1`")


def status(runner: Runner | None = None, listen: Sequence[HostPort] = (), spec: FenceSpec | None = None,
           sets: Sequence[str] = (DEFAULT_SET4, DEFAULT_SET6),
           record_connections: bool | None = None) -> Status:
    """Are rules, sets and resolver in place, and do they agree?

    ``record_connections`` (default: the spec's ``accounting``, else False): connections are
    recorded, so conntrack accounting being off is a problem.
    """
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
    try:
        accounting: dict[str, bool | None] | None = accounting_state(runner.netns)
    except OSError as exc:
        accounting = None
        problems.append(f"cannot read the conntrack sysctls: {exc}")
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
        want = bool(record_connections) if record_connections is not None else \
            spec is not None and spec.accounting
        if want and accounting is not None and accounting.get(ACCT_SYSCTLS[0]) is False:
            problems.append(ACCOUNTING_OFF)
        if resolver and not any(r.ok for r in resolver):
            problems.append("the resolver is not answering: no new destinations become reachable (fail "
                            "closed); allowed addresses expire with their TTL")
    else:
        for f in fams.values():
            if f.chains:
                problems.append(f"IPv{f.family}: leftover chains {', '.join(f.chains)} without a jump "
                                "(run `dnsguard firewall remove`)")
    return Status(fams, set_info, resolver, problems, jump_comment(spec) if spec else None, accounting)
