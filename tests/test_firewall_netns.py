"""The fence, for real: kernel rules, kernel sets, NFLOG, inside throw-away network namespaces.

agent -> router (dnsguard rules + sets, forwards) -> internet (dnsmasq + echo servers);
see tests/netns.py. Needs root; skipped with the reason otherwise. Never touches
the root namespace (checked at the end of the module).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from netns import (
    AGENT4,
    AGENT6,
    AGENT_NET4,
    AGENT_NET6,
    DNS4,
    ROUTER_IN4,
    ROUTER_IN6,
    SERVER4,
    SERVER6,
    Servers,
    Topology,
    cleanup_stale,
    unavailable,
    wait_until,
)

from resolver.core.addrs import user_source
from resolver.fence import firewall as fw
from resolver.fence.ipsets import SetFeeder
from resolver.fence.nflog import NflogRecorder

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
S0, S1, S2 = SERVER4


def _root_state() -> tuple[str, str]:
    """dnsguard traces in the ROOT namespace (read-only look)."""
    traces = []
    for tool in ("iptables-save", "ip6tables-save"):
        out = subprocess.run([tool], capture_output=True, text=True, check=False).stdout
        traces.append("\n".join(ln for ln in out.splitlines() if "DNSGUARD" in ln or "dnsguard" in ln))
    sets = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, check=False).stdout
    return "\n".join(traces), "\n".join(s for s in sets.split() if s.startswith("dnsguard"))


@pytest.fixture(scope="module")
def topo(request: pytest.FixtureRequest) -> Topology:
    reason = unavailable()
    if reason:
        # As root the suite must run: a missing tool is a broken test machine, not a reason to skip.
        (pytest.fail if os.geteuid() == 0 else pytest.skip)(f"firewall netns suite: {reason}")
    cleanup_stale()
    before = _root_state()
    t = Topology()

    def finish() -> None:
        t.destroy()
        assert not any(n in t.names for n in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split())
        assert _root_state() == before, "the root namespace's firewall/sets changed"

    request.addfinalizer(finish)
    t.create()
    return t


@pytest.fixture(scope="module")
def servers(topo: Topology, request: pytest.FixtureRequest) -> Servers:
    srv = Servers(topo)
    for host in SERVER4:
        for port in (80, 443, 853, 53, 8080):
            srv.tcp(topo.internet, host, port)
        srv.udp(topo.internet, host, 443)
        srv.udp(topo.internet, host, 853)
    for host in SERVER6:
        srv.tcp(topo.internet, host, 443)
    srv.start()
    request.addfinalizer(srv.stop)
    return srv


@pytest.fixture(scope="module")
def dnsmasq(topo: Topology, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real DNS server on the 'internet' with local records; returns its address."""
    if subprocess.run(["which", "dnsmasq"], capture_output=True, check=False).returncode:
        pytest.fail("dnsmasq is not installed (scripts/install-test-deps installs it)")
    logdir = tmp_path_factory.mktemp("dnsmasq")
    proc = topo.spawn(
        topo.internet, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
        "--no-hosts", f"--listen-address={DNS4}", "--bind-interfaces", "--port=53", "--user=root",
        "--pid-file=", f"--log-facility={logdir / 'log'}",
        f"--host-record=allowed.test,{S0},{SERVER6[0]}", f"--host-record=other.test,{S1}",
        f"--host-record=audit.test,{S2}", "--local-ttl=60",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"dnsmasq exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        q = dns.message.make_query("allowed.test", "A")
        with topo.socket(topo.internet, socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.5)
            try:
                s.sendto(q.to_wire(), (DNS4, 53))
                return bool(dns.message.from_wire(s.recv(4096)).answer)
            except OSError:
                return False

    wait_until(answers, 10, what="dnsmasq to answer")
    return DNS4


@pytest.fixture
def router(topo: Topology) -> fw.Runner:
    """A runner for the router namespace; every test leaves it without dnsguard rules or sets."""
    runner = fw.Runner(topo.router)
    yield runner
    fw.remove(runner)
    for family in (4, 6):
        assert "DNSGUARD" not in runner.save(family)


@pytest.fixture
def feeder(topo: Topology) -> SetFeeder:
    f = SetFeeder(2, 60, netns=topo.router)
    f.ensure_sets()
    yield f
    f.close()


@pytest.fixture
def recorder(topo: Topology, feeder: SetFeeder, tmp_path: Path) -> NflogRecorder:
    rec = NflogRecorder(str(tmp_path / "conn.db"), 53, name_of=feeder.names.get, netns=topo.router)
    rec.start()
    yield rec
    rec.stop()


def container_spec(**kw: object) -> fw.FenceSpec:
    import ipaddress

    base: dict[str, object] = {
        "mode": "container",
        "sources": (ipaddress.ip_network(AGENT_NET4), ipaddress.ip_network(AGENT_NET6)),
        "listen": ((ROUTER_IN4, 53), (ROUTER_IN6, 53)),
    }
    base.update(kw)
    return fw.FenceSpec(**base)  # type: ignore[arg-type]


def rows(rec: NflogRecorder) -> list[tuple]:
    with sqlite3.connect(rec.database) as db:
        return db.execute("SELECT ts, source, destination, protocol, port, verdict, name FROM connections "
                          "ORDER BY ts").fetchall()


def wait_row(rec: NflogRecorder, destination: str, protocol: str, port: int | None) -> tuple:
    """The first `connections` row for that destination, waiting for the recorder (deadline 5 s)."""
    def find() -> tuple | None:
        for r in rows(rec):
            if r[2:5] == (destination, protocol, port):
                return r
        return None

    return wait_until(find, 5, what=f"a connections row for {destination} {protocol}/{port}")  # type: ignore[return-value]


def timed(fn, *args):  # noqa: ANN001, ANN202 - tiny helper
    t = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - t


def normalised_save(runner: fw.Runner, family: int) -> list[str]:
    out = []
    for line in runner.save(family).splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(":"):
            line = line.rsplit(" ", 1)[0]  # drop [packets:bytes]
        out.append(line)
    return out


# ------------------------------------------------------------------ container mode

def test_unfed_address_is_rejected_fast_and_recorded(topo, servers, router, feeder, recorder) -> None:
    fw.apply(container_spec(), router)
    before = time.time()
    result, took = timed(topo.tcp_connect, topo.agent, S1, 443)
    assert result == "refused"
    assert took < 1.0, "a reject must be immediate, not a timeout"
    assert recorder.wait_for(1, 5)
    (ts, src, dst, proto, port, verdict, name), = rows(recorder)
    assert (src, dst, proto, port, verdict, name) == (AGENT4, S1, "tcp", 443, "blocked", None)
    assert before - 1 <= ts <= time.time() + 1


def test_fed_address_is_reachable_with_clamped_timeout(topo, servers, router, feeder, recorder) -> None:
    fw.apply(container_spec(), router)
    assert topo.tcp_connect(topo.agent, S0, 443) == "refused"
    assert wait_row(recorder, S0, "tcp", 443)[5:] == ("blocked", None)
    feeder.feed([(S0, 45)], name="allowed.test")
    assert topo.tcp_connect(topo.agent, S0, 443) == "ok"
    assert topo.tcp_connect(topo.agent, S0, 80) == "ok"
    assert topo.udp_exchange(topo.agent, S0, 443) == ("ok", b"ping")
    timeout = feeder.members("dnsguard4")[S0]
    assert 40 <= timeout <= 45
    # only on the configured ports: 8080 is still closed, and recorded under the name
    assert topo.tcp_connect(topo.agent, S0, 8080) == "refused"
    assert wait_row(recorder, S0, "tcp", 8080)[5:] == ("blocked", "allowed.test")
    # TTLs outside [min_ttl, max_ttl] are clamped; a re-add refreshes the timeout
    feeder.feed([(S1, 10**9), (S2, 0)])
    members = feeder.members("dnsguard4")
    assert 55 <= members[S1] <= 60
    assert members[S2] <= 2
    feeder.feed([(S2, 50)])
    assert 45 <= feeder.members("dnsguard4")[S2] <= 50


def test_dns_and_dot_to_other_servers_blocked(topo, servers, dnsmasq, router, feeder, recorder) -> None:
    fw.apply(container_spec(), router)
    feeder.feed([(S0, 60), (dnsmasq, 60)])  # even a set member is no DNS server for the agent
    q = dns.message.make_query("allowed.test", "A").to_wire()
    assert topo.udp_exchange(topo.agent, dnsmasq, 53, q)[0] == "refused"
    assert topo.tcp_connect(topo.agent, dnsmasq, 53) == "refused"
    assert topo.tcp_connect(topo.agent, S0, 853) == "refused"
    assert topo.udp_exchange(topo.agent, S0, 853)[0] == "refused"
    assert topo.tcp_connect(topo.agent, S0, 53) == "refused"
    for dst, proto, port in ((dnsmasq, "udp", 53), (dnsmasq, "tcp", 53), (S0, "tcp", 853), (S0, "udp", 853)):
        assert wait_row(recorder, dst, proto, port)[5] == "blocked"


def test_ipv6_blocked_unless_fed(topo, servers, router, feeder, recorder) -> None:
    fw.apply(container_spec(), router)
    assert topo.tcp_connect(topo.agent, SERVER6[0], 443) == "refused"
    assert wait_row(recorder, SERVER6[0], "tcp", 443)[1:6] == (AGENT6, SERVER6[0], "tcp", 443, "blocked")
    feeder.feed([(SERVER6[0], 30)], name="allowed.test")
    assert topo.tcp_connect(topo.agent, SERVER6[0], 443) == "ok"
    assert topo.tcp_connect(topo.agent, SERVER6[1], 443) == "refused"


def test_expiry_closes_new_connections_but_not_established_ones(topo, servers, router) -> None:
    fw.apply(container_spec(), router)
    with SetFeeder(2, 2, netns=topo.router) as short:
        short.ensure_sets()
        short.feed([(S0, 1)])  # clamped up to min_ttl = 2 s
        assert short.members("dnsguard4")[S0] <= 2
        with topo.socket(topo.agent) as conn:
            conn.settimeout(3)
            conn.connect((S0, 443))
            conn.sendall(b"one")
            assert conn.recv(16) == b"one"
            wait_until(lambda: S0 not in short.members("dnsguard4"), 10, what="the set entry to expire")
            assert topo.tcp_connect(topo.agent, S0, 443) == "refused"
            conn.sendall(b"two")  # the established connection survives
            assert conn.recv(16) == b"two"


def test_audit_mode_lets_through_and_records_would_block(topo, servers, router, feeder, recorder) -> None:
    fw.apply(container_spec(audit=True), router)
    assert topo.tcp_connect(topo.agent, S2, 443) == "ok"
    assert topo.tcp_connect(topo.agent, SERVER6[1], 443) == "ok"
    assert wait_row(recorder, S2, "tcp", 443)[1:6] == (AGENT4, S2, "tcp", 443, "would-block")
    assert wait_row(recorder, SERVER6[1], "tcp", 443)[1:6] == (AGENT6, SERVER6[1], "tcp", 443, "would-block")


def test_other_sources_are_not_fenced(topo, servers, router) -> None:
    import ipaddress

    fw.apply(container_spec(sources=(ipaddress.ip_network("192.0.2.128/25"),)), router)
    assert topo.tcp_connect(topo.agent, S1, 443) == "ok"  # 192.0.2.2 is outside the fenced subnet


def test_allow_cidrs_and_any_ports(topo, servers, router, feeder) -> None:
    import ipaddress

    fw.apply(container_spec(allow_cidrs=(ipaddress.ip_network(f"{S1}/32"),), ports=None), router)
    assert topo.tcp_connect(topo.agent, S1, 8080) == "ok"  # static CIDR: any port
    assert topo.tcp_connect(topo.agent, S0, 8080) == "refused"
    feeder.feed([(S0, 30)])
    assert topo.tcp_connect(topo.agent, S0, 8080) == "ok"  # ports = any


# ------------------------------------------------------------------ apply / remove bookkeeping

def _preexisting(topo: Topology) -> None:
    topo.ns(topo.router, "iptables-restore", "--noflush", input=(
        "*filter\n:HOSTRULES - [0:0]\n-A HOSTRULES -p tcp --dport 22 -j ACCEPT\n"
        "-A FORWARD -s 198.51.100.0/24 -j HOSTRULES\n-A OUTPUT -o lo -j ACCEPT\nCOMMIT\n"
        "*nat\n-A POSTROUTING -s 192.0.2.0/24 -o r1 -j RETURN\nCOMMIT\n"))
    topo.ns(topo.router, "ip6tables-restore", "--noflush", input=(
        "*filter\n-A FORWARD -p ipv6-icmp -j ACCEPT\nCOMMIT\n"))


def _drop_preexisting(topo: Topology) -> None:
    topo.ns(topo.router, "iptables-restore", "--noflush", input=(
        "*filter\n-D FORWARD -s 198.51.100.0/24 -j HOSTRULES\n-D OUTPUT -o lo -j ACCEPT\n-F HOSTRULES\n"
        "-X HOSTRULES\nCOMMIT\n*nat\n-D POSTROUTING -s 192.0.2.0/24 -o r1 -j RETURN\nCOMMIT\n"))
    topo.ns(topo.router, "ip6tables-restore", "--noflush", input=(
        "*filter\n-D FORWARD -p ipv6-icmp -j ACCEPT\nCOMMIT\n"))


def test_apply_is_idempotent_and_remove_restores_exactly(topo, router) -> None:
    _preexisting(topo)
    try:
        before = {f: normalised_save(router, f) for f in (4, 6)}
        fw.apply(container_spec(), router)
        once = {f: normalised_save(router, f) for f in (4, 6)}
        fw.apply(container_spec(), router)
        twice = {f: normalised_save(router, f) for f in (4, 6)}
        assert once == twice
        jumps = [ln for ln in once[4] if "-j DNSGUARD" in ln and not ln.startswith("-A DNSGUARD")]
        assert len(jumps) == 1 and jumps[0].startswith("-A FORWARD")
        assert once[4].index(jumps[0]) < once[4].index("-A FORWARD -s 198.51.100.0/24 -j HOSTRULES")
        # switching mode replaces everything, nat table included
        fw.apply(fw.FenceSpec("user", uid=NOBODY, user="nobody", listen=(("127.0.0.1", 5353),)), router)
        user = normalised_save(router, 4)
        assert not any("-j DNSGUARD" in ln for ln in user if ln.startswith("-A FORWARD"))
        assert any(ln.startswith("-A OUTPUT") and "-j DNSGUARD-DNS" in ln for ln in user)
        fw.apply(container_spec(), router)
        assert {f: normalised_save(router, f) for f in (4, 6)} == once
        plan = fw.remove(router)
        assert plan.steps
        after = {f: normalised_save(router, f) for f in (4, 6)}
        assert after == before
        assert fw.remove(router).steps == []  # removing again: nothing to do
    finally:
        _drop_preexisting(topo)
    with SetFeeder(1, 1, netns=topo.router) as probe:
        assert probe.info("dnsguard4") is None and probe.info("dnsguard6") is None


def test_docker_user_chain_is_preferred(topo, servers, router) -> None:
    topo.ns(topo.router, "iptables-restore", "--noflush", input=(
        "*filter\n:DOCKER-USER - [0:0]\n-A DOCKER-USER -j RETURN\n-A FORWARD -j DOCKER-USER\nCOMMIT\n"))
    try:
        before = normalised_save(router, 4)
        fw.apply(container_spec(), router)
        saved = normalised_save(router, 4)
        docker = [ln for ln in saved if ln.startswith("-A DOCKER-USER")]
        assert "-j DNSGUARD" in docker[0] and docker[1] == "-A DOCKER-USER -j RETURN"
        assert not any(ln.startswith("-A FORWARD") and "DNSGUARD" in ln for ln in saved)
        assert topo.tcp_connect(topo.agent, S1, 443) == "refused"
        fw.remove(router)
        assert normalised_save(router, 4) == before
    finally:
        topo.ns(topo.router, "iptables-restore", "--noflush", input=(
            "*filter\n-D FORWARD -j DOCKER-USER\n-F DOCKER-USER\n-X DOCKER-USER\nCOMMIT\n"))


def test_status_reports_rules_sets_and_resolver(topo, servers, router, feeder) -> None:
    spec = container_spec()
    st = fw.status(router, listen=[(ROUTER_IN4, 53)], spec=spec)
    assert not st.installed and not st.ok
    fw.apply(spec, router)
    # stand-in resolver on the listen address: echoes the query back (same ID = an answer)
    probe = Servers(topo)
    probe.udp(topo.router, ROUTER_IN4, 53)
    probe.start()
    try:
        st = fw.status(router, listen=[(ROUTER_IN4, 53)], spec=spec)
        assert st.ok, st.describe()
        assert st.families[4].comment == fw.jump_comment(spec)
        assert st.sets["dnsguard4"] is not None
    finally:
        probe.stop()
    st = fw.status(router, listen=[(ROUTER_IN4, 53)], spec=spec)
    assert not st.ok
    assert any("not answering" in p for p in st.problems), st.describe()
    st = fw.status(router, listen=[], spec=container_spec(audit=True))
    assert any("other settings" in p for p in st.problems)


# ------------------------------------------------------------------ user mode

@pytest.fixture
def stub_resolver(topo: Topology) -> tuple[Servers, int]:
    """UDP+TCP listeners on 127.0.0.1 / ::1 in the router (where dnsguard would listen)."""
    with topo.socket(topo.router, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = Servers(topo)
    for host in ("127.0.0.1", "::1"):
        srv.udp(topo.router, host, port)
        srv.tcp(topo.router, host, port)
    srv.start()
    yield srv, port
    srv.stop()


def test_user_mode_fences_only_that_user(topo, servers, router, feeder, recorder, stub_resolver) -> None:
    _, port = stub_resolver
    fw.apply(fw.FenceSpec("user", uid=NOBODY, user="nobody",
                          listen=(("127.0.0.1", port), ("::1", port))), router)
    tcp = "exec 3<>/dev/tcp/{}/{} && echo connected"
    p = topo.run_as(topo.router, NOBODY, tcp.format(S0, 443))
    assert p.returncode != 0 and "refused" in p.stderr.lower(), p
    assert wait_row(recorder, S0, "tcp", 443)[1:6] == ("198.51.100.1", S0, "tcp", 443, "blocked")
    assert topo.tcp_connect(topo.router, S0, 443) == "ok"  # root is not fenced
    feeder.feed([(S0, 30)], name="allowed.test")
    p = topo.run_as(topo.router, NOBODY, tcp.format(S0, 443))
    assert p.returncode == 0, p
    for target in (f"{S0}/853", f"[{SERVER6[0]}]/443"):
        host, prt = target.rsplit("/", 1)
        p = topo.run_as(topo.router, NOBODY, tcp.format(host.strip("[]"), prt))
        assert p.returncode != 0, (target, p)


def test_user_mode_redirects_dns_from_loopback(topo, servers, dnsmasq, router, stub_resolver) -> None:
    srv, port = stub_resolver
    fw.apply(fw.FenceSpec("user", uid=NOBODY, user="nobody",
                          listen=(("127.0.0.1", port), ("::1", port))), router)
    # the user's DNS to any server, UDP and TCP, IPv4 and IPv6, lands on dnsguard's port
    script = (f"printf 'q4' > /dev/udp/{dnsmasq}/53; printf 'q6' > /dev/udp/2001:db8:c::11/53; "
              f"exec 3<>/dev/tcp/{dnsmasq}/53 && echo tcp-ok")
    p = topo.run_as(topo.router, NOBODY, script)
    assert p.returncode == 0 and "tcp-ok" in p.stdout, p
    wait_until(lambda: len(srv.seen) >= 3, 5, what="redirected queries to arrive")
    seen = {(proto, where.rsplit(":", 1)[0], peer[0]) for proto, where, peer in srv.seen}
    # source rewritten to a loopback address naming the user (127.255.<uid>), so the default
    # [server] clients accepts it and the log can say whose lookup it was
    assert ("udp", "127.0.0.1", user_source(NOBODY)) in seen
    assert ("tcp", "127.0.0.1", user_source(NOBODY)) in seen
    assert ("udp", "::1", "::1") in seen
    # root's DNS still goes where it was sent
    q = dns.message.make_query("allowed.test", "A")
    with topo.socket(topo.router, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(q.to_wire(), (dnsmasq, 53))
        assert dns.message.from_wire(s.recv(4096)).answer


# ------------------------------------------------------------------ the CLI

def _cli(topo: Topology, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env_py = [sys.executable, "-m", "resolver.cli.firewall"]
    proc = subprocess.run(["ip", "netns", "exec", topo.router, *env_py, *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if check:
        assert proc.returncode == 0, proc
    return proc


def test_cli_apply_status_show_remove(topo, servers, router, tmp_path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[server]\nlisten = ["{ROUTER_IN4}:53", "[{ROUTER_IN6}]:53"]\n'
                      '[upstream]\nservers = ["203.0.113.53:53"]\n'
                      '[firewall]\nports = ["tcp/443"]\n')
    who = ["--source", AGENT_NET4, "--source", AGENT_NET6, "--policy", str(policy)]
    before = normalised_save(router, 4)
    shown = _cli(topo, "show", *who).stdout
    dry = _cli(topo, "apply", "--dry-run", *who).stdout
    assert normalised_save(router, 4) == before  # show / --dry-run touch nothing
    assert "-A DNSGUARD -s 192.0.2.0/24 -g DNSGUARD-OUT" in shown
    assert "--dports 53,853" in shown and "tcp/443" not in shown and "-m tcp --dport 443" in shown
    assert "iptables-restore --noflush" in dry and "ipset create dnsguard4" in dry
    assert "applied" in _cli(topo, "apply", *who).stdout
    assert topo.tcp_connect(topo.agent, S0, 443) == "refused"
    st = _cli(topo, "status", *who, check=False)
    assert st.returncode == 1 and "NOT answering" in st.stdout  # nothing listens on 192.0.2.1:53
    assert "IPv4 rules: in place" in st.stdout and "set dnsguard4: hash:ip inet" in st.stdout
    assert "removed" in _cli(topo, "remove").stdout
    assert normalised_save(router, 4) == before
    bad = _cli(topo, "apply", "--user", "nobody", "--source", AGENT_NET4, check=False)
    assert bad.returncode == 2 and "not both" in bad.stderr


ACCT = "/proc/sys/net/netfilter/nf_conntrack_acct"


def test_apply_turns_on_conntrack_accounting_and_status_and_doctor_say_so(topo, router, tmp_path) -> None:
    """`serve` cannot write /proc/sys under its unit (ProtectKernelTunables=yes): the fence's
    apply, run as root, turns byte counting on in the namespace it fences."""
    from resolver.doctor import diagnose

    def acct() -> str:
        return topo.ns(topo.router, "cat", ACCT).stdout.strip()

    policy = tmp_path / "policy.toml"
    policy.write_text(f'[server]\nlisten = ["{ROUTER_IN4}:53"]\n[upstream]\nservers = ["203.0.113.53:53"]\n'
                      f'[log]\ndatabase = "{tmp_path / "log.db"}"\n')
    who = ["--source", AGENT_NET4, "--source", AGENT_NET6, "--policy", str(policy)]
    fw.apply(container_spec(), router)  # loads nf_conntrack here, whose sysctl this is
    topo.ns(topo.router, "sysctl", "-qw", "net.netfilter.nf_conntrack_acct=0")
    assert acct() == "0"
    st = fw.status(router, spec=container_spec())
    assert st.accounting is not None and st.accounting["net.netfilter.nf_conntrack_acct"] is False
    assert any("conntrack accounting is off" in p for p in st.problems), st.describe()
    cli = _cli(topo, "status", *who, check=False)
    assert cli.returncode == 1 and "conntrack accounting (connection byte counts): off" in cli.stdout
    check = {c.name: c for c in diagnose(str(policy), netns=topo.router).checks}["connection accounting"]
    assert not check.ok and "nf_conntrack_acct=0" in check.detail and "firewall apply" in check.fix
    assert "sysctl -w net.netfilter.nf_conntrack_acct=1" in _cli(topo, "apply", "--dry-run", *who).stdout
    assert acct() == "0"  # --dry-run changes nothing

    assert "applied" in _cli(topo, "apply", *who).stdout
    assert acct() == "1"
    assert topo.ns(topo.router, "cat", ACCT.replace("acct", "timestamp")).stdout.strip() == "1"
    st = fw.status(router, spec=container_spec())
    assert st.accounting["net.netfilter.nf_conntrack_acct"] is True
    assert not any("accounting" in p for p in st.problems), st.describe()
    shown = _cli(topo, "status", *who, check=False).stdout
    assert "conntrack accounting (connection byte counts): on" in shown
    check = {c.name: c for c in diagnose(str(policy), netns=topo.router).checks}["connection accounting"]
    assert check.ok and check.fix is None, check

    # No connection recording: apply leaves the sysctl alone, and nobody calls it a problem.
    topo.ns(topo.router, "sysctl", "-qw", "net.netfilter.nf_conntrack_acct=0")
    policy.write_text(policy.read_text() + "[firewall]\nrecord_connections = false\n")
    _cli(topo, "apply", *who)
    assert acct() == "0"
    assert "accounting" not in _cli(topo, "status", *who, check=False).stdout.split("problems:")[-1]
    assert "connection accounting" not in {c.name for c in diagnose(str(policy), netns=topo.router).checks}
    topo.ns(topo.router, "sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1")


def test_the_fence_units_reload_reapplies_with_the_new_args(topo, servers, router, tmp_path) -> None:
    """`systemctl reload dnsguard-fence` runs the unit's ExecReload= with fence.env read again: from
    audit to enforce in place, the rules never absent in between (so Docker need not be touched)."""
    import shlex

    unit = (REPO / "resolver" / "deploy" / "systemd" / "dnsguard-fence.service").read_text()
    reload = next(ln for ln in unit.splitlines() if ln.startswith("ExecReload=")).removeprefix("ExecReload=")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[server]\nlisten = ["{ROUTER_IN4}:53"]\n[upstream]\nservers = ["203.0.113.53:53"]\n')

    def systemctl_reload(fence_args: str) -> None:
        argv = []
        for word in shlex.split(reload.replace("/etc/dnsguard/policy.toml", str(policy))):
            argv += shlex.split(fence_args) if word == "$FENCE_ARGS" else [word]
        assert argv[0] == "/usr/local/bin/dnsguard"
        p = subprocess.run(["ip", "netns", "exec", topo.router, sys.executable, "-m", "resolver", *argv[1:]],
                           capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.returncode == 0 and "fence applied" in p.stdout, p

    systemctl_reload(f"--source {AGENT_NET4} --source {AGENT_NET6} --audit")
    assert topo.tcp_connect(topo.agent, S1, 443) == "ok"  # audit: nothing blocked
    audit = normalised_save(router, 4)
    systemctl_reload(f"--source {AGENT_NET4} --source {AGENT_NET6}")
    assert topo.tcp_connect(topo.agent, S1, 443) == "refused"
    enforce = normalised_save(router, 4)
    assert enforce != audit and sum("-j DNSGUARD" in ln and not ln.startswith("-A DNSGUARD")
                                    for ln in enforce) == 1
    systemctl_reload(f"--source {AGENT_NET4} --source {AGENT_NET6}")  # again: nothing changes
    assert normalised_save(router, 4) == enforce


# ------------------------------------------------------------------ end to end: dnsguard serve --firewall

def test_serve_firewall_end_to_end(topo, servers, dnsmasq, router, tmp_path) -> None:
    """The real server in the router feeds the sets; the agent reaches exactly what it resolved."""
    import threading

    db = tmp_path / "log.db"
    policy = tmp_path / "policy.toml"
    policy.write_text(f'mode = "enforce"\n[server]\nlisten = ["{ROUTER_IN4}:53"]\n'
                      f'clients = ["{AGENT_NET4}", "127.0.0.0/8"]\n[upstream]\nservers = ["{dnsmasq}:53"]\n'
                      f'[allow]\ndomains = ["allowed.test"]\n[log]\ndatabase = "{db}"\n'
                      '[firewall]\nenabled = true\nmin_ttl = 2\nmax_ttl = 30\n')
    proc = topo.spawn(topo.router, sys.executable, "-m", "resolver", "serve", "--policy", str(policy),
                      "--firewall", "--metrics", "127.0.0.1:9153", stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE, text=True, cwd=REPO,
                      env={**os.environ, "PYTHONPATH": str(REPO)})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                reader.join(2)
                raise AssertionError(f"serve exited {proc.returncode}: {''.join(lines)}")
            return any(f"listening on {ROUTER_IN4}:53" in ln for ln in lines)

        wait_until(ready, 15, what="dnsguard serve to listen")
        from resolver.policy.config import load_config

        spec = fw.spec_from_config(load_config(policy), sources=[AGENT_NET4, AGENT_NET6])
        fw.apply(spec, router)
        assert topo.tcp_connect(topo.agent, S0, 443) == "refused"

        def ask(name: str) -> dns.message.Message:
            q = dns.message.make_query(name, "A")
            with topo.socket(topo.agent, socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.sendto(q.to_wire(), (ROUTER_IN4, 53))
                return dns.message.from_wire(s.recv(4096))

        answer = ask("allowed.test")
        assert [rd.address for rr in answer.answer for rd in rr] == [S0]
        assert topo.tcp_connect(topo.agent, S0, 443) == "ok"  # fed before the answer was sent
        assert ask("other.test").rcode() == dns.rcode.NXDOMAIN
        assert topo.tcp_connect(topo.agent, S1, 443) == "refused"
        assert topo.tcp_connect(topo.agent, S0, 8080) == "refused"

        def row(dst: str, port: int) -> tuple | None:
            if not db.exists():
                return None
            with sqlite3.connect(db) as conn:
                return conn.execute("SELECT source, protocol, verdict, name FROM connections "
                                    "WHERE destination = ? AND port = ?", (dst, port)).fetchone()

        assert wait_until(lambda: row(S1, 443), 5, what="blocked row for other.test") == (
            AGENT4, "tcp", "blocked", None)
        assert wait_until(lambda: row(S0, 8080), 5, what="blocked row for allowed.test:8080") == (
            AGENT4, "tcp", "blocked", "allowed.test")
        st = fw.status(router, [(ROUTER_IN4, 53)], spec)
        assert st.ok, st.describe()
        _check_fence_metrics(topo)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        reader.join(5)
    # fail closed: the resolver is gone, status says so; entries only expire from here on
    st = fw.status(router, [(ROUTER_IN4, 53)])
    assert not st.ok and any("fail closed" in p for p in st.problems)


def _check_fence_metrics(topo: Topology) -> None:
    """/metrics in the router's namespace: the fence's figures, read by the scrape's own netlink socket."""
    with topo.socket(topo.router) as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", 9153))
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        raw = b"".join(iter(lambda: s.recv(65536), b""))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    text = body.decode()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (apt-get install prometheus)"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    def figure(line_start: str) -> float:
        m = re.search(rf"^{re.escape(line_start)} (\S+)$", text, re.MULTILINE)
        assert m, f"{line_start} missing from:\n{text}"
        return float(m.group(1))

    assert figure('dnsguard_fence_set_entries{family="ipv4"}') >= 1  # allowed.test's address
    assert figure("dnsguard_fence_feeds_total") >= 1
    assert figure("dnsguard_fence_blocked_recorded_total") >= 2
    assert figure("dnsguard_fence_feed_errors_total") == 0
