"""Shared helpers for scripts/bench: processes, /proc figures, dnsperf, test data.

Everything here talks to loopback only (``_check_loopback`` guards every address
the bench sends to), every wait has a deadline, and every process started through
:class:`Procs` is stopped by :meth:`Procs.stop_all` -- which scripts/bench calls
from ``finally`` and from its SIGTERM/SIGINT handling.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = ("127.0.0.1", "::1")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _check_loopback(host: str) -> None:
    if host not in LOOPBACK:
        raise ValueError(f"the bench only sends to loopback, not {host!r}")


# ---------------------------------------------------------------- processes

class Procs:
    """Every child process the bench starts, so all of them can be stopped on any exit."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def start(self, argv: list[str], *, cpu: int | None = None, log: Path | None = None,
              cwd: str | None = None, env: dict | None = None) -> subprocess.Popen:
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
        try:
            # Own session: a Ctrl-C in the terminal reaches only the bench, which then
            # stops its children in order (dnsguard must get SIGTERM to drain its log).
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd, env=env,
                                 start_new_session=True)
        finally:
            if log:
                out.close()
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        if p in self.live:
            self.live.remove(p)
        return p.returncode

    def stop_all(self) -> None:
        for p in list(reversed(self.live)):
            self.stop(p, timeout=5.0)


class Interrupted(Exception):
    """Raised from the SIGTERM handler so ``finally`` blocks run."""


def install_signal_handlers() -> None:
    def handler(signum, frame):  # noqa: ARG001
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


# ---------------------------------------------------------------- /proc figures

def proc_cpu_seconds(pid: int, descendants: bool = False) -> float:
    """utime + stime of a process, all threads included (``/proc/PID/stat``).

    With ``descendants``, the live child processes' too: `dnsguard serve` writes its lookup
    log from a child process, and that CPU is the server's cost as much as its own.
    """
    with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is state (field 3); utime and stime are fields 14 and 15.
    total = (int(fields[11]) + int(fields[12])) / CLK_TCK
    if descendants:
        for child in child_pids(pid):
            with contextlib.suppress(OSError, ValueError):
                total += proc_cpu_seconds(child, True)
    return total


def own_cpu_seconds(pid: int) -> float:
    """A process's own CPU seconds (``proc_cpu_seconds``), 0.0 once it is gone."""
    try:
        return proc_cpu_seconds(pid)
    except OSError:
        return 0.0


def writer_pid(server_pid: int, deadline_s: float = 5.0) -> int | None:
    """The lookup log's writer process of a `dnsguard serve` (its child running
    resolver.log.logproc), waited for up to ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while True:
        for child in child_pids(server_pid):
            with contextlib.suppress(OSError):
                with open(f"/proc/{child}/cmdline", "rb") as fh:
                    if b"resolver.log.logproc" in fh.read():
                        return child
        if time.monotonic() >= end:
            return None
        time.sleep(0.05)


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(x) for x in fh.read().split())
    return out


def tree_status_kb(pid: int, key: str) -> int | None:
    """A /proc/PID/status figure (VmHWM, VmRSS) summed over the process and its live children."""
    own = proc_status_kb(pid, key)
    if own is None:
        return None
    return own + sum(tree_status_kb(c, key) or 0 for c in child_pids(pid))


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_times(cpu: int | None) -> dict[str, int]:
    """Jiffies of one CPU (or all, ``cpu=None``) from /proc/stat."""
    want = "cpu" if cpu is None else f"cpu{cpu}"
    with open("/proc/stat") as fh:
        for line in fh:
            parts = line.split()
            if parts[0] == want:
                names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
                return {n: int(v) for n, v in zip(names, parts[1:9], strict=False)}
    return {}


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _kernel_softirq_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as fh:
                    if fh.read().startswith("ksoftirqd/"):
                        pids.append(int(d))
            except OSError:
                continue
    return pids


class CpuWatch:
    """CPU used by the watched pids, and by everything else on the machine, over one run.

    ``other_load_pct`` is what is left of the machine's task time (user+nice+system, all
    CPUs, in % of one CPU) after taking out the watched processes, the children reaped
    meanwhile (dnsperf), the bench itself and ksoftirqd (loopback packet work for our own
    traffic): other programs -- tests someone runs on the same machine, say.
    ``other_on_server_cpu_pct`` is the same on the server's CPU alone.
    """

    _softirq = None

    def __init__(self, pids: dict[str, int], cpu: int | None) -> None:
        if CpuWatch._softirq is None:
            CpuWatch._softirq = _kernel_softirq_pids()
        self.pids = pids
        self.cpu = cpu
        self.t0 = time.monotonic()
        self.p0 = {k: _safe_cpu(p) for k, p in pids.items()}
        self.k0 = sum(_safe_cpu(p) for p in CpuWatch._softirq)
        self.c0 = cpu_times(cpu)
        self.a0 = cpu_times(None)
        self.ch0 = children_cpu_seconds()
        self.s0 = _self_cpu()

    def finish(self) -> dict:
        wall = time.monotonic() - self.t0
        used = {k: _safe_cpu(p) - self.p0[k] for k, p in self.pids.items()}
        client = children_cpu_seconds() - self.ch0
        me = _self_cpu() - self.s0
        ksoft = sum(_safe_cpu(p) for p in CpuWatch._softirq or ()) - self.k0

        def task(before: dict, after: dict) -> tuple[float, float]:
            d = {k: (after[k] - before.get(k, 0)) / CLK_TCK for k in after}
            return d.get("user", 0) + d.get("nice", 0) + d.get("system", 0), d.get("steal", 0)

        all_task, steal = task(self.a0, cpu_times(None))
        here_task, _ = task(self.c0, cpu_times(self.cpu))
        other = max(0.0, all_task - sum(used.values()) - client - me - ksoft)
        other_here = max(0.0, here_task - used.get("server", 0.0))
        return {
            "wall_s": wall,
            "cpu_s": used,
            "client_cpu_s": client,
            "other_load_pct": 100.0 * other / wall if wall > 0 else None,
            "other_on_server_cpu_pct": 100.0 * other_here / wall if wall > 0 else None,
            "steal_pct": 100.0 * steal / wall if wall > 0 else None,
        }


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _safe_cpu(pid: int) -> float:
    try:
        return proc_cpu_seconds(pid, descendants=True)
    except OSError:
        return 0.0


def machine_busy_pct(interval: float = 1.0) -> float:
    """Task CPU time on the whole machine over ``interval``, in % of one CPU."""
    a = cpu_times(None)
    time.sleep(interval)
    b = cpu_times(None)
    busy = sum(b[k] - a[k] for k in ("user", "nice", "system"))
    return 100.0 * busy / CLK_TCK / interval


def wait_quiet(max_wait: float, threshold_pct: float = 10.0) -> tuple[float, float]:
    """Wait (at most ``max_wait`` s) until the machine is idle apart from us; returns (waited, busy%).

    Call it when none of the bench's own processes are working.
    """
    t0 = time.monotonic()
    busy = machine_busy_pct(0.5)
    while busy > threshold_pct and time.monotonic() - t0 < max_wait:
        busy = machine_busy_pct(1.0)
    return time.monotonic() - t0, busy


# ---------------------------------------------------------------- a tiny DNS client

RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
QTYPES = {"A": 1, "AAAA": 28}


def build_query(name: str, qtype: str, qid: int = 0x4242) -> bytes:
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", QTYPES[qtype], 1)


def query(host: str, port: int, name: str, qtype: str = "A", timeout: float = 1.0) -> tuple[str, int] | None:
    """(rcode name, answer count) or None on timeout."""
    _check_loopback(host)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(build_query(name, qtype), (host, port))
        try:
            data = s.recv(4096)
        except OSError:
            return None
    if len(data) < 12:
        return None
    flags, ancount = struct.unpack("!H", data[2:4])[0], struct.unpack("!H", data[6:8])[0]
    return RCODES.get(flags & 0xF, str(flags & 0xF)), ancount


def wait_answering(host: str, port: int, name: str, deadline_s: float, proc: subprocess.Popen | None = None
                   ) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        if query(host, port, name, timeout=0.3) is not None:
            return True
        time.sleep(0.1)
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` (tiny race until the server binds it)."""
    _check_loopback(host)
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


# ---------------------------------------------------------------- dnsperf

@dataclass
class PerfResult:
    sent: int = 0
    completed: int = 0
    lost: int = 0
    qps: float = 0.0
    run_time: float = 0.0
    avg_ms: float | None = None
    max_ms: float | None = None
    rcodes: dict[str, int] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    client_cpu_s: float = 0.0
    ok: bool = True
    error: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


_STATS = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
    "run_time": re.compile(r"Run time \(s\):\s+([\d.]+)"),
}
_LAT = re.compile(r"Average Latency \(s\):\s+([\d.]+) \(min ([\d.]+), max ([\d.]+)\)")
_RC = re.compile(r"Response codes:\s+(.*)")
_RC_ITEM = re.compile(r"([A-Z0-9]+) (\d+) \(")


def percentile(sorted_values, q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def run_dnsperf(host: str, port: int, datafile: Path, *, seconds: float | None = None,
                passes: int | None = None, qps: int | None = None, outstanding: int = 100,
                clients: int = 10, cpu: int | None = None,
                timeout_s: float = 2.0, latencies: bool = False, workdir: Path,
                during: Callable[[], None] | None = None, during_interval: float = 1.0) -> PerfResult:
    """One dnsperf run; with ``latencies`` the per-query ``-v`` lines give p50/p99/p99.9."""
    _check_loopback(host)
    argv = ["dnsperf", "-s", host, "-p", str(port), "-d", str(datafile), "-c", str(clients), "-T", "1",
            "-q", str(outstanding), "-t", str(timeout_s)]
    if seconds is not None:
        argv += ["-l", f"{seconds:g}"]
    if passes is not None:
        argv += ["-n", str(passes)]
    if qps:
        argv += ["-Q", str(qps)]
    if latencies:
        argv.append("-v")
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    out_path = workdir / "dnsperf.out"
    # A hard bound on the run: the time limit, the query timeout, plus slack.
    bound = (seconds or 60.0) + timeout_s + 30.0
    res = PerfResult()
    ch0 = children_cpu_seconds()
    with open(out_path, "wb") as out, open(workdir / "dnsperf.err", "ab") as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        end = time.monotonic() + bound
        try:
            while True:
                try:
                    p.wait(min(during_interval, max(0.01, end - time.monotonic())) if during else bound)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= end:
                        raise
                    if during:
                        during()
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
            res.ok, res.error = False, f"dnsperf exceeded {bound:.0f}s"
        except BaseException:
            p.kill()
            p.wait(5)
            raise
    res.client_cpu_s = children_cpu_seconds() - ch0
    lat = array("d")
    tail = []
    with open(out_path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("> "):
                if latencies:
                    parts = line.split()
                    if len(parts) == 5 and parts[1] != "T":
                        try:
                            lat.append(float(parts[4]))
                        except ValueError:
                            pass
                continue
            tail.append(line)
    text = "".join(tail)
    for key, rx in _STATS.items():
        m = rx.search(text)
        if m:
            setattr(res, key, float(m.group(1)) if key in ("qps", "run_time") else int(m.group(1)))
    m = _LAT.search(text)
    if m:
        res.avg_ms, res.max_ms = float(m.group(1)) * 1000, float(m.group(3)) * 1000
    m = _RC.search(text)
    if m:
        res.rcodes = {k: int(v) for k, v in _RC_ITEM.findall(m.group(1))}
    if p.returncode != 0 and res.ok:
        res.ok, res.error = False, f"dnsperf exit {p.returncode}: {text[-300:].strip()}"
    if latencies and lat:
        s = sorted(lat)
        res.p50_ms = percentile(s, 0.50) * 1000
        res.p99_ms = percentile(s, 0.99) * 1000
        res.p999_ms = percentile(s, 0.999) * 1000
    with contextlib.suppress(OSError):
        out_path.unlink()
    return res


# ---------------------------------------------------------------- test data

ALLOWED_FMT = "h{:04d}.allowed.test"
DENIED_FMT = "x{:04d}.denied.test"
MISS_FMT = "n{:07d}.miss.test"
MISS_ADDR = "192.0.2.1"


_DOC_NETS = ("192.0.2", "198.51.100", "203.0.113")


def allowed_addrs(i: int) -> tuple[str, str]:
    """Documentation addresses (RFC 5737 / 3849): never contacted, and public in dnsguard's
    eyes -- private ones (10/8, fc00::/7) would be stripped as DNS rebinding."""
    return f"{_DOC_NETS[i % 3]}.{i % 250 + 1}", f"2001:db8::{i:x}"


def write_hosts(path: Path, n: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            v4, v6 = allowed_addrs(i)
            name = ALLOWED_FMT.format(i)
            fh.write(f"{v4} {name}\n{v6} {name}\n")
    path.chmod(0o644)


def _unbound_server(port: int, workdir: Path, logfile: str) -> list[str]:
    """The `server:` lines every bench unbound shares: one thread, loopback only, no daemon."""
    return [
        "server:",
        "  verbosity: 0",
        "  num-threads: 1",
        f"  interface: 127.0.0.1@{port}",
        f"  port: {port}",
        "  do-ip6: no",
        "  do-daemonize: no",
        '  chroot: ""',
        '  username: ""',
        '  pidfile: ""',
        f'  directory: "{workdir}"',
        "  use-syslog: no",
        f'  logfile: "{workdir / logfile}"',
        "  access-control: 127.0.0.0/8 allow",
        '  module-config: "iterator"',
        "  so-reuseport: no",
    ]


def write_unbound_conf(path: Path, port: int, n_allowed: int, workdir: Path) -> None:
    lines = [
        *_unbound_server(port, workdir, "unbound.log"),
        # Nothing outside the local zones is ever resolved: no traffic leaves loopback.
        '  local-zone: "." refuse',
        '  local-zone: "allowed.test." static',
        '  local-zone: "denied.test." always_nxdomain',
        '  local-zone: "miss.test." redirect',
        f'  local-data: "miss.test. 3600 IN A {MISS_ADDR}"',
    ]
    for i in range(n_allowed):
        v4, v6 = allowed_addrs(i)
        name = ALLOWED_FMT.format(i)
        lines.append(f'  local-data: "{name}. 3600 IN A {v4}"')
        lines.append(f'  local-data: "{name}. 3600 IN AAAA {v6}"')
    lines += ["remote-control:", "  control-enable: no", ""]
    path.write_text("\n".join(lines))


def write_unbound_forwarder_conf(path: Path, port: int, upstream_port: int, workdir: Path) -> None:
    """unbound as a pure forwarder to 127.0.0.1:upstream_port (the bench's upstream dnsmasq)."""
    lines = [
        *_unbound_server(port, workdir, "unbound-fwd.log"),
        # .test is a locally served zone by default in unbound; forward it like any name.
        '  local-zone: "test." nodefault',
        "  do-not-query-localhost: no",
        "  qname-minimisation: no",
        "  harden-referral-path: no",
        "  target-fetch-policy: \"0 0 0 0 0\"",
        "forward-zone:",
        '  name: "."',
        f"  forward-addr: 127.0.0.1@{upstream_port}",
        "remote-control:",
        "  control-enable: no",
        "",
    ]
    path.write_text("\n".join(lines))


def write_queries(path: Path, entries: list[tuple[str, str]]) -> None:
    with open(path, "w") as fh:
        for name, qtype in entries:
            fh.write(f"{name} {qtype}\n")


def query_sets(n_allowed: int, n_denied: int, n_miss: int, seed: int = 6) -> dict[str, list[tuple[str, str]]]:
    rnd = random.Random(seed)
    types = ("A", "AAAA")
    denied = [(DENIED_FMT.format(i), t) for i in range(n_denied) for t in types]
    allowed = [(ALLOWED_FMT.format(i), t) for i in range(n_allowed) for t in types]
    rnd.shuffle(denied)
    rnd.shuffle(allowed)
    mixed = [(ALLOWED_FMT.format(rnd.randrange(n_allowed)), rnd.choice(types)) for _ in range(7000)]
    mixed += [(DENIED_FMT.format(rnd.randrange(n_denied)), rnd.choice(types)) for _ in range(3000)]
    rnd.shuffle(mixed)
    miss = [(MISS_FMT.format(i), "A") for i in range(n_miss)]
    rnd.shuffle(miss)
    return {"denied": denied, "allowed": allowed, "mixed": mixed, "miss": miss}


# ---------------------------------------------------------------- environment

def machine_info() -> dict:
    model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    def version(argv: list[str]) -> str | None:
        if not shutil.which(argv[0]):
            return None
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = (r.stdout + r.stderr).strip().splitlines()
        for line in text:
            if re.search(r"\d+\.\d+", line):
                return line.strip()
        return None
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "dnsperf": version(["dnsperf", "-h"]),
        "dnsmasq": version(["dnsmasq", "--version"]),
        "unbound": version(["unbound", "-V"]),
        "loadavg_at_start": [float(x) for x in load],
    }


def busy_other_processes(exclude: set[int]) -> list[str]:
    """Short description of other processes using CPU right now (sampled over 0.5 s)."""
    def snapshot() -> dict[int, tuple[str, float]]:
        snap = {}
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) in exclude:
                continue
            try:
                with open(f"/proc/{d}/stat") as fh:
                    text = fh.read()
                comm = text[text.index("(") + 1:text.rindex(")")]
                snap[int(d)] = (comm, proc_cpu_seconds(int(d)))
            except (OSError, ValueError):
                continue
        return snap
    a = snapshot()
    time.sleep(0.5)
    b = snapshot()
    busy = []
    for pid, (comm, t1) in b.items():
        if pid in a and (t1 - a[pid][1]) / 0.5 > 0.1:
            busy.append(f"{comm}[{pid}] {100 * (t1 - a[pid][1]) / 0.5:.0f}%")
    return busy


# ---------------------------------------------------------------- metrics / dnstap rows

class Observe:
    """What a ``+metrics`` / ``+dnstap`` row adds around dnsguard: a scraper polling /metrics once
    a second (as Prometheus would, only more often) and a real dnstap receiver, fstrm_capture."""

    def __init__(self, procs: Procs, work: Path, cpu: int | None, *, metrics: bool, dnstap: bool) -> None:
        self.procs, self.work, self.cpu, self.metrics, self.dnstap = procs, work, cpu, metrics, dnstap
        self.sock = work / "dnstap.sock"
        self.capture = work / "dnstap.fstrm"
        self.receiver: subprocess.Popen | None = None
        self.scrapes = 0
        self.scrape_errors = 0
        self.frames: int | None = None
        self.dropped: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def args(self) -> list[str]:
        out = []
        if self.metrics:
            out += ["--metrics", "127.0.0.1:0"]
        if self.dnstap:
            if not shutil.which("fstrm_capture"):
                raise RuntimeError("fstrm_capture is missing (apt-get install fstrm-bin)")
            self.sock.unlink(missing_ok=True)
            (self.work / "fstrm_capture.log").unlink(missing_ok=True)
            self.receiver = self.procs.start(
                ["fstrm_capture", "-t", "protobuf:dnstap.Dnstap", "-u", str(self.sock),
                 "-w", str(self.capture)], cpu=self.cpu, log=self.work / "fstrm_capture.log")
            end = time.monotonic() + 10
            while not self.sock.exists() and time.monotonic() < end:
                time.sleep(0.05)
            out += ["--dnstap", f"unix:{self.sock}"]
        return out

    def started(self, err: Path) -> None:
        if not self.metrics:
            return
        m = None
        end = time.monotonic() + 10
        while m is None and time.monotonic() < end:
            m = re.search(r"metrics on (http://\S+/metrics)", err.read_text(errors="replace"))
            time.sleep(0.05)
        if m is None:
            raise RuntimeError("dnsguard did not report its metrics address")
        self._thread = threading.Thread(target=self._scrape, args=(m.group(1),), daemon=True)
        self._thread.start()

    def _scrape(self, url: str) -> None:
        import urllib.request

        while not self._stop.wait(1.0):
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    resp.read()
                self.scrapes += 1
            except OSError:
                self.scrape_errors += 1

    def stop_scraping(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def stop(self, err: Path) -> None:
        self.stop_scraping()
        if self.receiver is not None:
            self.procs.stop(self.receiver)
            log = (self.work / "fstrm_capture.log").read_text(errors="replace")
            m = re.search(r"wrote (\d+) frames", log)
            self.frames = int(m.group(1)) if m else None
            d = re.search(r"dnstap: (\d+) events dropped in all", err.read_text(errors="replace"))
            self.dropped = int(d.group(1)) if d else 0
            self.capture.unlink(missing_ok=True)

    def summary(self) -> str:
        parts = []
        if self.metrics:
            parts.append(f"{self.scrapes} scrapes of /metrics ({self.scrape_errors} failed)")
        if self.dnstap:
            parts.append(f"dnstap: fstrm_capture wrote {self.frames} frames; "
                         f"dnsguard dropped {self.dropped} events")
        return "; ".join(parts)
