"""Throw a few thousand random and mutated packets at a running dnsguard.

A seeded generator mutates real queries (bit flips, truncation, random lengths, bad
section counts, compression pointers, odd flags) and also makes pure noise.  They go
over UDP and over TCP (length-framed, plus some broken framing).  Afterwards dnsguard
must still be alive and answering correctly, every reply it sent must have been a
response (QR=1, never a reflected query), and nothing but the one allowed name may
have reached the upstream.

Seed: DNSGUARD_FUZZ_SEED (default fixed), so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time

import dns.edns
import dns.message
import dns.rcode
from helpers import addresses, frame, make_policy, recv_frame, tcp_connect

SEED = int(os.environ.get("DNSGUARD_FUZZ_SEED", "20250107"))
ROUNDS = 3  # seeds SEED, SEED+1, ...
UDP_PACKETS = 5000  # per round
TCP_PACKETS = 1500  # per round
TCP_PER_CONNECTION = 25
TIME_BUDGET = 25.0  # seconds for the whole blast; the loops also stop on count


def base_queries() -> list[bytes]:
    out = []
    specs = [
        ("allowed.test", "A", {}),
        ("allowed.test", "AAAA", {"use_edns": 0}),
        ("AlLoWeD.TeSt", "TXT", {"use_edns": 0, "payload": 4096}),
        ("denied.test", "A", {}),
        ("a.very.long.name.below.denied.test", "MX", {"use_edns": 0}),
        ("allowed.test", "ANY", {}),
        ("allowed.test", "A", {"use_edns": 0, "options": [dns.edns.GenericOption(10, b"\x01" * 8)]}),
        ("xn--bcher-kva.test", "HTTPS", {"want_dnssec": True}),
    ]
    for name, rdtype, kw in specs:
        out.append(dns.message.make_query(name, rdtype, **kw).to_wire())
    return out


class Mutator:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.bases = base_queries()

    def noise(self) -> bytes:
        n = self.rng.choice([0, 1, 2, 11, 12, 13, self.rng.randrange(0, 600), self.rng.randrange(0, 70000)])
        n = min(n, 65507)  # largest UDP payload on IPv4
        return self.rng.randbytes(n)

    def packet(self) -> bytes:
        r = self.rng
        choice = r.randrange(9)
        if choice == 0:
            return self.noise()
        wire = bytearray(r.choice(self.bases))
        struct.pack_into("!H", wire, 0, r.getrandbits(16))  # fresh ID
        if choice == 1:  # bit flips
            for _ in range(r.randint(1, 8)):
                i = r.randrange(len(wire) * 8)
                wire[i // 8] ^= 1 << (i % 8)
        elif choice == 2:  # truncation
            wire = wire[: r.randrange(len(wire))]
        elif choice == 3:  # bad section counts
            struct.pack_into("!4H", wire, 4, *(r.choice([0, 1, 2, 255, 65535, r.getrandbits(16)])
                                               for _ in range(4)))
        elif choice == 4:  # compression pointers somewhere in the question
            pos = r.randrange(12, max(13, len(wire) - 1))
            ptr = 0xC000 | r.choice([0, 12, pos, pos + 2, len(wire), r.getrandbits(14)])
            wire[pos:pos + 2] = struct.pack("!H", ptr)
        elif choice == 5:  # odd header flags: QR, opcodes, Z, rcode bits
            struct.pack_into("!H", wire, 2, r.getrandbits(16))
        elif choice == 6:  # random bytes appended / inserted
            pos = r.randrange(len(wire) + 1)
            wire[pos:pos] = r.randbytes(r.randrange(1, 64))
        elif choice == 7:  # label lengths lie
            pos = 12
            wire[pos] = r.choice([0, 63, 64, 127, 128, 191, 192, 255])
        else:  # several mutations at once
            for _ in range(r.randint(2, 5)):
                i = r.randrange(len(wire))
                wire[i] = r.getrandbits(8)
        return bytes(wire)


def is_response(reply: bytes) -> bool:
    return len(reply) >= 12 and bool(reply[2] & 0x80)


def blast_udp(port: int, mut: Mutator, deadline: float) -> tuple[int, int, list[bytes]]:
    sent = received = 0
    bad: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.setblocking(False)

        def drain() -> None:
            nonlocal received
            for _ in range(10_000):
                try:
                    data = s.recv(65535)
                except BlockingIOError:
                    return
                received += 1
                if not is_response(data):
                    bad.append(data)

        for i in range(UDP_PACKETS):
            if time.monotonic() > deadline:
                break
            pkt = mut.packet()
            try:
                s.sendto(pkt, ("127.0.0.1", port))
                sent += 1
            except (BlockingIOError, OSError):
                pass  # a full send buffer or an oversized datagram is fine: it's a blast
            if i % 50 == 49:
                drain()
        # Let in-flight replies arrive: wait (bounded) until a short quiet period.
        s.setblocking(True)
        s.settimeout(0.3)
        for _ in range(10_000):
            try:
                data = s.recv(65535)
            except TimeoutError:
                break
            received += 1
            if not is_response(data):
                bad.append(data)
    return sent, received, bad


def blast_tcp(port: int, mut: Mutator, deadline: float) -> tuple[int, int, list[bytes]]:
    """Framed mutated packets, TCP_PER_CONNECTION per connection, each batch closed by a
    sentinel query whose reply (or the server closing) ends the batch."""
    rng = mut.rng
    sent = connections = 0
    bad: list[bytes] = []
    sentinel_id = 0xD00D
    while sent < TCP_PACKETS and time.monotonic() < deadline:
        connections += 1
        with tcp_connect(port) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            style = rng.randrange(10)
            try:
                if style == 0:  # broken framing: a length that promises more than comes
                    s.sendall(struct.pack("!H", rng.randrange(13, 65536)) + mut.packet()[:12])
                    sent += 1
                    continue
                if style == 1:  # a zero-length frame, then a raw unframed stream
                    s.sendall(b"\x00\x00" + rng.randbytes(rng.randrange(1, 300)))
                    sent += 1
                    continue
                batch = b""
                for _ in range(TCP_PER_CONNECTION):
                    pkt = mut.packet()[:65535]
                    batch += frame(pkt)
                    sent += 1
                q = dns.message.make_query("allowed.test", "A")
                q.id = sentinel_id
                s.sendall(batch + frame(q.to_wire()))
            except (BrokenPipeError, ConnectionResetError):
                continue
            # Read replies until the sentinel's, or until the server closes on us.
            for _ in range(TCP_PER_CONNECTION + 2):
                try:
                    reply = recv_frame(s, timeout=3.0)
                except (EOFError, ConnectionResetError):
                    break
                if not is_response(reply):
                    bad.append(reply)
                if reply[:2] == struct.pack("!H", sentinel_id) and reply[12:20] == b"\x07allowed":
                    break
    return sent, connections, bad


def test_random_and_mutated_packets_do_not_hurt_dnsguard(dnsmasq, dnsguard):
    upstream = dnsmasq()
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"], timeout_ms=1000,
                             server={"tcp_idle_timeout_ms": 2000}))
    start = time.monotonic()
    deadline = start + TIME_BUDGET
    stats = []
    for round_no in range(ROUNDS):  # a few seeds in one run: more variety, still bounded
        seed = SEED + round_no
        mut = Mutator(random.Random(seed))
        left = deadline - time.monotonic()
        udp_deadline = time.monotonic() + left / (2 * (ROUNDS - round_no))
        tcp_deadline = time.monotonic() + left / (ROUNDS - round_no)
        udp_sent, udp_replies, udp_bad = blast_udp(g.port, mut, udp_deadline)
        assert g.alive(), f"dnsguard died during the UDP blast (seed {seed}):\n{g.stderr_text()[-3000:]}"
        tcp_sent, tcp_conns, tcp_bad = blast_tcp(g.port, mut, tcp_deadline)
        assert g.alive(), f"dnsguard died during the TCP blast (seed {seed}):\n{g.stderr_text()[-3000:]}"

        assert udp_sent >= UDP_PACKETS // 2, f"only {udp_sent} UDP packets sent in time (seed {seed})"
        assert tcp_sent >= TCP_PACKETS // 4, f"only {tcp_sent} TCP packets sent in time (seed {seed})"
        assert udp_replies > 0, "dnsguard answered none of the UDP packets (not even the valid ones)"
        assert not udp_bad, (f"{len(udp_bad)} UDP replies were not responses (seed {seed}), "
                             f"e.g. {udp_bad[0][:40].hex()}")
        assert not tcp_bad, (f"{len(tcp_bad)} TCP replies were not responses (seed {seed}), "
                             f"e.g. {tcp_bad[0][:40].hex()}")
        stats.append(f"seed={seed} udp_sent={udp_sent} udp_replies={udp_replies} tcp_sent={tcp_sent} "
                     f"tcp_connections={tcp_conns}")

    # Still correct afterwards.
    for tcp in (False, True):
        r = g.query("allowed.test", tcp=tcp)
        assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"192.0.2.1"}
        assert g.query("denied.test", tcp=tcp).rcode() == dns.rcode.NXDOMAIN

    # Nothing but the allowed name got through to the upstream.
    upstream.sync()
    forwarded = set(upstream.queried_names())
    assert forwarded <= {"allowed.test"}, f"forwarded names outside the policy: {sorted(forwarded)[:10]}"
    assert g.alive()
    print("\n".join(stats), f"elapsed={time.monotonic() - start:.1f}s")
