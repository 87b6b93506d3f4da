#!/usr/bin/env python3
"""Policy matcher cost versus rule count (issue #6 part 3).

Builds policies of 10, 10,000 and 1,000,000 allow rules (half exact names, half
``*.`` wildcards, plus a few deny rules), and for each size reports:

* load time: ``resolver.policy.config.load_config`` on a policy.toml holding the rules
  (TOML parsing included), and building the ``resolver.policy.Matcher`` alone;
* memory: bytes allocated while building the Matcher (tracemalloc) and the RSS growth;
* per-lookup cost of ``Matcher.decide`` for exact hits, wildcard hits, misses,
  deny hits, and deep (20-label) hits and misses.

Each size runs in its own child process so memory figures do not overlap.

    scripts/bench_policy.py                 # 10, 10k, 1M
    scripts/bench_policy.py --quick         # 10, 10k, 100k, fewer lookups
    scripts/bench_policy.py --sizes 10,1000000 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KINDS = ("exact_hit", "wild_hit", "miss", "deny_hit", "deep_hit", "deep_miss")
KIND_TITLES = {
    "exact_hit": "exact hit",
    "wild_hit": "wildcard hit",
    "miss": "miss",
    "deny_hit": "deny hit",
    "deep_hit": "deep hit (20 labels)",
    "deep_miss": "deep miss (20 labels)",
}
N_DENY = 10
CHUNK = 1000
HOT = 64


def make_rules(n: int) -> tuple[list[str], list[str]]:
    allow = []
    for i in range(n):
        if i % 2:
            allow.append(f"*.zone{i}.example{i % 89}.net")
        else:
            allow.append(f"host{i}.svc{i % 997}.example.com")
    deny = [f"*.blocked{i}.zone1.example1.net" for i in range(N_DENY)]
    return allow, deny


def lookup_names(n: int, count: int, rnd: random.Random) -> dict[str, list[str]]:
    evens = [i for i in range(0, n, 2)] if n <= 2 * count else None
    odds = [i for i in range(1, n, 2)] if n <= 2 * count else None

    def pick(pool: list[int] | None, parity: int) -> int:
        if pool is not None:
            return rnd.choice(pool)
        return rnd.randrange(parity, n, 2) if n > parity else parity

    deep_prefix = ".".join(f"l{k}" for k in range(17))
    names: dict[str, list[str]] = {k: [] for k in KINDS}
    for _ in range(count):
        i = pick(evens, 0)
        names["exact_hit"].append(f"host{i}.svc{i % 997}.example.com")
        j = pick(odds, 1)
        names["wild_hit"].append(f"www.cdn.zone{j}.example{j % 89}.net")
        names["miss"].append(f"nothere{rnd.randrange(10**9)}.unknown.org")
        names["deny_hit"].append(f"x.blocked{rnd.randrange(N_DENY)}.zone1.example1.net")
        names["deep_hit"].append(f"{deep_prefix}.zone{j}.example{j % 89}.net")
        names["deep_miss"].append(f"{deep_prefix}.q{rnd.randrange(10**9)}.nowhere.org")
    return names


def rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure_one(n: int, lookups: int, repeat: int, use_tracemalloc: bool) -> dict:
    from resolver.core.names import text_to_wire
    from resolver.policy.config import load_config
    from resolver.policy.matcher import Matcher

    allow, deny = make_rules(n)
    out: dict = {"rules": n + len(deny), "allow": n, "deny": len(deny), "lookups": lookups}

    with tempfile.TemporaryDirectory(prefix="dnsguard-bench-policy-") as tmp:
        path = Path(tmp) / "policy.toml"
        with open(path, "w") as fh:
            fh.write('mode = "enforce"\n[upstream]\nservers = ["127.0.0.1:5300"]\n[allow]\ndomains = [\n')
            fh.writelines(f'  "{r}",\n' for r in allow)
            fh.write("]\n[deny]\ndomains = [\n")
            fh.writelines(f'  "{r}",\n' for r in deny)
            fh.write("]\n")
        out["policy_file_bytes"] = path.stat().st_size
        gc.collect()
        t = time.perf_counter()
        cfg = load_config(path)
        out["load_config_s"] = time.perf_counter() - t
        assert cfg.matcher.rule_count == n + len(deny), cfg.matcher.rule_count
        del cfg
    gc.collect()

    rss0 = rss_kb()
    t = time.perf_counter()
    matcher = Matcher(allow, deny)
    out["matcher_build_s"] = time.perf_counter() - t
    gc.collect()
    out["rss_delta_kb"] = rss_kb() - rss0
    if use_tracemalloc:
        del matcher
        gc.collect()
        tracemalloc.start()
        matcher = Matcher(allow, deny)
        cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["tracemalloc_bytes"] = cur
        out["tracemalloc_peak_bytes"] = peak
        out["bytes_per_rule"] = cur / (n + len(deny))

    rnd = random.Random(n)
    texts = lookup_names(n, lookups, rnd)
    wires = {k: [text_to_wire(x) for x in v] for k, v in texts.items()}
    expect = {"exact_hit": True, "wild_hit": True, "miss": False, "deny_hit": False, "deep_hit": True,
              "deep_miss": False}
    for k, ws in wires.items():
        if n < 2 and k in ("exact_hit", "wild_hit", "deep_hit"):
            continue
        bad = [w for w in ws[:1000] if matcher.decide(w).allowed != expect[k]]
        if bad:
            raise SystemExit(f"bench_policy: {k}: wrong decision for {bad[0]!r}")

    # Timed with the thread's own CPU clock, in chunks of CHUNK lookups: time the CPU spent
    # on other processes (this machine may be shared) is not counted, and the median chunk
    # ignores the odd chunk disturbed by cache pollution from a neighbour.
    decide = matcher.decide
    tt = time.thread_time_ns
    chunks = [range(s, min(s + CHUNK, lookups)) for s in range(0, lookups, CHUNK)]
    loop = []
    ws = wires["miss"]
    for _ in range(repeat):
        for c in chunks:
            part = ws[c.start:c.stop]
            t = tt()
            for _w in part:
                pass
            loop.append((tt() - t) / len(part))
    loop_ns = statistics.median(loop)
    def timed(ws: list[bytes]) -> dict:
        per = []
        for _ in range(repeat):
            for c in chunks:
                part = ws[c.start:c.stop]
                t = tt()
                for w in part:
                    decide(w)
                per.append((tt() - t) / len(part) - loop_ns)
        per.sort()
        return {"ns_median": statistics.median(per), "ns_p10": per[len(per) // 10],
                "ns_p90": per[(len(per) * 9) // 10]}

    # cold: every lookup a different name, spread over the whole table (worst case for the
    # CPU caches); hot: HOT names asked over and over, as real traffic mostly is.
    costs = {k: timed(wires[k]) for k in KINDS}
    hot = {k: timed([wires[k][i % HOT] for i in range(lookups)]) for k in KINDS}
    out["lookup_ns_hot"] = hot
    out["lookup_ns"] = costs
    out["loop_overhead_ns"] = loop_ns
    out["rss_end_kb"] = rss_kb()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", help="allow-rule counts (default 10,10000,1000000; quick 10,10000,100000)")
    p.add_argument("--lookups", type=int, help="distinct names per lookup kind (default 100000; quick 20000)")
    p.add_argument("--repeat", type=int, default=5, help="passes over the lookup names")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-tracemalloc", action="store_true", help="skip the (slow) tracemalloc build")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per size")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    lookups = a.lookups or (20_000 if a.quick else 100_000)

    if a.one is not None:
        json.dump(measure_one(a.one, lookups, a.repeat, not a.no_tracemalloc), sys.stdout)
        return 0

    sizes = [int(x) for x in (a.sizes or ("10,10000,100000" if a.quick else "10,10000,1000000")).split(",")]
    results = []
    for n in sizes:
        print(f"bench_policy: {n:,} allow rules ...", end="", flush=True)
        cmd = [sys.executable, __file__, "--one", str(n), "--lookups", str(lookups),
               "--repeat", str(a.repeat)]
        if a.no_tracemalloc:
            cmd.append("--no-tracemalloc")
        t = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
        if r.returncode != 0:
            print(f" failed:\n{r.stderr[-2000:]}")
            return 1
        res = json.loads(r.stdout)
        res["size"] = n
        results.append(res)
        print(f" {time.monotonic() - t:.1f} s")

    print()
    print(render(results))
    if a.json:
        info = {"python": sys.version.split()[0], "machine": os.uname().machine, "kernel": os.uname().release}
        Path(a.json).write_text(json.dumps({"info": info, "results": results}, indent=1))
        print(f"\nbench_policy: results written to {a.json}")
    return 0


def _w(k: str) -> int:
    return max(9, len(KIND_TITLES[k]))


def render(results: list[dict]) -> str:
    head = (f"{'allow rules':>11} {'load_config':>11} {'Matcher()':>9} {'alloc MB':>8} {'B/rule':>6} "
            f"{'RSS+ MB':>7} | " + " ".join(f"{KIND_TITLES[k]:>{_w(k)}}" for k in KINDS))
    lines = ["ns of CPU per Matcher.decide() call (median of 1,000-lookup chunks, loop overhead subtracted)"]
    for key, title in (("lookup_ns", "cold: {n:,} different names per kind, spread over the table"),
                       ("lookup_ns_hot", f"hot: the same {HOT} names per kind over and over")):
        n = results[0].get("lookups", 0) if results else 0
        lines += ["", title.format(n=n), head, "-" * len(head)]
        for r in results:
            alloc = r.get("tracemalloc_bytes")
            lines.append(
                f"{r['size']:>11,} {r['load_config_s']:>10.3f}s {r['matcher_build_s']:>8.3f}s "
                + (f"{alloc / 2**20:>8.1f} {r['bytes_per_rule']:>6.0f} " if alloc is not None else
                   f"{'-':>8} {'-':>6} ")
                + f"{r['rss_delta_kb'] / 1024:>7.1f} | "
                + " ".join(f"{r[key][k]['ns_median']:>{_w(k)}.0f}" for k in KINDS))
        if len(results) >= 2:
            lo, hi = results[0], results[-1]
            ratios = " ".join(f"{hi[key][k]['ns_median'] / lo[key][k]['ns_median']:>{_w(k)}.2f}"
                              for k in KINDS)
            label = f"{hi['size']:,} / {lo['size']:,}"
            lines.append(f"{'cost ratio ' + label:>58} | {ratios}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
