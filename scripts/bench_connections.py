#!/usr/bin/env python3
"""Measure connection recording: connections/s recorded without loss, the recorder's CPU, and
whether DNS answers move while it records.

    python scripts/bench_connections.py                     # rates 500..8000 conn/s, 8 s each
    python scripts/bench_connections.py --rates 1000,4000 --seconds 5
    python scripts/bench_connections.py --dns 10            # + dnsperf with recording off/on

Needs root (network namespaces), iptables, conntrack-capable kernel; the DNS part needs
dnsperf and dnsmasq. Everything runs inside throw-away namespaces of tests/netns.py
(agent -> router with the fence -> "internet"), TEST-NET addresses only, deleted on exit.

Recording, per rate: the fence (container mode, [allow] cidrs 203.0.113.0/24 so no DNS is
needed) is applied in the router, the conntrack table flushed, and a `ConnRecorder` started
in a child process of its own (so its CPU can be read from /proc). Load generators in the
agent namespace open and close TCP connections (full handshake, a byte each way, client
closes first) to listeners in the "internet" namespace at the offered rate; then the bench
waits (up to 60 s) until every connection has a completed row or is counted as dropped.
"Without loss" = rows == connections made and nothing dropped.

DNS (--dns SECONDS): `dnsguard serve --firewall` in the router (upstream dnsmasq in the
internet namespace), dnsperf from the router's loopback at a fixed rate, three ways:
no connection load; connection load with [firewall] record_connections = false; the same
load with recording on. Latency and answered rate are compared.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from netns import AGENT_NET4, DNS4, ROUTER_IN4, SERVER4, Topology, cleanup_stale  # noqa: E402

from resolver.fence import firewall as fw  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PORTS = list(range(8000, 8010))

SERVER = r"""
import os, socket, sys, selectors
sel = selectors.DefaultSelector()
for host in sys.argv[2:]:
    for port in range(8000, 8010):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port)); s.listen(4096); s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
import ctypes, signal
for _ in range(int(sys.argv[1]) - 1):
    if os.fork() == 0:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: go when the parent goes
        break
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        try:
            c, _a = key.fileobj.accept()
        except BlockingIOError:
            continue
        try:
            c.settimeout(2)
            c.sendall(c.recv(1) or b"")
            c.recv(1)
        except OSError:
            pass
        c.close()
"""

CLIENT = r"""
import socket, sys, time
rate, seconds, worker, workers = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
hosts = sys.argv[5:]
targets = [(h, p) for h in hosts for p in range(8000, 8010)]
n = fail = 0
start = time.monotonic()
while True:
    now = time.monotonic() - start
    if now >= seconds:
        break
    due = int(now * rate)
    if n + fail >= due:
        time.sleep(0.0005)
        continue
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect(targets[(n + fail) % len(targets)])
        s.sendall(b"x")
        s.recv(1)
        n += 1
    except OSError:
        fail += 1
    finally:
        s.close()
print(n, fail, flush=True)
"""

RECORDER = r"""
import json, signal, sys, time
from resolver.fence.connrec import ConnRecorder
rec = ConnRecorder(sys.argv[1], netns=sys.argv[2], refresh=float(sys.argv[3]))
rec.start()
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print("ready", flush=True)
while not stop:
    time.sleep(0.05)
rec.stop()
print(json.dumps({"inserted": rec.inserted, "dropped": rec.dropped, "overruns": rec.overruns,
                  "dumps": rec.dumps, "error": rec.last_error}), flush=True)
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def counts(db: Path) -> tuple[int, int, int]:
    """(rows, completed rows, dropped)."""
    with sqlite3.connect(db, timeout=5) as conn:
        rows, done = conn.execute("SELECT count(*), count(end_ts) FROM connections").fetchone()
        dropped = conn.execute("SELECT coalesce(sum(dropped), 0) FROM connection_overflow").fetchone()[0]
    return rows, done, dropped


def start_server(topo: Topology, workers: int) -> subprocess.Popen:
    p = topo.spawn(topo.internet, sys.executable, "-c", SERVER, str(workers), *SERVER4,
                   stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def load(topo: Topology, rate: float, seconds: float, workers: int) -> tuple[int, int, float]:
    """Open and close connections at ``rate``/s for ``seconds``; (made, failed, wall seconds)."""
    t0 = time.monotonic()
    procs = [topo.spawn(topo.agent, sys.executable, "-c", CLIENT, str(rate / workers), str(seconds), str(i),
                        str(workers), *SERVER4, stdout=subprocess.PIPE, text=True) for i in range(workers)]
    made = failed = 0
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 60)
        a, b = out.split()
        made, failed = made + int(a), failed + int(b)
    return made, failed, time.monotonic() - t0


def record_step(topo: Topology, runner: fw.Runner, rate: float, seconds: float, workers: int,
                refresh: float, tmp: Path) -> dict:
    topo.ns(topo.router, "conntrack", "-F", check=False)
    db = tmp / f"conn-{int(rate)}.db"
    rec = topo.spawn(topo.router, sys.executable, "-c", RECORDER, str(db), topo.router, str(refresh),
                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert rec.stdout is not None and rec.stdout.readline().strip() == "ready"
    # ip netns exec execs the python: rec.pid is the recorder itself
    cpu0 = cpu_seconds(rec.pid)
    made, failed, wall = load(topo, rate, seconds, workers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows, done, dropped = counts(db)
        if done + dropped >= made:
            break
        time.sleep(0.2)
    caught_up = time.monotonic() - (deadline - 60)
    cpu = cpu_seconds(rec.pid) - cpu0
    rec.send_signal(signal.SIGTERM)
    out, _ = rec.communicate(timeout=30)
    stats = json.loads(out.strip().splitlines()[-1])
    rows, done, dropped = counts(db)
    return {"offered_per_s": rate, "made": made, "failed": failed, "achieved_per_s": round(made / seconds, 1),
            "rows": rows, "completed": done, "dropped": dropped, "overruns": stats["overruns"],
            "lossless": rows == made and dropped == 0, "catch_up_s": round(caught_up, 1),
            "recorder_cpu_s": round(cpu, 2), "recorder_cpu_pct": round(100 * cpu / (wall + caught_up), 1),
            "cpu_us_per_conn": round(1e6 * cpu / made, 1) if made else None}


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if os.cpu_count() and os.cpu_count() > 1 else []


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            out += [int(x) for x in fh.read().split()]
    return out


def dnsperf(topo: Topology, port: int, data: Path, qps: int, seconds: float) -> dict:
    out = topo.ns(topo.router, *pin(0), "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(data), "-l",
                  str(seconds), "-Q", str(qps), "-c", "4", "-T", "1", "-q", "200", "-t", "2", check=False,
                  timeout=seconds + 60).stdout
    res: dict = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Queries per second:"):
            res["qps"] = float(line.split()[-1])
        elif line.startswith("Queries lost:"):
            res["lost"] = int(line.split()[2])
        elif line.startswith("Average Latency"):
            nums = [float(x) for x in re.findall(r"\d+\.\d+", line)]
            res["avg_ms"], res["max_ms"] = round(nums[0] * 1000, 3), round(nums[2] * 1000, 3)
        elif line.startswith("Latency StdDev"):
            res["stddev_ms"] = round(float(line.split()[-1]) * 1000, 3)
    return res


def dns_step(topo: Topology, runner: fw.Runner, seconds: float, qps: int, conn_rate: float, workers: int,
             tmp: Path, rounds: int) -> list[dict]:
    dm = topo.spawn(topo.internet, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                    "--no-hosts", f"--listen-address={DNS4}", "--bind-interfaces", "--port=53", "--user=root",
                    "--pid-file=", f"--host-record=allowed.test,{SERVER4[0]}", "--local-ttl=3600",
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = tmp / "queries.txt"
    data.write_text("allowed.test A\n" * 100)
    out: list[dict] = []
    cases = (("no connection load", True, False), ("connection load, recording off", False, True),
             ("connection load, recording on", True, True))
    for label, record, with_load in [c for _ in range(rounds) for c in cases]:  # interleaved rounds
        policy = tmp / f"policy-{int(record)}{int(with_load)}.toml"
        logdb = tmp / f"dns-{len(out)}.db"
        port = 5300 + len(out)
        policy.write_text(
            f'[server]\nlisten = ["{ROUTER_IN4}:53", "127.0.0.1:{port}"]\n'
            f'clients = ["{AGENT_NET4}", "127.0.0.0/8"]\n'
            f'[upstream]\nservers = ["{DNS4}:53"]\n'
            '[allow]\ndomains = ["allowed.test"]\ncidrs = ["203.0.113.0/24"]\n'
            f'[log]\ndatabase = "{logdb}"\n'
            f'[firewall]\nenabled = true\nrecord_connections = {"true" if record else "false"}\n')
        topo.ns(topo.router, "conntrack", "-F", check=False)
        serve = topo.spawn(topo.router, *pin(1), sys.executable, "-m", "resolver", "serve", "--policy",
                           str(policy), "--firewall", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert serve.stderr is not None
        while "listening on 127.0.0.1" not in serve.stderr.readline():
            if serve.poll() is not None:
                raise SystemExit("serve did not start")
        # serve has CPU 1 to itself; its recorder and log writer children, the load and dnsperf
        # share CPU 0 (a child inherits its parent's CPU set).
        for child in children(serve.pid):
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(child)], capture_output=True, check=False)
        gen = None
        if with_load:
            gen = [topo.spawn(topo.agent, *pin(0), sys.executable, "-c", CLIENT, str(conn_rate / workers),
                              str(seconds + 4), str(i), str(workers), *SERVER4, stdout=subprocess.PIPE,
                              text=True)
                   for i in range(workers)]
            time.sleep(2)  # the load is running before DNS is measured
        recorder = [c for c in children(serve.pid) if b"connproc" in Path(f"/proc/{c}/cmdline").read_bytes()]
        cpu0 = cpu_seconds(serve.pid)
        rcpu0 = cpu_seconds(recorder[0]) if recorder else 0.0
        res = dnsperf(topo, port, data, qps, seconds)
        res["serve_cpu_s"] = round(cpu_seconds(serve.pid) - cpu0, 2)
        res["recorder_cpu_s"] = round(cpu_seconds(recorder[0]) - rcpu0, 2) if recorder else None
        for p in gen or []:
            p.communicate(timeout=seconds + 60)
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=30)
        # Server-side latency (receive -> reply handed to the kernel), from the lookup log: what
        # the query path itself spent, free of dnsperf's own scheduling on the shared CPU.
        with sqlite3.connect(logdb) as conn:
            lat = sorted(r[0] for r in conn.execute("SELECT latency_ms FROM lookup_rows WHERE latency_ms "
                                                   "IS NOT NULL"))
        if lat:
            res["server_p50_ms"] = round(lat[len(lat) // 2], 3)
            res["server_p99_ms"] = round(lat[int(len(lat) * 0.99)], 3)
        out.append({"case": label, **res})
        print(json.dumps(out[-1]), flush=True)
    dm.terminate()
    summary = []
    for label, _, _ in cases:
        runs = [r for r in out if r["case"] == label]
        summary.append({"case": label, "runs": len(runs), **{
            f"median_{k}": statistics.median(r[k] for r in runs if r.get(k) is not None)
            for k in ("qps", "avg_ms", "max_ms", "server_p50_ms", "server_p99_ms", "serve_cpu_s",
                      "recorder_cpu_s")
            if any(r.get(k) is not None for r in runs)}})
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="500,1000,2000,4000,8000",
                    help="offered connections/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=8.0, help="load duration per rate")
    ap.add_argument("--workers", type=int, default=4, help="load generator processes")
    ap.add_argument("--refresh", type=float, default=5.0, help="the recorder's counter refresh interval")
    ap.add_argument("--dns", type=float, default=0.0, metavar="SECONDS", help="also run the DNS comparison")
    ap.add_argument("--dns-qps", type=int, default=5000)
    ap.add_argument("--dns-conn-rate", type=float, default=1000.0)
    ap.add_argument("--rounds", type=int, default=3, help="DNS comparison rounds (medians reported)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    cleanup_stale()
    topo = Topology().create()
    results: dict = {"load_before": os.getloadavg(), "recording": [], "dns": []}
    try:
        for ns in (topo.agent,):
            topo.ns(ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        runner = fw.Runner(topo.router)
        spec = fw.FenceSpec("container", sources=(ipaddress.ip_network(AGENT_NET4),),
                            listen=((ROUTER_IN4, 53),), ports=None,
                            allow_cidrs=(ipaddress.ip_network("203.0.113.0/24"),))
        fw.apply(spec, runner)
        server = start_server(topo, 2)
        with tempfile.TemporaryDirectory(prefix="dnsguard-connbench-") as tmpdir:
            tmp = Path(tmpdir)
            for rate in [float(r) for r in args.rates.split(",")]:
                step = record_step(topo, runner, rate, args.seconds, args.workers, args.refresh, tmp)
                results["recording"].append(step)
                print(json.dumps(step), flush=True)
            if args.dns:
                results["dns"] = dns_step(topo, runner, args.dns, args.dns_qps, args.dns_conn_rate,
                                          args.workers, tmp, args.rounds)
                for r in results["dns"]:
                    print(json.dumps(r), flush=True)
        server.terminate()
        fw.remove(runner)
    finally:
        topo.destroy()
    results["load_after"] = os.getloadavg()
    print(json.dumps({"load_before": results["load_before"], "load_after": results["load_after"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
