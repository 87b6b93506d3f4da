#!/usr/bin/env python3
"""The Python cost of a cache miss, with no syscall: what dnsguard's own work per miss costs.

    taskset -c 1 python scripts/bench_miss_python.py [--misses 20000] [--rounds 5]

`Resolver.handle` gets a query for a unique name. The miss it starts is sent through the
real socket pool (random ID, pooled port, the deadline), into stand-in sockets that only keep
the packet. The pool's own reader then receives, from the stand-in, a reply shaped like
dnsmasq's (the question, one A record whose owner points at it, an OPT), and the answer comes
back through `Pending.then`. Everything between is the shipped code: parsing, ACL, policy,
cache lookup and store, coalescing, the fresh query, reply matching by ID and question,
cleaning, the answer and its log record (handed to a list, as the log's ``submit`` would).
The kernel's receives and sends and the event loop's wake-ups are left out; add
`scripts/floor_forwarder.py`'s figure (`scripts/bench --scenarios d --floor`) for those.

Prints the thread CPU per miss, and the wall time of the query's side (handle to the send)
and of the reply's (the reply to the answer). Compare trees by alternating runs (``PYTHONPATH=TREE``):
this machine drifts by +-10% between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import dns.message
import dns.rrset

from resolver.dns import outgoing
from resolver.dns.chain import Resolver
from resolver.policy.config import parse_config

UPSTREAM = ("127.0.0.1", 9)  # never contacted: the pool's sockets are stand-ins


class _Sent:
    """A stand-in for a pool socket: keeps the last packet, sends nothing, and has one reply
    to give its reader."""

    def __init__(self) -> None:
        self.last = b""
        self.reply = b""
        self.port: outgoing._Port | None = None

    def send(self, packet: bytes) -> int:
        self.last = packet
        sent.append(self)
        return len(packet)

    def recv_into(self, buf: bytearray) -> int:
        reply, self.reply = self.reply, b""
        if not reply:
            raise BlockingIOError
        buf[:len(reply)] = reply
        return len(reply)

    def fileno(self) -> int:
        return -1  # no reader is registered, none removed

    def close(self) -> None:
        pass


sent: list[_Sent] = []


def _stand_in_open(pool: outgoing.PortPool):
    def _open(now: float) -> outgoing._Port:
        sock = _Sent()
        pool._serial += 1
        port = outgoing._Port(pool, sock, now, pool._serial)  # type: ignore[arg-type]
        pool.live[pool._serial] = sock.port = port
        pool.opened += 1
        return port
    return _open


async def run(misses: int, rounds: int, offset: int) -> list[tuple[float, float, float]]:
    policy = f'[upstream]\nservers = ["{UPSTREAM[0]}:{UPSTREAM[1]}"]\n[allow]\ndomains = ["*.miss.test"]\n'
    rows: list[tuple] = []
    r = Resolver(parse_config(policy), submit=rows.append)  # the log record is built, as with [log] on
    pool = r.upstream.pools[UPSTREAM]
    pool._open = _stand_in_open(pool)  # type: ignore[method-assign]
    answers: list[bytes | None] = []
    out = []
    clock = time.perf_counter  # the split: a vDSO call, where thread_time is a syscall
    n = offset
    for _ in range(rounds + 1):  # the first round warms up
        work = []
        for i in range(misses):
            q = dns.message.make_query(f"n{n + i}.miss.test", "A", use_edns=True)
            reply = dns.message.make_response(q)
            reply.answer.append(dns.rrset.from_text(f"n{n + i}.miss.test.", 300, "IN", "A", "192.0.2.7"))
            work.append((q.to_wire(), reply.to_wire()))
        n += misses
        answers.clear()
        rows.clear()
        q_side = r_side = 0.0
        start = time.thread_time()
        for query, reply in work:
            t0 = clock()
            pending = r.handle(query, "127.0.0.1", "udp")
            pending.then(lambda resp, _: answers.append(resp), None)  # type: ignore[union-attr]
            t1 = clock()
            sock = sent.pop()
            sock.reply = sock.last[:2] + reply[2:]  # our ID: the reader matches ID and question
            assert sock.port is not None
            t2 = clock()
            sock.port.readable()
            t3 = clock()
            q_side += t1 - t0
            r_side += t3 - t2
        total = time.thread_time() - start
        assert len(answers) == misses and all(a is not None and a[3] & 0x0F == 0 for a in answers), \
            "every miss must be answered NOERROR"
        assert len(rows) == misses, "every miss must make its log record"
        out.append((total / misses * 1e6, q_side / misses * 1e6, r_side / misses * 1e6))
    r.upstream.close()
    return out[1:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--misses", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    rounds = sorted(runner(run(a.misses, a.rounds, int.from_bytes(os.urandom(3), "big") * 1000)))
    mid = rounds[len(rounds) // 2]
    print(f"miss, python only: {a.misses} misses x {a.rounds} rounds; thread CPU per miss median "
          f"{mid[0]:.1f} µs (query side {mid[1]:.1f}, reply side {mid[2]:.1f}; rounds {rounds[0][0]:.1f}-"
          f"{rounds[-1][0]:.1f}); load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
