"""Every outbound connection recorded from conntrack, for real: the namespace lab of
tests/netns.py, a real `dnsguard serve --firewall` in the router (one for the module,
listening for the agent and for loopback-redirected user-mode DNS), an HTTP server in the
"internet" namespace, and the `connections` rows it writes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import dns.message
import pytest
from netns import (
    AGENT4,
    AGENT6,
    AGENT_NET4,
    AGENT_NET6,
    DNS4,
    ROUTER_IN4,
    SERVER4,
    SERVER6,
    Servers,
    Topology,
    wait_until,
)
from test_firewall_netns import container_spec, dnsmasq, router, topo  # noqa: F401 - shared fixtures

from resolver.fence import firewall as fw
from resolver.fence.connrec import ConnRecorder
from resolver.fence.conntrack import enable_accounting
from resolver.fence.ipsets import SetFeeder, open_socket
from resolver.policy.config import load_config

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534
S0, S1, S2 = SERVER4
USER_PORT = 5353
METRICS_PORT = 9154
ROUTER_OUT4 = "198.51.100.1"
# Per packet: IPv4 20 + TCP 20..60 bytes of headers; plus the HTTP request/response heads.
HEADERS_PER_PACKET = 80
HTTP_HEADS = 1024

HTTP_SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

class H(BaseHTTPRequestHandler):
    def _reply(self):
        n = int(parse_qs(urlparse(self.path).query).get("n", ["0"])[0])
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        left = n
        while left:
            chunk = min(left, 65536)
            self.wfile.write(b"d" * chunk)
            left -= chunk
    def do_GET(self):
        self._reply()
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        while length:
            got = self.rfile.read(min(length, 65536))
            if not got:
                return
            length -= len(got)
        self._reply()
    def log_message(self, *a):
        pass

servers = [ThreadingHTTPServer((host, 80), H) for host in sys.argv[1:]]
import threading
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
servers[0].serve_forever()
"""


@pytest.fixture(scope="module")
def http(topo: Topology) -> list[str]:  # noqa: F811
    proc = topo.spawn(topo.internet, sys.executable, "-c", HTTP_SERVER, S0, S1, S2, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
    return [S0, S1, S2]


@pytest.fixture(scope="module")
def echo(topo: Topology, request: pytest.FixtureRequest) -> Servers:  # noqa: F811
    srv = Servers(topo)
    srv.tcp(topo.internet, S0, 443)
    srv.udp(topo.internet, S0, 443)
    srv.tcp(topo.internet, SERVER6[0], 443)
    srv.start()
    request.addfinalizer(srv.stop)
    return srv


@pytest.fixture(scope="module")
def serve(topo: Topology, dnsmasq: str, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """`dnsguard serve --firewall` in the router; returns its policy path (the log is beside it)."""
    tmp = tmp_path_factory.mktemp("serve")
    db = tmp / "log.db"
    policy = tmp / "policy.toml"
    policy.write_text(
        f'mode = "enforce"\n[server]\nlisten = ["{ROUTER_IN4}:53", "127.0.0.1:{USER_PORT}"]\n'
        f'clients = ["{AGENT_NET4}", "127.0.0.0/8"]\n[upstream]\nservers = ["{dnsmasq}:53"]\n'
        '[allow]\ndomains = ["allowed.test"]\ncidrs = ["203.0.113.53/32"]\n'
        f'[log]\ndatabase = "{db}"\n'
        '[firewall]\nenabled = true\nmin_ttl = 60\nconnection_refresh_s = 1\n'
        f'[[clients]]\nname = "agent"\nsources = ["{AGENT_NET4}"]\n')
    proc = topo.spawn(topo.router, sys.executable, "-m", "resolver", "serve", "--policy", str(policy),
                      "--firewall", "--metrics", f"127.0.0.1:{METRICS_PORT}", stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE, text=True, cwd=REPO,
                      env={**os.environ, "PYTHONPATH": str(REPO)})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()

    def ready() -> bool:
        if proc.poll() is not None:
            reader.join(2)
            raise AssertionError(f"serve exited {proc.returncode}: {''.join(lines)}")
        return any(f"listening on 127.0.0.1:{USER_PORT}" in ln for ln in lines)

    wait_until(ready, 15, what="dnsguard serve to listen")
    assert not any("cannot read" in ln for ln in lines), lines
    return policy


def _db(policy: Path) -> Path:
    return policy.parent / "log.db"


_TEST_STARTED = [0.0]


@pytest.fixture(autouse=True)
def _rows_of_this_test_only() -> None:
    # Tests share one serve and its log, and ~3,000 connections of the burst test make a source
    # port seen before likely: a test looking for its connection by port must not find an
    # earlier test's row (which made two tests fail now and then under load).
    _TEST_STARTED[0] = time.time()


def rows(policy: Path, where: str = "1", params: tuple = ()) -> list[dict]:
    """This test's connection rows matching ``where`` (rows from earlier tests are not seen)."""
    with sqlite3.connect(_db(policy)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM connections WHERE ({where}) AND ts >= ? "
                                              "ORDER BY id", (*params, _TEST_STARTED[0]))]


def ask(topo: Topology, name: str) -> list[str]:  # noqa: F811
    q = dns.message.make_query(name, "A")
    with topo.socket(topo.agent, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(q.to_wire(), (ROUTER_IN4, 53))
        answer = dns.message.from_wire(s.recv(4096))
    return [rd.address for rr in answer.answer for rd in rr]


def resolve(topo: Topology) -> None:  # noqa: F811
    """The agent looks up allowed.test through dnsguard until the set holds its address.

    The `router` fixture destroys the sets after each test, and dnsguard refreshes a cached
    answer's set entries at most once a second, so the next test's first lookup may come
    too soon after the last refresh to put the address back.
    """
    with SetFeeder(netns=topo.router) as probe:
        wait_until(lambda: ask(topo, "allowed.test") == [S0] and S0 in probe.members("dnsguard4"), 10,
                   interval=0.1, what="allowed.test to be resolved into the set")


def http_exchange(sock: socket.socket, upload: int, download: int) -> None:
    sock.sendall(f"POST /?n={download} HTTP/1.0\r\nHost: t\r\nContent-Length: {upload}\r\n\r\n".encode()
                 + b"u" * upload)
    got = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    assert got.startswith(b"HTTP/1.0 200") and got.endswith(b"d" * 100)
    assert len(got.split(b"\r\n\r\n", 1)[1]) == download


def apply_container(router: fw.Runner, policy: Path, audit: bool = False) -> fw.FenceSpec:  # noqa: F811
    spec = fw.spec_from_config(load_config(policy), sources=[AGENT_NET4, AGENT_NET6], audit=audit)
    fw.apply(spec, router)
    return spec


def assert_bytes(row: dict, out_payload: int, in_payload: int) -> None:
    """Counters hold the payload and no more than headers on top of it."""
    headers_out = HTTP_HEADS + HEADERS_PER_PACKET * row["packets_out"]
    headers_in = HTTP_HEADS + HEADERS_PER_PACKET * row["packets_in"]
    assert out_payload <= row["bytes_out"] <= out_payload + headers_out
    assert in_payload <= row["bytes_in"] <= in_payload + headers_in


# ------------------------------------------------------------------ container mode

def test_allowed_download_and_upload_is_one_complete_row(topo, router, http, serve) -> None:  # noqa: F811
    apply_container(router, serve)
    resolve(topo)
    with topo.socket(topo.agent) as s:
        s.settimeout(5)
        s.connect((S0, 80))
        sport = s.getsockname()[1]
        http_exchange(s, 300_000, 200_000)
    # completed on FIN, not two minutes later when conntrack destroys the entry
    done = wait_until(lambda: rows(serve, "source_port = ? AND end_ts IS NOT NULL", (sport,)), 10,
                      what="the connection's row to be completed")
    (row,) = done
    assert (row["source"], row["destination"], row["protocol"], row["port"]) == (AGENT4, S0, "tcp", 80)
    assert (row["verdict"], row["name"], row["rule"], row["client"]) == ("allowed", "allowed.test",
                                                                          "allowed.test", "agent")
    assert row["ts"] <= row["end_ts"]
    assert_bytes(row, 300_000, 200_000)


def test_hard_coded_address_gives_a_blocked_row(topo, router, http, serve) -> None:  # noqa: F811
    apply_container(router, serve)
    assert topo.tcp_connect(topo.agent, S1, 80) == "refused"
    (row,) = wait_until(lambda: rows(serve, "destination = ? AND port = 80", (S1,)), 5, what="blocked row")
    assert (row["source"], row["verdict"], row["name"], row["rule"], row["client"]) == (
        AGENT4, "blocked", None, None, "agent")
    assert row["bytes_out"] is None and row["bytes_in"] is None and row["end_ts"] == row["ts"]


def test_held_open_connection_is_visible_and_its_counters_grow(topo, router, http, serve) -> None:  # noqa: F811
    apply_container(router, serve)
    resolve(topo)
    with topo.socket(topo.agent) as s:
        s.settimeout(5)
        s.connect((S0, 80))
        sport = s.getsockname()[1]
        s.sendall(f"POST /?n=10 HTTP/1.0\r\nContent-Length: {150_000}\r\n\r\n".encode() + b"u" * 50_000)

        def open_row(at_least: int) -> dict | None:
            found = rows(serve, "source_port = ? AND end_ts IS NULL AND bytes_out >= ?", (sport, at_least))
            return found[0] if found else None

        first = wait_until(lambda: open_row(50_000), 10, what="the open connection with 50 KB out")
        assert first["verdict"] == "allowed" and first["bytes_out"] < 100_000
        s.sendall(b"u" * 100_000)
        second = wait_until(lambda: open_row(150_000), 10, what="the counters to grow while open")
        assert second["id"] == first["id"] and second["packets_out"] > first["packets_out"]
        while s.recv(65536):
            pass
    wait_until(lambda: rows(serve, "source_port = ? AND end_ts IS NOT NULL", (sport,)), 10,
               what="the row to be completed on close")


def test_audit_mode_gives_a_would_block_row_with_bytes(topo, router, http, serve) -> None:  # noqa: F811
    apply_container(router, serve, audit=True)
    with topo.socket(topo.agent) as s:
        s.settimeout(5)
        s.connect((S2, 80))  # never resolved: would be blocked, let through in audit
        sport = s.getsockname()[1]
        http_exchange(s, 1_000, 50_000)
    (row,) = wait_until(lambda: rows(serve, "source_port = ? AND end_ts IS NOT NULL", (sport,)), 10,
                        what="would-block row")
    assert (row["verdict"], row["name"], row["rule"]) == ("would-block", None, None)
    assert_bytes(row, 1_000, 50_000)
    # one row per connection: the NFLOG copy of the first packet is not recorded as well
    assert len(rows(serve, "destination = ? AND port = 80", (S2,))) == 1


def _burst(topo: Topology, n: int, port: int = 443) -> set[int]:  # noqa: F811
    ports = set()
    for _ in range(n):
        with topo.socket(topo.agent) as s:
            s.settimeout(5)
            s.connect((S0, port))
            ports.add(s.getsockname()[1])
            s.sendall(b"x")
            assert s.recv(1) == b"x"
    return ports


def test_burst_of_short_connections_is_fully_accounted_for(topo, router, echo, serve) -> None:  # noqa: F811
    apply_container(router, serve)
    resolve(topo)
    before = {r["id"] for r in rows(serve, "port = 443")}
    n = 3000
    ports = _burst(topo, n)
    assert len(ports) == n  # distinct source ports: distinct connections

    def accounted() -> bool:
        with sqlite3.connect(_db(serve)) as conn:
            dropped = conn.execute("SELECT coalesce(sum(dropped), 0) FROM connection_overflow").fetchone()[0]
        done = [r for r in rows(serve, "port = 443 AND end_ts IS NOT NULL") if r["id"] not in before]
        return len(done) + dropped == n

    wait_until(accounted, 30, what=f"{n} connections accounted for (rows + counted overflow)")
    got = [r for r in rows(serve, "port = 443") if r["id"] not in before]
    assert {r["source_port"] for r in got} <= ports
    assert all(r["verdict"] == "allowed" and r["name"] == "allowed.test" for r in got)


def test_overflow_is_counted_when_the_recorder_cannot_follow(topo, router, echo, tmp_path) -> None:  # noqa: F811
    """A recorder allowed to follow only 50 open flows counts the others as dropped."""
    fw.apply(container_spec(allow_cidrs=(ipaddress.ip_network(f"{S0}/32"),)), router)
    topo.ns(topo.router, "conntrack", "-F", check=False)  # a clean table: only these
    db = tmp_path / "small.db"
    n = 120
    with ConnRecorder(str(db), netns=topo.router, refresh=1.0, max_open=50) as rec, ExitStack() as held:
        for _ in range(n):  # all open at once: 50 followed, 70 not
            s = held.enter_context(topo.socket(topo.agent))
            s.settimeout(5)
            s.connect((S0, 443))
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        wait_until(lambda: rec.dropped == n - 50, 10, what="70 connections counted as dropped")
        held.close()

        def accounted() -> tuple | None:
            with sqlite3.connect(db) as conn:
                recorded = conn.execute("SELECT count(*) FROM connections").fetchone()[0]
                dropped = conn.execute("SELECT coalesce(sum(dropped), 0) FROM connection_overflow"
                                       ).fetchone()[0]
            return (recorded, dropped) if recorded + dropped == n else None

        recorded, dropped = wait_until(accounted, 15, what="rows + dropped == connections")
        assert recorded == 50 and dropped == n - 50 == rec.dropped
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*), min(rule), min(verdict) FROM connections").fetchone() == (
            50, None, "allowed")


def test_ipv6_connection_is_recorded_with_its_name(topo, router, echo, serve) -> None:  # noqa: F811
    apply_container(router, serve)
    q = dns.message.make_query("allowed.test", "AAAA")
    with SetFeeder(netns=topo.router) as probe:
        def fed() -> bool:
            with topo.socket(topo.agent, socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.sendto(q.to_wire(), (ROUTER_IN4, 53))
                dns.message.from_wire(s.recv(4096))
            return SERVER6[0] in probe.members("dnsguard6")

        wait_until(fed, 10, interval=0.1, what="the AAAA answer in the set")
    with topo.socket(topo.agent, socket.AF_INET6) as s:
        s.settimeout(5)
        s.connect((SERVER6[0], 443))
        sport = s.getsockname()[1]
        s.sendall(b"v6" * 1000)
        got = b""
        while len(got) < 2000:
            got += s.recv(4096)
    (row,) = wait_until(lambda: rows(serve, "source_port = ? AND destination = ? AND end_ts IS NOT NULL",
                                     (sport, SERVER6[0])), 10, what="the IPv6 connection's row")
    assert (row["source"], row["verdict"], row["name"], row["rule"], row["client"]) == (
        AGENT6, "allowed", "allowed.test", "allowed.test", None)  # [[clients]] lists only the v4 net
    assert_bytes(row, 2000, 2000)


def test_a_restarted_recorder_adopts_the_open_rows(topo, router, echo, tmp_path) -> None:  # noqa: F811
    """Stop the recorder while a connection is open and start another on the same log: the
    connection keeps its one row (no second row), which is completed when it closes; a row
    left open for a connection that ended meanwhile is closed."""
    fw.apply(container_spec(allow_cidrs=(ipaddress.ip_network(f"{S0}/32"),)), router)
    enable_accounting(topo.router)  # counters exist only for connections opened after this
    db = tmp_path / "restart.db"

    def row_of(sport: int) -> list[tuple]:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT id, end_ts, bytes_out FROM connections WHERE source_port = ?",
                                (sport,)).fetchall()

    with topo.socket(topo.agent) as held, topo.socket(topo.agent) as gone:
        for s in (held, gone):
            s.settimeout(5)
            s.connect((S0, 443))
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        sport, gone_port = held.getsockname()[1], gone.getsockname()[1]
        with ConnRecorder(str(db), netns=topo.router, refresh=1.0):
            (first,) = wait_until(lambda: row_of(sport), 10, what="the open row")
            wait_until(lambda: row_of(gone_port), 10, what="the other open row")
        assert first[1] is None
        gone.close()  # ends while no recorder runs
        with ConnRecorder(str(db), netns=topo.router, refresh=1.0):
            wait_until(lambda: row_of(gone_port)[0][1] is not None, 10, what="the ended one closed")
            held.sendall(b"y" * 5000)
            got = b""
            while len(got) < 5000:
                got += held.recv(8192)
            held.close()
            (last,) = wait_until(lambda: [r for r in row_of(sport) if r[1] is not None], 10,
                                 what="the adopted row completed on close")
    assert last[0] == first[0] and last[2] >= 5001
    assert len(row_of(sport)) == 1


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def test_udp_and_icmp_flows_are_recorded(topo, router, echo, serve) -> None:  # noqa: F811
    apply_container(router, serve)
    resolve(topo)
    with topo.socket(topo.agent, socket.AF_INET, socket.SOCK_DGRAM) as s:  # QUIC-like: udp/443
        s.settimeout(3)
        s.connect((S0, 443))
        sport = s.getsockname()[1]
        for _ in range(3):
            s.send(b"q" * 1000)
            assert s.recv(2000) == b"q" * 1000
    # UDP has no close: the row stays open (until conntrack's timeout) with refreshed counters
    (row,) = wait_until(lambda: rows(serve, "source_port = ? AND protocol = 'udp' AND bytes_in >= 3000",
                                     (sport,)), 10, what="the udp flow's counters")
    assert (row["verdict"], row["name"], row["end_ts"], row["packets_out"]) == ("allowed", "allowed.test",
                                                                                 None, 3)
    assert_bytes(row, 3000, 3000)
    # ICMP to an [allow] cidrs address: the rule is the cidrs entry, the "port" the ICMP type
    echo_request = bytearray(struct.pack(">BBHHH", 8, 0, 0, 0x4447, 1) + b"dnsguard")
    struct.pack_into(">H", echo_request, 2, _checksum(bytes(echo_request)))
    with open_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP, netns=topo.agent) as s:
        s.settimeout(3)
        s.sendto(bytes(echo_request), (DNS4, 0))
        reply = s.recv(1024)
        assert reply[20] == 0  # echo reply (after the IPv4 header)
    (ping,) = wait_until(lambda: rows(serve, "destination = ? AND protocol = 'icmp'", (DNS4,)), 10,
                         what="the icmp flow")
    assert (ping["verdict"], ping["rule"], ping["name"], ping["port"]) == ("allowed", f"{DNS4}/32", None, 8)


# ------------------------------------------------------------------ user mode

USER_CLIENT = r"""
import socket, struct, sys
# stdlib only: the fenced user runs the system python, without the packages of the tests
query = struct.pack(">6H", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x07allowed\x04test\x00" + struct.pack(">HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(3)
u.sendto(query, ("203.0.113.53", 53))  # any DNS server: redirected to dnsguard
reply = u.recv(4096)
assert struct.unpack(">H", reply[6:8])[0] == 1, reply
ip = socket.inet_ntoa(reply[-4:])
s = socket.create_connection((ip, 80), timeout=5)
print(s.getsockname()[1], flush=True)
s.sendall(b"POST /?n=70000 HTTP/1.0\r\nContent-Length: 120000\r\n\r\n" + b"u" * 120000)
got = b""
while True:
    c = s.recv(65536)
    if not c:
        break
    got += c
s.close()
assert len(got.split(b"\r\n\r\n", 1)[1]) == 70000
try:
    socket.create_connection((sys.argv[1], 80), timeout=3)
    print("hard-coded: connected")
except OSError as exc:
    print("hard-coded:", exc)
"""
# the fenced user must be able to run it: the system python, not a root-only virtualenv
USER_PYTHON = "/usr/bin/python3"


def test_user_mode_records_allowed_and_blocked(topo, router, http, serve) -> None:  # noqa: F811
    fw.apply(fw.FenceSpec("user", uid=NOBODY, user="nobody", listen=(("127.0.0.1", USER_PORT),)), router)
    resolve(topo)  # the set is fresh for the user's own lookup too (see resolve)
    p = topo.run_as(topo.router, NOBODY, f"{USER_PYTHON} -c '{USER_CLIENT}' {S1}", timeout=30)
    assert p.returncode == 0, p
    sport = int(p.stdout.split()[0])
    assert "hard-coded: [Errno 111]" in p.stdout, p.stdout
    (row,) = wait_until(lambda: rows(serve, "source_port = ? AND end_ts IS NOT NULL AND source = ?",
                                     (sport, ROUTER_OUT4)), 10, what="user-mode row")
    assert (row["destination"], row["port"], row["verdict"], row["name"], row["rule"]) == (
        S0, 80, "allowed", "allowed.test", "allowed.test")
    assert row["client"] is None  # the router's own address is no [[clients]] source
    assert_bytes(row, 120_000, 70_000)
    blocked = wait_until(lambda: rows(serve, "destination = ? AND source = ? AND verdict = 'blocked'",
                                      (S1, ROUTER_OUT4)), 5, what="user-mode blocked row")
    assert blocked[0]["name"] is None


# ------------------------------------------------------------------ the report over what was recorded

def test_report_connections_reads_the_recorded_rows(topo, router, http, serve) -> None:  # noqa: F811
    apply_container(router, serve)
    resolve(topo)
    with topo.socket(topo.agent) as s:
        s.settimeout(5)
        s.connect((S0, 80))
        sport = s.getsockname()[1]
        http_exchange(s, 300_000, 1_000)
    wait_until(lambda: rows(serve, "source_port = ? AND end_ts IS NOT NULL", (sport,)), 10,
               what="the connection's row to be completed")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "resolver", "report", "connections", "--db", str(_db(serve)),
                          "--name", "allowed.test", "--format", "json"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["schema"] == "dnsguard-report-connections/1"
    assert data["connections"] and all(c["name"] == "allowed.test" for c in data["connections"])
    assert any(c["bytes_out"] and c["bytes_out"] >= 300_000 for c in data["connections"])




# ------------------------------------------------------------------ doctor

def test_doctor_proves_the_sets_are_fed(topo, router, serve) -> None:  # noqa: F811
    """Not just "something bound NFLOG": the addresses dnsguard answered lately are in the set."""
    from resolver.doctor import diagnose

    def sets_check() -> tuple[bool, str]:
        check = {c.name: c for c in diagnose(str(serve), netns=topo.router).checks}["firewall sets"]
        return check.ok, check.detail

    def logged_since(t: float) -> bool:
        try:
            with sqlite3.connect(_db(serve)) as conn:
                return bool(conn.execute("SELECT 1 FROM lookups WHERE qname = 'allowed.test' AND ts >= ?",
                                         (t,)).fetchone())
        except sqlite3.OperationalError:  # the writer has not made its tables yet
            return False

    apply_container(router, serve)
    t0 = time.time()
    resolve(topo)
    wait_until(lambda: logged_since(t0), 10, what="the answer in the log")
    ok, detail = sets_check()
    assert ok and "being fed" in detail and "are in it" in detail, detail
    # Answered, no longer in the set (as after `firewall remove` + `apply`): doctor asks dnsguard
    # again, and serve puts it back.
    topo.ns(topo.router, "ipset", "flush", "dnsguard4")
    ok, detail = sets_check()
    assert ok and f"asked for allowed.test again, dnsguard put {S0} back in it" in detail, detail

    # A set serve cannot add to (no timeout support): its answers never reach it.
    fw.remove(router)
    topo.ns(topo.router, "ipset", "create", "dnsguard4", "hash:ip", "family", "inet")
    try:
        t1 = time.time()
        assert ask(topo, "allowed.test") == [S0]
        wait_until(lambda: logged_since(t1), 10, what="the answer in the log")
        ok, detail = sets_check()
        assert not ok and f"did not put {S0} there: answers are not reaching the set" in detail, detail
    finally:
        topo.ns(topo.router, "ipset", "destroy", "dnsguard4")
    apply_container(router, serve)
    resolve(topo)
    assert sets_check()[0]


# ------------------------------------------------------------------ the recorder dies

def _recorder_pids(policy: Path) -> list[int]:
    """The recorder processes writing this module's log (their argv names it)."""
    db = str(_db(policy)).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"resolver.fence.connproc" in argv and db in argv:
                pids.append(int(entry))
    return pids


def _metrics(topo: Topology) -> str:  # noqa: F811
    with topo.socket(topo.router) as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", METRICS_PORT))
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        return b"".join(iter(lambda: s.recv(65536), b"")).decode()


def test_a_killed_recorder_comes_back_and_the_gap_is_reported(topo, router, http, serve) -> None:  # noqa: F811
    apply_container(router, serve)
    resolve(topo)  # the name is handed to the recorder now; its replacement must be handed it again
    assert "dnsguard_connection_recorder_up 1.0" in _metrics(topo)
    (old,) = _recorder_pids(serve)
    killed = time.time()
    os.kill(old, signal.SIGKILL)

    def gap() -> tuple | None:
        with sqlite3.connect(_db(serve)) as conn:
            return conn.execute("SELECT since, until, reason FROM connection_gaps WHERE until IS NOT NULL"
                                ).fetchone()

    since, until, reason = wait_until(gap, 30, what="the recorder to come back and close its gap")
    assert killed <= since <= until and reason == "connection recorder exited with status -9"
    (new,) = _recorder_pids(serve)
    assert new != old
    text = _metrics(topo)
    assert "dnsguard_connection_recorder_up 1.0" in text
    assert "dnsguard_connection_recorder_restarts_total 1.0" in text
    # a connection made afterwards is recorded, with the name the new recorder was handed
    with topo.socket(topo.agent) as s:
        s.settimeout(5)
        s.connect((S0, 80))
        sport = s.getsockname()[1]
        http_exchange(s, 20_000, 10_000)
    (row,) = wait_until(lambda: rows(serve, "source_port = ? AND end_ts IS NOT NULL", (sport,)), 10,
                        what="the connection made after the restart")
    assert (row["verdict"], row["name"], row["client"]) == ("allowed", "allowed.test", "agent")
    assert_bytes(row, 20_000, 10_000)
    # the report says connections may be missing for that period
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "resolver", "report", "connections", "--db", str(_db(serve)),
                          "--format", "json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    gaps = json.loads(out.stdout)["overflow"]["gaps"]
    assert [g["reason"] for g in gaps] == ["connection recorder exited with status -9"] and gaps[0]["until"]
    table = subprocess.run([sys.executable, "-m", "resolver", "report", "connections", "--db",
                            str(_db(serve))], capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
                           check=False).stdout
    assert "WARNING: connections may be missing from" in table and "status -9" in table
