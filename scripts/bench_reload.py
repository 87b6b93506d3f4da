#!/usr/bin/env python3
"""Reload under load (issue #11 part 2): does a 1,000,000-name reload stall answers?

1. Load time: ``load_config`` of a policy with N names (half exact, half ``*.`` wildcards,
   as scripts/bench_policy.py builds them), in a fresh process, ``--repeat`` times.
2. Start-up: ``dnsguard serve`` with that policy, spawn to its "listening" line.
3. Reload under load: ``dnsguard serve`` with a small policy, dnsperf sending ``--qps``
   queries a second (names the policy denies: answered from the event loop, so every
   stall of the loop shows as latency); after ``--at`` seconds the big policy replaces
   the file (atomic rename, picked up by the file watcher). Reports dnsperf's worst and
   p99.9 latency for the whole run and how long the reload took, against a baseline run
   of the same length without a reload.

Everything runs on loopback. ``--repo`` runs another checkout's code (e.g. main, for a
before/after comparison).

    scripts/bench_reload.py                       # 1M names, 5,000 q/s, 20 s runs
    scripts/bench_reload.py --names 200000 --seconds 10
    scripts/bench_reload.py --repo /path/to/other/checkout --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_policy import make_rules  # noqa: E402
from benchlib import free_port, run_dnsperf, wait_answering  # noqa: E402

SMALL = """mode = "enforce"
[upstream]
servers = ["127.0.0.1:9"]
[allow]
domains = ["ok.test"]
"""


def write_big(path: Path, n: int) -> None:
    allow, deny = make_rules(n)
    with open(path, "w") as fh:
        fh.write('mode = "enforce"\n[upstream]\nservers = ["127.0.0.1:9"]\n[allow]\ndomains = [\n')
        fh.write(",\n".join(f'"{a}"' for a in allow))
        fh.write("\n]\n[deny]\ndomains = [" + ", ".join(f'"{d}"' for d in deny) + "]\n")


def env_for(repo: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(repo), PYTHONUNBUFFERED="1")


def load_times(repo: Path, policy: Path, repeat: int) -> list[float]:
    code = ("import time, sys; from resolver.policy.config import load_config; t = time.perf_counter(); "
            "c = load_config(sys.argv[1]); print(time.perf_counter() - t, c.matcher.rule_count)")
    out = []
    for _ in range(repeat):
        # cwd = the checkout: `python -c` puts the working directory first on sys.path.
        r = subprocess.run([sys.executable, "-c", code, str(policy)], env=env_for(repo), capture_output=True,
                           text=True, timeout=600, check=True, cwd=repo)
        out.append(float(r.stdout.split()[0]))
    return out


class Server:
    def __init__(self, repo: Path, policy: Path, workdir: Path) -> None:
        self.port = free_port()
        self.err = workdir / f"serve-{self.port}.err"
        self.t0 = time.monotonic()
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "resolver", "serve", "--policy", str(policy), "--listen",
                 f"127.0.0.1:{self.port}", "--no-log"], env=env_for(repo), cwd=workdir,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_line(self, text: str, timeout: float, count: int = 1) -> float:
        """Seconds since start until ``text`` appears ``count`` times on stderr."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.stderr().count(text) >= count:
                return time.monotonic() - self.t0
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsguard exited: {self.stderr()[-2000:]}")
            time.sleep(0.01)
        raise TimeoutError(f"no {text!r} within {timeout}s: {self.stderr()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--names", type=int, default=1_000_000)
    ap.add_argument("--qps", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--at", type=float, default=3.0, help="seconds into the run to replace the policy")
    ap.add_argument("--repeat", type=int, default=3, help="load-time repetitions")
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout whose code to run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result: dict = {"names": args.names, "qps": args.qps, "seconds": args.seconds, "repo": str(args.repo),
                    "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp:
        work = Path(tmp)
        big = work / "big.toml"
        write_big(big, args.names)
        times = load_times(args.repo, big, args.repeat)
        result["load_s"] = {"min": min(times), "median": statistics.median(times), "all": times}
        print(f"load_config, {args.names:,} names: min {min(times):.2f} s, median "
              f"{statistics.median(times):.2f} s ({args.repeat} runs)", flush=True)

        s = Server(args.repo, big, work)
        try:
            result["startup_s"] = s.wait_line("dnsguard: listening", 600)
        finally:
            s.stop()
        print(f"serve start-up with {args.names:,} names: {result['startup_s']:.2f} s to listening",
              flush=True)

        queries = work / "queries.txt"
        queries.write_text("".join(f"q{i}.denied.test A\n" for i in range(1000)))
        policy = work / "policy.toml"
        for label in ("baseline", "reload"):
            policy.write_text(SMALL)
            s = Server(args.repo, policy, work)
            try:
                s.wait_line("dnsguard: listening", 60)
                wait_answering("127.0.0.1", s.port, "q0.denied.test", 10.0, s.proc)
                state = {"start": time.monotonic(), "swapped": None, "done": None}

                def during(state=state, label=label, s=s) -> None:
                    if (state["swapped"] is not None and state["done"] is None
                            and "policy reloaded" in s.stderr()):
                        state["done"] = time.monotonic()
                    if (label == "reload" and state["swapped"] is None
                            and time.monotonic() - state["start"] >= args.at):
                        tmp_path = work / "big.toml.new"
                        tmp_path.write_bytes(big.read_bytes())
                        os.replace(tmp_path, policy)  # what `touch`-ing a new file amounts to
                        state["swapped"] = time.monotonic()

                perf = run_dnsperf("127.0.0.1", s.port, queries, seconds=args.seconds, qps=args.qps,
                                   latencies=True, workdir=work, during=during, during_interval=0.05,
                                   timeout_s=5.0)
                row = {"max_ms": perf.max_ms, "p999_ms": perf.p999_ms, "p99_ms": perf.p99_ms,
                       "p50_ms": perf.p50_ms, "completed": perf.completed, "lost": perf.lost,
                       "qps": perf.qps, "ok": perf.ok}
                if label == "reload":
                    done = state["done"] or s.wait_line("policy reloaded", 600) + s.t0
                    row["reload_s"] = done - state["swapped"] if state["swapped"] else None
                    row["reload_line"] = next((ln for ln in s.stderr().splitlines() if "reloaded" in ln),
                                              None)
                result[label] = row
                print(f"{label}: worst {perf.max_ms:.1f} ms, p99.9 {perf.p999_ms:.2f} ms, p99 "
                      f"{perf.p99_ms:.2f} ms, {perf.completed} answered, {perf.lost} lost"
                      + (f"; reload took {row['reload_s']:.2f} s (1 s of it the watcher's settle wait)"
                         if label == "reload" and row.get("reload_s") else ""), flush=True)
            finally:
                s.stop()
    result["loadavg_after"] = os.getloadavg()
    print(f"load average before {result['loadavg_before']}, after {result['loadavg_after']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
