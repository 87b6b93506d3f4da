#!/usr/bin/env python3
"""In-process CPU cost of a cache miss: `Resolver.handle` -> upstream -> answer, one at a time.

A real dnsmasq on loopback (pinned to the other CPU) answers every unique name; this process
sends the misses one after another and counts its own thread's CPU time, so what other
programs on the machine do changes the figure far less than it changes a throughput run
(`scripts/bench --scenarios d`). The kernel's send/receive for the two hops are included
(they run on this thread); waiting for dnsmasq is not.

    taskset -c 1 python scripts/bench_miss.py [--misses 20000] [--rounds 5]

Sequential misses leave the loop idle between them, so each also pays an epoll wake-up that
a loaded server amortises: read the figure as an upper bound, and compare trees with it
(run it alternately against each, e.g. ``PYTHONPATH=OTHER_TREE``), not with a C forwarder.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.message

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

from resolver.dns.chain import Resolver  # noqa: E402
from resolver.policy.config import parse_config  # noqa: E402


def start_upstream(work: Path) -> tuple[subprocess.Popen, int]:
    port = bl.free_port("127.0.0.1")
    argv = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
            "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}", "--pid-file=",
            "--log-facility=-", f"--address=/miss.test/{bl.MISS_ADDR}"]
    if (os.cpu_count() or 1) >= 2:
        argv = ["taskset", "-c", "0", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(work / "dnsmasq.log", "w"))
    if not bl.wait_answering("127.0.0.1", port, "x.miss.test", 15, proc):
        proc.terminate()
        raise SystemExit("bench_miss: dnsmasq did not start")
    return proc, port


async def run(port: int, misses: int, rounds: int, offset: int) -> list[float]:
    policy = f'[upstream]\nservers = ["127.0.0.1:{port}"]\n[allow]\ndomains = ["*.miss.test"]\n'
    r = Resolver(parse_config(policy))
    out = []
    try:
        n = offset
        for _ in range(rounds + 1):  # the first round warms up (pool sockets, caches)
            packets = [dns.message.make_query(f"m{n + i}.miss.test", "A", use_edns=True).to_wire()
                       for i in range(misses)]
            n += misses
            t = time.thread_time()
            for p in packets:
                coro = r.handle(p, "127.0.0.1", "udp")
                assert not isinstance(coro, bytes | None), "expected a miss"
                resp = await coro
                assert resp is not None and resp[3] & 0x0F == 0
            out.append((time.thread_time() - t) / misses * 1e6)
    finally:
        close = getattr(r.upstream, "close", None)  # older trees had no pooled sockets to close
        if close is not None:
            close()
    return out[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--misses", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    if not shutil.which("dnsmasq"):
        raise SystemExit("bench_miss: dnsmasq is missing (apt-get install dnsmasq-base)")
    work = Path(tempfile.mkdtemp(prefix="dnsguard-miss-"))
    proc, port = start_upstream(work)
    try:
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:  # pragma: no cover
            runner = asyncio.run
        offset = int.from_bytes(os.urandom(3), "big") * 1000  # names never cached by an earlier run
        rounds = runner(run(port, a.misses, a.rounds, offset))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    rounds.sort()
    print(f"miss: {a.misses} sequential misses x {a.rounds} rounds; thread CPU per miss "
          f"median {rounds[len(rounds) // 2]:.1f} µs (min {rounds[0]:.1f}, max {rounds[-1]:.1f}); "
          f"host {socket.gethostname()}, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
