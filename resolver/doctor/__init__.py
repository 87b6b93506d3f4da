"""``dnsguard doctor``: is the agent really fenced? Each check passes or fails, with the fix.

Checks, in order (a failed prerequisite marks what depends on it as failed, not skipped):

1. the policy loads;
2. dnsguard answers on every listen address;
3. the lookup log is there and writable;
4. fence rules are applied, enforcing, cover the agent and match the policy;
5. the firewall sets exist and are being fed (the addresses dnsguard answered lately are in
   them); conntrack accounting is on when connections are recorded;
6. the agent's resolver is dnsguard (the container's DNS from the Docker API, or the user's
   DNS redirect in the nat table);
7. from the agent's side (``docker exec``, or running as the user): a denied name gets
   NXDOMAIN -- and the lookup shows up in dnsguard's log from the agent's address, so the
   answer was dnsguard's -- and a connection to a documentation address (192.0.2.1) is
   refused by the fence (its reject counter moves).

App level: it reads the policy, the log, the kernel's rules and sets and Docker, which sit in
sibling packages, so it may import resolver.fence, resolver.log, resolver.policy and
resolver.core (never resolver.app or resolver.cli). ``agent``: the agent side.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import socket
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from resolver.core.errors import DnsguardError
from resolver.doctor.agent import (  # the agent side; these names stay importable from here
    _CONNECT_SCRIPT,
    _DNS_SCRIPT,
    PROBE_RESOLVER,
    Agent,
    ContainerAgent,
    UserAgent,
    classify_connect,
    classify_dns,
)
from resolver.fence.conntrack import ACCT_SYSCTLS, accounting_state
from resolver.fence.firewall import CHAIN, CHAIN_REJECT, Runner, spec_from_config, status
from resolver.fence.ipsets import DEFAULT_SET4, SetFeeder
from resolver.fence.nflog import DEFAULT_GROUP as NFLOG_GROUP
from resolver.log.clients import DEFAULT_SOCKET, DockerAPI, DockerError, wait_for
from resolver.policy.config import Config, load_config

__all__ = ["Agent", "Check", "ContainerAgent", "Diagnosis", "PROBE_RESOLVER", "UserAgent", "classify_connect",
           "classify_dns", "diagnose"]

SCHEMA_ID = "dnsguard-doctor/1"
PROBE_ADDRESS = "192.0.2.1"  # TEST-NET-1: nothing legitimate lives there
PROBE_PORT = 443


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None


@dataclass
class Diagnosis:
    target: str | None
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str, fix: str | None = None) -> bool:
        self.checks.append(Check(name, ok, detail, None if ok else fix))
        return ok

    def as_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA_ID, "target": self.target, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks]}

    def describe(self) -> str:
        lines = []
        for c in self.checks:
            lines.append(f"{'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
            if c.fix:
                lines.append(f"      fix: {c.fix}")
        verdict = "fenced" if self.ok else "NOT fenced (see the failures above)"
        lines.append(f"{self.target or 'dnsguard'}: {verdict}")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the checks

def _probe(host: str, port: int, netns: str | None, timeout: float = 2.0) -> tuple[bool, str]:
    import dns.message
    import dns.rcode

    from resolver.fence.ipsets import open_socket

    if ipaddress.ip_address(host).is_unspecified:
        host = "127.0.0.1" if ":" not in host else "::1"
    q = dns.message.make_query("dnsguard-doctor.invalid.", "A")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with open_socket(fam, socket.SOCK_DGRAM, netns=netns) as s:
            s.settimeout(timeout)
            s.connect((host, port))
            s.send(q.to_wire())
            reply = dns.message.from_wire(s.recv(4096))
    except TimeoutError:
        return False, f"no answer in {timeout:.0f} s"
    except Exception as exc:  # noqa: BLE001 - any failure is "not answering", said as it is
        return False, str(exc) or type(exc).__name__
    # Any reply means serving; REFUSED is normal from the host to a Docker bridge address,
    # whose traffic Docker's MASQUERADE gives a source outside [server] clients.
    return True, f"answers (rcode {dns.rcode.to_text(reply.rcode())})"


def _reject_packets(runner: Runner) -> int:
    """Packets the fence's reject chain has matched so far (IPv4)."""
    out = runner.run(["iptables-save", "-c", "-t", "filter"], check=False).stdout
    total = 0
    for line in out.splitlines():
        m = re.match(rf"\[(\d+):\d+\] -A {re.escape(CHAIN_REJECT)} ", line)
        if m and "NFLOG" not in line:
            total += int(m.group(1))
    return total


def _fenced_sources(runner: Runner) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = runner.run(["iptables-save", "-t", "filter"], check=False).stdout
    return [ipaddress.ip_network(m.group(1)) for m in re.finditer(rf"-A {CHAIN} -s (\S+) -g", out)]


def _fenced_uids(runner: Runner) -> list[int]:
    out = runner.run(["iptables-save", "-t", "filter"], check=False).stdout
    return [int(m.group(1)) for m in re.finditer(rf"-A {CHAIN} -m owner --uid-owner (\d+) -g", out)]


def _logged(db: str, name: str, sources: list[str], timeout: float) -> dict | None:
    """The log row for ``name`` from one of ``sources``, once the writer has it."""
    found: dict = {}

    def look() -> bool:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                conn.row_factory = sqlite3.Row
                marks = ",".join("?" * len(sources))
                row = conn.execute(f"SELECT client, verdict, mode, rcode FROM lookups WHERE qname = ? AND "
                                   f"client IN ({marks}) ORDER BY id DESC LIMIT 1",
                                   (name, *sources)).fetchone()
        except sqlite3.Error:
            return False
        if row is not None:
            found.update(dict(row))
        return row is not None

    return found if wait_for(look, timeout) else None


def diagnose(policy_path: str, *, container: str | None = None, user: str | None = None,
             db: str | None = None, docker_socket: str | None = None, netns: str | None = None,
             log_wait: float = 3.0) -> Diagnosis:
    """Run every check; never raises for a failed check (only for bad arguments)."""
    if container and user:
        raise DnsguardError("give --container or --user, not both")
    diag = Diagnosis(f"container {container}" if container else f"user {user}" if user else None)
    runner = Runner(netns)

    # 1. policy
    try:
        cfg: Config | None = load_config(policy_path)
        diag.add("policy", True, f"{policy_path}: {cfg.matcher.rule_count} rules, mode {cfg.mode}")
    except DnsguardError as exc:
        cfg = None
        diag.add("policy", False, str(exc), f"fix the file, then `dnsguard check --policy {policy_path}`")
    if cfg is not None and cfg.mode != "enforce":
        diag.add("policy enforces", False, "mode is audit: every name is answered",
                 'set mode = "enforce" once `dnsguard report` shows what the agent needs, then reload')

    # 2. dnsguard answering
    answering = False
    if cfg is not None:
        results = [(h, p, *_probe(h, p, netns)) for h, p in cfg.server.listen]
        answering = all(ok for *_, ok, _ in results)
        detail = "; ".join(f"{h}:{p} {d}" for h, p, _, d in results)
        diag.add("dnsguard answering", answering, detail,
                 f"start it: `systemctl start dnsguard` (or `dnsguard serve --policy {policy_path}`)")

    # 3. log
    db_path = db or (cfg.log.database if cfg is not None else None)
    if cfg is not None and not cfg.log.enabled and db is None:
        diag.add("lookup log", False, "[log] enabled = false: nothing is recorded",
                 "set [log] enabled = true (doctor also uses the log to see the agent's lookups)")
        db_path = None
    elif db_path:
        if not os.path.exists(db_path):
            diag.add("lookup log", False, f"{db_path} does not exist",
                     "pass the database serve writes (--db; the unit's is /var/lib/dnsguard/dnsguard.db)")
            db_path = None
        else:
            try:
                with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1) as conn:
                    n = conn.execute("SELECT count(*) FROM lookup_rows").fetchone()[0]
                folder = os.path.dirname(os.path.abspath(db_path))
                writable = os.access(db_path, os.W_OK) and os.access(folder, os.W_OK)
                diag.add("lookup log", writable, f"{db_path}: {n:,} lookups" + ("" if writable else
                         ", but not writable"), f"make {folder} writable for dnsguard "
                         "(StateDirectory=dnsguard does that)")
            except sqlite3.Error as exc:
                diag.add("lookup log", False, f"{db_path}: {exc}",
                         "move the broken file away; serve makes a new one")
                db_path = None

    # the agent
    agent: Agent | None = None
    api = None
    if container:
        sock = docker_socket or (cfg.docker.socket if cfg is not None else DEFAULT_SOCKET) or DEFAULT_SOCKET
        api = DockerAPI(sock)
        try:
            info = api.inspect(container)
            if not (info.get("State") or {}).get("Running"):
                raise DockerError(f"container {container} is not running")
            agent = ContainerAgent(api, container, info)
        except DockerError as exc:
            diag.add("agent", False, str(exc), f"start it, or check the name with `docker ps` ({sock})")
    elif user:
        try:
            agent = UserAgent(user, netns)
        except DnsguardError as exc:
            diag.add("agent", False, str(exc), "give the user the agent runs as")

    # 4. fence rules
    fenced = False
    if cfg is not None:
        sources = _fenced_sources(runner)
        uids = _fenced_uids(runner)
        audit = None
        try:
            st = status(runner, cfg.server.listen)
        except (DnsguardError, OSError) as exc:
            diag.add("fence rules", False, f"cannot read the rules: {exc}", "run doctor as root")
            st = None
        if st is not None:
            audit = any(f.audit for f in st.families.values() if f.jumps)
            who = [f"--source {n}" for n in sources] or [f"--user {u}" for u in uids]
            if not st.installed:
                example = _apply_example(policy_path, agent)
                diag.add("fence rules", False, "no dnsguard rules are applied: the agent can reach anything",
                         f"`{example}` (dnsguard-fence.service does it at boot)")
            else:
                spec = None
                try:
                    spec = spec_from_config(cfg, sources=[str(n) for n in sources], audit=bool(audit),
                                            user=str(uids[0]) if uids and not sources else None)
                except DnsguardError:
                    pass
                problems = list(st.problems)
                if spec is not None:
                    problems += [p for p in status(runner, cfg.server.listen, spec=spec).problems
                                 if p not in problems and "other settings" in p]
                covers = _covers(agent, sources, uids)
                if covers is False and agent is not None:
                    problems.append(f"the rules fence {', '.join(who)}, which leaves out the {agent.label}")
                if audit:
                    problems.append("the fence is in audit mode: it logs what it would block, blocks nothing")
                fenced = not problems
                diag.add("fence rules", fenced, "; ".join(problems) or
                         f"applied ({', '.join(who)}), enforcing, matching the policy",
                         _apply_example(policy_path, agent) if problems else None)

        # 5. sets
        try:
            with SetFeeder(1, 1, netns=netns) as feeder:
                info4 = feeder.info(DEFAULT_SET4)
                members = feeder.members(DEFAULT_SET4) if info4 is not None else {}
        except (OSError, DnsguardError) as exc:
            info4 = None
            diag.add("firewall sets", False, f"cannot read ipsets: {exc}", "run doctor as root")
        else:
            if info4 is None:
                diag.add("firewall sets", False, f"set {DEFAULT_SET4} does not exist",
                         "`dnsguard firewall apply ...` creates it; `dnsguard serve --firewall` fills it")
            else:
                ok, detail = _feeding(runner, db_path, members, cfg.firewall.min_ttl, cfg.server.listen,
                                      netns)
                diag.add("firewall sets", ok, f"{DEFAULT_SET4}: {info4.entries} addresses; {detail}",
                         "run serve with --firewall (or [firewall] enabled = true), in the namespace the "
                         "fence is in, so answers reach the set")

        # 5b. byte counts for the connection recorder: `serve` cannot turn them on under its unit
        if cfg.firewall.record_connections:
            try:
                acct = accounting_state(netns).get(ACCT_SYSCTLS[0])
            except OSError as exc:
                acct, why = None, f"cannot read it: {exc}"
            else:
                why = "nf_conntrack is not loaded (no fence rules?)" if acct is None else ""
            off = "off (net.netfilter.nf_conntrack_acct=0): connection rows get no byte counts"
            diag.add("connection accounting", acct is True,
                     "on: recorded connections get byte counts" if acct else why or off,
                     f"`{_apply_example(policy_path, agent)}` as root turns it on (dnsguard-fence.service "
                     "does at boot), or `sysctl -w net.netfilter.nf_conntrack_acct=1`")

    # 6. the agent's resolver
    if cfg is not None and agent is not None:
        listen_hosts = {h for h, _ in cfg.server.listen}
        if isinstance(agent, ContainerAgent):
            dns_servers = (agent.info.get("HostConfig") or {}).get("Dns") or []
            ok = bool(dns_servers) and all(s in listen_hosts for s in dns_servers)
            ours = ", ".join(sorted(h for h in listen_hosts if not h.startswith("127.")))
            uses = ", ".join(dns_servers) or "Docker's defaults"
            diag.add("agent's resolver", ok, f"{agent.label} uses {uses}",
                     f"give it dns: [{ours}] (compose: docker-compose.dnsguard.yml; docker run --dns)")
        else:
            redirected = bool(agent.sources()) and isinstance(agent, UserAgent) and \
                agent.pw.pw_uid in _fenced_uids(runner) and _has_redirect(runner, agent.pw.pw_uid)
            how = "redirected to dnsguard (nat DNSGUARD-DNS)" if redirected else "not redirected"
            diag.add("agent's resolver", redirected, f"{agent.label}'s DNS is {how}",
                     f"`dnsguard firewall apply --policy {policy_path} --user {user}`")

    # 7. from the agent's side
    if cfg is not None and agent is not None:
        name = f"doctor-{secrets.token_hex(4)}.dnsguard-doctor.invalid"
        out = agent.run(_DNS_SCRIPT, name, agent.resolver)
        got = classify_dns(out)
        detail = f"{name}: {got}"
        ok = got == "nxdomain"
        if ok and db_path:
            row = _logged(db_path, name, agent.sources(), log_wait)
            if row is None:
                ok = False
                detail += ", but dnsguard never saw it: the agent asked another resolver"
            elif row["verdict"] != "deny" or row["mode"] != "enforce":
                ok = False
                detail += f", logged as {row['verdict']}/{row['mode']}"
            else:
                detail += f", answered by dnsguard (logged from {row['client']})"
        diag.add("denied name from the agent", ok, detail + ("" if ok else f" -- {_last_line(out)}"),
                 "point the agent at dnsguard and apply the fence (see the checks above)")

        before = _reject_packets(runner)
        out = agent.run(_CONNECT_SCRIPT, PROBE_ADDRESS, str(PROBE_PORT))
        got = classify_connect(out)
        moved = _reject_packets(runner) > before
        ok = got == "refused" and moved
        detail = f"tcp {PROBE_ADDRESS}:{PROBE_PORT}: {got}"
        if got == "refused" and not moved:
            detail += ", but not by the fence (its reject counter did not move)"
        diag.add("hard-coded address from the agent", ok, detail + ("" if ok else f" -- {_last_line(out)}"),
                 _apply_example(policy_path, agent))
    return diag


def _last_line(out: str) -> str:
    lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no output)"


def _covers(agent: Agent | None, sources: list, uids: list[int]) -> bool | None:
    if agent is None:
        return None
    if isinstance(agent, UserAgent):
        return agent.pw.pw_uid in uids
    addrs = [ipaddress.ip_address(a) for a in agent.sources()]
    return bool(addrs) and all(any(a.version == n.version and a in n for n in sources) for a in addrs)


def _has_redirect(runner: Runner, uid: int) -> bool:
    out = runner.run(["iptables-save", "-t", "nat"], check=False).stdout
    return f"--uid-owner {uid} " in out and "-j DNAT" in out


def _apply_example(policy_path: str, agent: Agent | None) -> str:
    if isinstance(agent, UserAgent):
        return f"dnsguard firewall apply --policy {policy_path} --user {agent.pw.pw_name}"
    if isinstance(agent, ContainerAgent):
        nets = []
        for net in ((agent.info.get("NetworkSettings") or {}).get("Networks") or {}).values():
            ip, plen = (net or {}).get("IPAddress"), (net or {}).get("IPPrefixLen")
            if ip and plen:
                nets.append(str(ipaddress.ip_network(f"{ip}/{plen}", strict=False)))
        return f"dnsguard firewall apply --policy {policy_path} " + " ".join(f"--source {n}" for n in nets)
    return f"dnsguard firewall apply --policy {policy_path} --source SUBNET (or --user NAME)"


def _answered(db: str | None, since: float) -> dict[str, tuple[float, str]]:
    """IPv4 address -> (when, name) dnsguard last answered it, from the newest lookups since ``since``."""
    if not db:
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            rows = conn.execute("SELECT ts, qname, answers FROM lookups WHERE ts >= ? AND answers IS NOT "
                                "NULL ORDER BY id DESC LIMIT 500", (since,)).fetchall()
    except sqlite3.Error:
        return {}
    out: dict[str, tuple[float, str]] = {}
    for ts, qname, answers in rows:
        try:
            items = json.loads(answers)
        except ValueError:
            continue
        for item in items if isinstance(items, list) else ():
            if isinstance(item, str) and re.fullmatch(r"\d+\.\d+\.\d+\.\d+", item) and item not in out:
                out[item] = (ts, qname)
    return out


def _refed(ip: str, qname: str, listen: Sequence[tuple[str, int]], netns: str | None) -> bool:
    """Ask dnsguard for ``qname`` again (a cache hit feeds the set, at most once a second per
    answer) until ``ip`` is in the set; a few tries."""
    import dns.message

    from resolver.fence.ipsets import open_socket

    for attempt in range(3):
        if attempt:
            time.sleep(1.1)
        for host, port in listen:
            if ipaddress.ip_address(host).is_unspecified:
                host = "127.0.0.1" if ":" not in host else "::1"
            try:
                with open_socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM,
                                 netns=netns) as s:
                    s.settimeout(2.0)
                    s.connect((host, port))
                    s.send(dns.message.make_query(qname, "A").to_wire())
                    s.recv(4096)
            except OSError:
                continue
        try:
            with SetFeeder(1, 1, netns=netns) as feeder:
                if ip in feeder.members(DEFAULT_SET4):
                    return True
        except (OSError, DnsguardError):
            return False
    return False


def _feeding(runner: Runner, db: str | None, members: dict, min_ttl: int,
             listen: Sequence[tuple[str, int]], netns: str | None) -> tuple[bool, str]:
    """Whether `serve --firewall` feeds the set: the addresses it answered lately are in it.

    An entry lasts at least ``[firewall] min_ttl`` after each answer, so an address answered
    within that time and missing from the set was not fed -- or the set was made again since
    (`firewall remove` + `apply`), which empties it until the next answer: then dnsguard is
    asked again, and must put it back. With no answer to go by, it falls back to whether
    anything has bound the fence's NFLOG group (serve does).
    """
    if not _nflog_bound(runner, NFLOG_GROUP):
        return False, f"no dnsguard serve --firewall here (NFLOG group {NFLOG_GROUP} unbound)"
    now = time.time()
    answered = _answered(db, now - max(min_ttl, 60))
    fed = [ip for ip in answered if ip in members]
    must = [ip for ip, (ts, _) in answered.items() if ts >= now - (min_ttl - 2)]
    if fed:
        return True, (f"being fed: {len(fed)} of the {len(answered)} IPv4 addresses dnsguard answered "
                      f"lately are in it")
    if not must:
        return True, "dnsguard serve --firewall is running (no recent answer to check the set against)"
    ip = must[0]
    qname = answered[ip][1]
    if _refed(ip, qname, listen, netns):
        return True, f"being fed: asked for {qname} again, dnsguard put {ip} back in it"
    return False, (f"none of the {len(must)} IPv4 addresses dnsguard answered in the last {min_ttl} s is in "
                   f"it, and asking for {qname} again did not put {ip} there: answers are not reaching "
                   "the set")


def _nflog_bound(runner: Runner, group: int) -> bool:
    """Whether a process has bound NFLOG ``group`` in the namespace (nfnetlink_log's table)."""
    p = runner.run(["cat", "/proc/net/netfilter/nfnetlink_log"], check=False)
    return any(line.split()[:1] == [str(group)] for line in p.stdout.splitlines())
