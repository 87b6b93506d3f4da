#!/usr/bin/env python3
"""Two source trees, interleaved: CPU per cache miss at saturation, and garbage collection.

On a shared or virtual machine, throughput drifts by +-25% from one minute to the next, which
hides a 10-20% change between two `scripts/bench` runs made minutes apart. This alternates
short runs of the two trees (A, B, A, B, ...) against one upstream dnsmasq, each server fresh
(an empty cache: every query a miss), and reports the ratio B/A of each adjacent pair: the
drift moves both halves of a pair alike.

    python3 scripts/bench_ab.py --a /tmp/before --b . [--pairs 10] [--seconds 3]

Per run: the server's CPU seconds (user and system, from /proc) over the queries dnsperf got
answered, and -- because the server runs under a small wrapper that installs gc.callbacks --
the time spent in collections of each generation. Loopback only; server on CPU 1, dnsperf and
the upstream on CPU 0 (as `scripts/bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

HOST = "127.0.0.1"
# Runs `python -m resolver serve ...` with a gc.callbacks recorder that writes its totals to
# $DNSGUARD_GC_STATS at exit (the server exits cleanly on SIGTERM).
_GC_WRAPPER = r"""
import atexit, gc, json, os, runpy, sys, time
stats, started = {}, [0.0]
def cb(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        s = stats.setdefault(info["generation"], [0, 0.0, 0.0])
        d = time.perf_counter() - started[0]
        s[0] += 1; s[1] += d; s[2] = max(s[2], d)
gc.callbacks.append(cb)
atexit.register(lambda: open(os.environ["DNSGUARD_GC_STATS"], "w").write(json.dumps(stats)))
sys.argv = ["resolver", *sys.argv[1:]]
runpy.run_module("resolver", run_name="__main__")
"""


def one_run(procs: bl.Procs, tree: Path, upstream: int, names: Path, work: Path, seconds: float) -> dict:
    port = bl.free_port(HOST)
    policy = work / "policy.toml"
    policy.write_text(f'mode = "enforce"\n[server]\nlisten = ["{HOST}:{port}"]\nclients = ["127.0.0.0/8"]\n'
                      f'[upstream]\nservers = ["{HOST}:{upstream}"]\ntimeout_ms = 2000\n'
                      f'[cache]\nmax_entries = 30000\n[allow]\ndomains = ["*.miss.test"]\n'
                      f'[log]\nenabled = false\ndatabase = "unused.db"\n')
    gc_file = work / "gc.json"
    gc_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(tree), DNSGUARD_GC_STATS=str(gc_file))
    server = procs.start([sys.executable, "-c", _GC_WRAPPER, "serve", "--policy", str(policy)], cpu=1,
                         cwd=str(tree), env=env, log=work / "server.log")
    try:
        if not bl.wait_answering(HOST, port, "warm.miss.test", 15, server):
            raise SystemExit(f"bench_ab: the server of {tree} did not answer: see {work}/server.log")
        cpu0 = bl.proc_cpu_seconds(server.pid)
        perf = bl.run_dnsperf(HOST, port, names, seconds=seconds, outstanding=500, clients=1, cpu=0,
                              workdir=work)
        cpu = bl.proc_cpu_seconds(server.pid) - cpu0
    finally:
        procs.stop(server)
    gc_stats = json.loads(gc_file.read_text()) if gc_file.exists() else {}
    done = max(perf.completed, 1)
    return {"qps": perf.qps, "lost": perf.lost, "cpu_us_per_q": cpu / done * 1e6,
            "gc_ms": sum(s[1] for s in gc_stats.values()) * 1000,
            "gc_max_pause_ms": max((s[2] for s in gc_stats.values()), default=0.0) * 1000,
            "gc": gc_stats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", type=Path, required=True, help="the first source tree (e.g. before)")
    p.add_argument("--b", type=Path, required=True, help="the second source tree (e.g. after)")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("bench_ab: needs 2 CPUs (server on CPU 1, the rest on CPU 0)")
    procs = bl.Procs()
    with tempfile.TemporaryDirectory(prefix="dnsguard-ab-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        names = work / "miss.txt"
        bl.write_queries(names, [(bl.MISS_FMT.format(i), "A") for i in range(400_000)])
        upstream = bl.free_port(HOST)
        dnsmasq = procs.start(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
                               f"--listen-address={HOST}", "--bind-interfaces", f"--port={upstream}",
                               "--pid-file=", "--log-facility=-", "--local-ttl=3600",
                               f"--address=/miss.test/{bl.MISS_ADDR}"], cpu=0, log=work / "dnsmasq.log")
        try:
            if not bl.wait_answering(HOST, upstream, "x.miss.test", 15, dnsmasq):
                raise SystemExit("bench_ab: dnsmasq did not start")
            runs: dict[str, list[dict]] = {"a": [], "b": []}
            for i in range(a.pairs):
                for key, tree in (("a", a.a), ("b", a.b)):
                    r = one_run(procs, tree.resolve(), upstream, names, work, a.seconds)
                    runs[key].append(r)
                    print(f"pair {i + 1} {key}: {r['qps']:8.0f} q/s  {r['cpu_us_per_q']:6.1f} µs/q  "
                          f"gc {r['gc_ms']:6.1f} ms (longest {r['gc_max_pause_ms']:.1f} ms)  "
                          f"lost {r['lost']}", flush=True)
        finally:
            procs.stop_all()
    ratios = [b["cpu_us_per_q"] / x["cpu_us_per_q"] for x, b in zip(runs["a"], runs["b"], strict=True)]
    for key, tree in (("a", a.a), ("b", a.b)):
        rs = runs[key]
        cpu = [r["cpu_us_per_q"] for r in rs]
        print(f"{key} = {tree}: median {statistics.median(cpu):.1f} µs/q (lowest {min(cpu):.1f}), "
              f"{statistics.median(r['qps'] for r in rs):.0f} q/s, "
              f"gc {statistics.median(r['gc_ms'] for r in rs):.0f} ms a run, longest pause "
              f"{max(r['gc_max_pause_ms'] for r in rs):.1f} ms")
    print(f"CPU per miss, b / a in each pair: {' '.join(f'{x:.2f}' for x in ratios)}; "
          f"median {statistics.median(ratios):.2f}; b lower in {sum(x < 1 for x in ratios)} of {len(ratios)}")


if __name__ == "__main__":
    main()
