"""dnstap to independent receivers: Debian's `dnstap` command (unix socket and TCP) and
`fstrm_capture` read back by BIND's `dnstap-read`.

Neither receiver prints the dnstap ``Policy`` field, so the policy assertions decode the file
`fstrm_capture` wrote with the maintained ``dnstap-pb`` protobuf classes (not our encoder).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import struct
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path

import dns.rcode
import pytest
from dnstap_pb import dnstap_pb2 as pb
from helpers import make_policy, to_toml, wait_until

METRICS_RE = re.compile(r"dnsguard: metrics on http://127\.0\.0\.1:(\d+)/metrics")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (see scripts/install-test-deps)")
    return path


class Receiver:
    """A receiver process; stopped (SIGTERM, then SIGKILL) at teardown."""

    def __init__(self, argv: list[str], ready: Path | tuple[str, int], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: self._listening(ready), 10, what=f"{argv[0]} listening")

    def _listening(self, ready: Path | tuple[str, int]) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"receiver exited: {self.log.read_text(errors='replace')}")
        if isinstance(ready, Path):
            return ready.exists()
        with socket.socket() as s:
            return s.connect_ex(ready) == 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def receivers():
    started: list[Receiver] = []

    def factory(argv: list[str], ready: Path | tuple[str, int], log: Path) -> Receiver:
        r = Receiver(argv, ready, log)
        started.append(r)
        return r

    yield factory
    for r in started:
        r.stop()


def metric(port: int, name: str) -> float:
    """One unlabelled sample from dnsguard's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        m = re.search(rf"^{name} (\S+)$", resp.read().decode(), re.MULTILINE)
    assert m, name
    return float(m.group(1))


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def yaml_types(text: str) -> Counter:
    return Counter(re.findall(r"^  type: (\w+)$", text, re.MULTILINE))


@pytest.fixture
def upstream(dnsmasq):
    return dnsmasq()


def ask_some(g) -> None:
    """2 misses (2 forwarder exchanges), 1 cache hit, 1 denial, one of them over TCP."""
    assert g.query("allowed.test").rcode() == dns.rcode.NOERROR
    assert g.query("allowed.test").rcode() == dns.rcode.NOERROR
    assert g.query("other.test", tcp=True).rcode() == dns.rcode.NOERROR
    assert g.query("denied.test").rcode() == dns.rcode.NXDOMAIN


EXPECTED = {"CLIENT_QUERY": 4, "CLIENT_RESPONSE": 4, "FORWARDER_QUERY": 2, "FORWARDER_RESPONSE": 2}


def test_dnstap_cli_over_unix_socket(upstream, dnsguard, receivers, tmp_path):
    sock, out = tmp_path / "tap.sock", tmp_path / "out.yaml"
    r = receivers([tool("dnstap"), "-u", str(sock), "-y", "-w", str(out)], sock, tmp_path / "dnstap.log")
    policy = make_policy([upstream.addr], allow=["allowed.test", "other.test"],
                         dnstap={"identity": "agent-host-1", "version": "dnsguard-test"})
    g = dnsguard(policy, "--dnstap", f"unix:{sock}")
    ask_some(g)
    assert g.stop() == 0  # a clean stop sends what is queued, then STOP and waits for FINISH
    r.stop()
    text = out.read_text()
    assert yaml_types(text) == EXPECTED, text
    assert text.count('identity: "agent-host-1"') == 12
    assert text.count('version: "dnsguard-test"') == 12
    assert "status: NXDOMAIN" in text and ";denied.test.\tIN\t A" in text
    assert "socket_protocol: TCP" in text and "socket_protocol: UDP" in text
    assert f"response_port: {upstream.port}" in text  # forwarder messages name the upstream
    assert "closed connection" in (tmp_path / "dnstap.log").read_text()  # an orderly goodbye


def test_dnstap_cli_over_tcp(upstream, dnsguard, receivers, tmp_path):
    port, out = free_tcp_port(), tmp_path / "out.yaml"
    r = receivers([tool("dnstap"), "-l", f"127.0.0.1:{port}", "-y", "-w", str(out)], ("127.0.0.1", port),
                  tmp_path / "dnstap.log")
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test", "other.test"]),
                 "--dnstap", f"tcp:127.0.0.1:{port}")
    ask_some(g)
    assert g.stop() == 0
    r.stop()
    text = out.read_text()
    assert yaml_types(text) == EXPECTED, text
    assert text.count("query_address: 127.0.0.1") == 8  # the client side of all 8 client messages


def read_fstrm_file(path: Path) -> list[pb.Dnstap]:
    """Data frames of a Frame Streams file (what fstrm_capture writes), parsed with dnstap-pb."""
    data, i, out = path.read_bytes(), 0, []
    while i + 4 <= len(data):
        (n,) = struct.unpack_from("!I", data, i)
        i += 4
        if n == 0:  # control frame: its own length, then skip it
            (clen,) = struct.unpack_from("!I", data, i)
            i += 4 + clen
            continue
        d = pb.Dnstap()
        d.ParseFromString(data[i:i + n])
        out.append(d)
        i += n
    return out


def test_fstrm_capture_and_dnstap_read_with_policy(upstream, dnsguard, receivers, tmp_path):
    sock, out = tmp_path / "tap.sock", tmp_path / "cap.fstrm"
    r = receivers([tool("fstrm_capture"), "-t", "protobuf:dnstap.Dnstap", "-u", str(sock), "-w", str(out)],
                  sock, tmp_path / "fstrm.log")
    text = to_toml(make_policy([upstream.addr], allow=["allowed.test"], deny=["denied.test"],
                               log={"database": str(tmp_path / "g.db")}))
    text += '\n[[clients]]\nname = "sandbox"\nsources = ["127.0.0.2/32"]\nmode = "audit"\n'
    g = dnsguard(text, "--dnstap", f"unix:{sock}")
    assert g.query("denied.test").rcode() == dns.rcode.NXDOMAIN  # enforce: denied
    assert g.query("denied.test", source="127.0.0.2").rcode() == dns.rcode.NOERROR  # audit: answered
    assert g.query("nowhere.test").rcode() == dns.rcode.NXDOMAIN  # default deny
    assert g.query("allowed.test").rcode() == dns.rcode.NOERROR
    assert g.stop() == 0
    r.stop()

    listing = subprocess.run([tool("dnstap-read"), str(out)], capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert sum(" CQ " in line for line in lines) == 4 and sum(" CR " in line for line in lines) == 4
    assert sum(" FQ " in line for line in lines) == 2 and sum(" FR " in line for line in lines) == 2
    assert sum("denied.test/IN/A" in line for line in lines) == 6  # 2 x CQ/CR + the audit FQ/FR

    responses = {}
    for d in read_fstrm_file(out):
        m = d.message
        if m.type == pb.Message.CLIENT_RESPONSE:
            qname = m.policy.value if m.HasField("policy") else None
            responses[(socket.inet_ntoa(m.query_address), qname)] = m
    enforce = responses[("127.0.0.1", b"\x06denied\x04test\x00")].policy
    assert (enforce.type, enforce.rule, enforce.action, enforce.match) == \
        ("dnsguard", b"denied.test", pb.Policy.NXDOMAIN, pb.Policy.QNAME)
    audit = responses[("127.0.0.2", b"\x06denied\x04test\x00")].policy
    assert (audit.rule, audit.action) == (b"denied.test", pb.Policy.PASS)
    default = responses[("127.0.0.1", b"\x07nowhere\x04test\x00")].policy
    assert default.action == pb.Policy.NXDOMAIN and b"default deny" in default.rule
    assert ("127.0.0.1", None) in responses  # the allowed answer carries no policy


def test_receiver_killed_and_restarted_mid_run(upstream, dnsguard, receivers, tmp_path):
    """DNS never waits for the collector; what could not be sent is counted; it reconnects."""
    sock = tmp_path / "tap.sock"
    argv = [tool("dnstap"), "-u", str(sock), "-q", "-w"]
    first = receivers([*argv, str(tmp_path / "one.txt")], sock, tmp_path / "one.log")
    policy = make_policy([upstream.addr], allow=["allowed.test"], dnstap={"queue_max": 20})
    g = dnsguard(policy, "--dnstap", f"unix:{sock}", "--metrics", "127.0.0.1:0", "--no-log")
    port = int(wait_until(lambda: METRICS_RE.search(g.stderr_text()), 10, what="metrics").group(1))

    def figure(name: str) -> float:
        return metric(port, name)

    for i in range(5):
        assert g.query(f"before{i}.test").rcode() == dns.rcode.NXDOMAIN
    wait_until(lambda: figure("dnsguard_dnstap_sent_total") == 10, 10, what="first messages sent")

    first.stop(signal.SIGKILL)
    for i in range(100):  # every one answered while the collector is gone
        assert g.query(f"during{i}.test", timeout=2).rcode() == dns.rcode.NXDOMAIN
    assert figure("dnsguard_dnstap_dropped_total") >= 100 - 20 - 1  # past the queue of 20
    assert figure("dnsguard_dnstap_connected") == 0

    second = receivers([*argv, str(tmp_path / "two.txt")], sock, tmp_path / "two.log")
    wait_until(lambda: figure("dnsguard_dnstap_connects_total") == 2, 15, what="reconnected")
    for i in range(5):
        assert g.query(f"after{i}.test").rcode() == dns.rcode.NXDOMAIN
    assert g.stop() == 0
    second.stop()
    two = (tmp_path / "two.txt").read_text()
    for i in range(5):
        assert f'"after{i}.test."' in two
    assert sum(f'"during{i}.test."' in two for i in range(100)) <= 20  # at most the queue's worth
    assert "events dropped" in g.stderr_text()


def test_encoder_output_parses_with_dnstap_pb():
    """Our directly written protobuf, read by the maintained classes: every field where it belongs."""
    from resolver.observe.dnstap import Encoder

    query = bytes.fromhex("abcd01000001000000000000") + b"\x03bad\x04test\x00\x00\x01\x00\x01"
    reply = query[:2] + b"\x81\x83" + query[4:]
    enc = Encoder("id-1", "v-1", lambda ip, qname: (None, False) if ip == "2001:db8::5" else None)
    event = ("client", "tcp", ("2001:db8::5", 40000, 0, 0), ("::1", 53, 0, 0), query, reply, 1e9 + 0.5,
             1e9 + 0.75)
    cq, cr = (pb.Dnstap.FromString(b) for b in enc.encode(event))
    assert (cq.identity, cq.version, cq.type) == (b"id-1", b"v-1", pb.Dnstap.MESSAGE)
    m = cq.message
    assert (m.type, m.socket_family, m.socket_protocol) == (pb.Message.CLIENT_QUERY, pb.INET6, pb.TCP)
    assert socket.inet_ntop(socket.AF_INET6, m.query_address) == "2001:db8::5" and m.query_port == 40000
    assert socket.inet_ntop(socket.AF_INET6, m.response_address) == "::1" and m.response_port == 53
    assert (m.query_time_sec, m.query_time_nsec, m.query_message) == (1_000_000_000, 500_000_000, query)
    assert not m.HasField("response_message")
    assert (m.policy.type, m.policy.action, m.policy.value) == ("dnsguard", pb.Policy.NXDOMAIN,
                                                                b"\x03bad\x04test\x00")
    r = cr.message
    assert (r.type, r.response_message) == (pb.Message.CLIENT_RESPONSE, reply)
    assert r.response_time_nsec == 750_000_000
    assert r.policy.rule.startswith(b"default deny")
    (fq,) = (pb.Dnstap.FromString(b) for b in enc.encode(("fwd", ("192.0.2.53", 53), "udp", query, None, 5.0,
                                                            6.0)))
    assert fq.message.type == pb.Message.FORWARDER_QUERY
    assert socket.inet_ntoa(fq.message.response_address) == "192.0.2.53"
    assert not fq.message.HasField("policy") and not fq.message.HasField("response_message")


def test_a_collector_that_stops_reading_never_holds_up_dns(upstream, dnsguard, tmp_path):
    """A receiver that completes the handshake, then never reads: the writer's send blocks (in its
    own thread, up to its I/O deadline), the queue fills, events are dropped and counted, and every
    query is still answered."""
    import threading

    import fstrm

    sock_path = tmp_path / "stall.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up fast
    listener.bind(str(sock_path))
    listener.listen(4)
    accepted: list[socket.socket] = []

    def stall() -> None:
        codec = fstrm.FstrmCodec()
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.settimeout(5)
            try:
                while not codec.append_and_process(conn.recv(codec.pending_nb_bytes())):
                    pass
                codec.decode()  # READY
                conn.sendall(codec.encode_ctrlaccept(b"protobuf:dnstap.Dnstap"))
            except OSError:
                continue
            # ... and from here on, never read again.

    t = threading.Thread(target=stall, daemon=True)
    t.start()
    try:
        g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"], dnstap={"queue_max": 20}),
                     "--dnstap", f"unix:{sock_path}", "--metrics", "127.0.0.1:0", "--no-log")
        port = int(wait_until(lambda: METRICS_RE.search(g.stderr_text()), 10, what="metrics").group(1))

        def figure(name: str) -> float:
            return metric(port, name)

        wait_until(lambda: figure("dnsguard_dnstap_connected") == 1, 10, what="handshake done")
        big = "x" * 60
        for i in range(300):  # ~300 x 2 messages of ~150 bytes: far more than the socket buffers hold
            assert g.query(f"{big}.q{i}.test", timeout=2).rcode() == dns.rcode.NXDOMAIN
        assert figure("dnsguard_dnstap_dropped_total") > 0
        assert g.stop() == 0  # and a stop is not held up by the stuck collector beyond its deadlines
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
