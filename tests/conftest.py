"""Shared fixtures: a real dnsmasq upstream, the test nameserver, and dnsguard itself.

All traffic stays on loopback.  Every process started here is killed at teardown,
and every wait has a deadline.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:  # so `import helpers` works with or without tests/__init__.py
    sys.path.insert(0, str(TESTS_DIR))

from helpers import to_toml, wait_until  # noqa: E402
from nameserver import Nameserver  # noqa: E402

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
BARRIER_DOMAIN = "barrier.test"
BARRIER_ADDRESS = "127.0.0.9"

# The records every e2e test can rely on (name -> address), served by dnsmasq.  Public
# answers use the documentation ranges (192.0.2/24, 198.51.100/24, 203.0.113/24),
# which dnsguard's rebinding filter counts as public.
DEFAULT_HOST_RECORDS: dict[str, str] = {
    "allowed.test": "192.0.2.1",
    "denied.test": "192.0.2.66",
    "other.test": "192.0.2.2",
    "both.test": "192.0.2.3",
    "cache.test": "192.0.2.5",
    "audit.test": "192.0.2.7",
    # Private addresses: dnsguard strips these from answers (DNS rebinding) unless
    # [allow] cidrs covers them.
    "rebind.test": "10.0.0.1",
    "lan.test": ["192.168.1.10", "198.51.100.10"],
}
DEFAULT_ADDRESSES: dict[str, str] = {"example.test": "198.51.100.1", "corp.test": "198.51.100.2"}
DEFAULT_CNAMES: dict[str, str] = {"alias.test": "allowed.test"}
DEFAULT_TXT: dict[str, str] = {"txt.test": "hello from dnsmasq"}

LISTEN_RE = re.compile(r"dnsguard: listening on 127\.0\.0\.1:(\d+) \(udp\+tcp\)")
# dnsmasq logs names raw (spaces included) or as "<name unprintable>" (dots/NULs in labels).
QUERY_LOG_RE = re.compile(r"\bquery\[([A-Za-z0-9]+)\] (.*) from (\S+)$", re.MULTILINE)


def _free_port() -> int:
    """A port that is free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free UDP+TCP port on 127.0.0.1")


def _stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise
    return proc.returncode


# ---------------------------------------------------------------------- dnsmasq
class Dnsmasq:
    """A real dnsmasq on 127.0.0.1:PORT with local records and a query log."""

    def __init__(self, workdir: Path, *, host_records: Mapping[str, str | Sequence[str]],
                 addresses: Mapping[str, str], cnames: Mapping[str, str], txt_records: Mapping[str, str],
                 local_ttl: int, extra_args: Sequence[str]) -> None:
        self.workdir = workdir
        self.log_path = workdir / "dnsmasq.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._barrier_seq = itertools.count()
        args = [
            DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
            "--listen-address=127.0.0.1", "--log-queries", "--log-facility=-", "--pid-file=",
            "--conf-file=/dev/null", f"--local-ttl={local_ttl}",
            f"--address=/{BARRIER_DOMAIN}/{BARRIER_ADDRESS}",
        ]
        if os.geteuid() == 0:
            args.append("--user=root")
        for name, addrs in host_records.items():
            for addr in [addrs] if isinstance(addrs, str) else addrs:
                args.append(f"--host-record={name},{addr}")
        args += [f"--address=/{d}/{a}" for d, a in addresses.items()]
        args += [f"--cname={c},{t}" for c, t in cnames.items()]
        args += [f"--txt-record={n},{t}" for n, t in txt_records.items()]
        args += list(extra_args)
        self.base_args = args

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, attempts: int = 5) -> None:
        last = ""
        for _ in range(attempts):
            self.port = _free_port()
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen([*self.base_args, f"--port={self.port}"],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            try:
                wait_until(self._ready, 10.0, interval=0.05, what="dnsmasq to answer")
                return
            except TimeoutError:
                last = self.log_text()
                _stop_process(self.proc, signal.SIGKILL)
                if "Address already in use" not in last:
                    break
        raise RuntimeError(f"dnsmasq did not start:\n{last}")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise TimeoutError("dnsmasq exited")
        q = dns.message.make_query(f"ready.{BARRIER_DOMAIN}", "A")
        try:
            r = dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.2)
        except (TimeoutError, dns.exception.Timeout, OSError):
            return False
        return r.rcode() == dns.rcode.NOERROR

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGTERM)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def queries(self) -> list[tuple[str, str, str]]:
        """(qtype, name, source) for every query dnsmasq logged as received (barriers excluded)."""
        out = []
        for qtype, name, source in QUERY_LOG_RE.findall(self.log_text()):
            if name.lower().rstrip(".").endswith(BARRIER_DOMAIN):
                continue
            out.append((qtype, name, source))
        return out

    def queried_names(self) -> list[str]:
        """Names (lower-cased, no trailing dot) dnsmasq logged as received, in order."""
        return [name.lower().rstrip(".") for _, name, _ in self.queries()]

    def count(self, name: str, qtype: str | None = None) -> int:
        key = name.lower().rstrip(".")
        return sum(1 for t, n, _ in self.queries()
                   if n.lower().rstrip(".") == key and (qtype is None or t == qtype))

    def sync(self, timeout: float = 5.0) -> None:
        """Barrier: send a unique query straight to dnsmasq and wait until it is logged.

        dnsmasq's main process handles and logs UDP queries in arrival order, so once
        the barrier shows up every UDP query that arrived before it is in the log too.
        """
        name = f"sync-{next(self._barrier_seq)}.{BARRIER_DOMAIN}"
        q = dns.message.make_query(name, "A")
        dns.query.udp(q, "127.0.0.1", port=self.port, timeout=2.0)
        wait_until(lambda: name in self.log_text(), timeout, what=f"dnsmasq to log {name}")


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Callable[..., Dnsmasq]]:
    """Factory: `dnsmasq(host_records=..., addresses=..., cnames=..., txt_records=..., extra_args=...)`."""
    if not os.path.exists(DNSMASQ):
        pytest.fail("dnsmasq is not installed (apt-get install dnsmasq-base)")
    started: list[Dnsmasq] = []
    seq = itertools.count()

    def factory(*, host_records: Mapping[str, str | Sequence[str]] | None = None,
                addresses: Mapping[str, str] | None = None, cnames: Mapping[str, str] | None = None,
                txt_records: Mapping[str, str] | None = None, local_ttl: int = 300,
                extra_args: Sequence[str] = ()) -> Dnsmasq:
        workdir = tmp_path / f"dnsmasq-{next(seq)}"
        workdir.mkdir()
        d = Dnsmasq(workdir,
                    host_records=DEFAULT_HOST_RECORDS if host_records is None else host_records,
                    addresses=DEFAULT_ADDRESSES if addresses is None else addresses,
                    cnames=DEFAULT_CNAMES if cnames is None else cnames,
                    txt_records=DEFAULT_TXT if txt_records is None else txt_records,
                    local_ttl=local_ttl, extra_args=extra_args)
        started.append(d)
        d.start()
        return d

    yield factory
    for d in started:
        d.stop()


# ------------------------------------------------------------------- nameserver
@pytest.fixture
def nameserver() -> Iterator[Callable[..., Nameserver]]:
    """Factory: `nameserver(mode="answer", records={...})`, started; stopped at teardown."""
    started: list[Nameserver] = []

    def factory(mode: str = "answer", records: Mapping[str, Any] | None = None, **kw: Any) -> Nameserver:
        ns = Nameserver(mode, records, **kw)
        ns.start()
        started.append(ns)
        return ns

    yield factory
    for ns in started:
        ns.stop()


# --------------------------------------------------------------------- dnsguard
class Dnsguard:
    """A `python -m resolver serve` subprocess listening on 127.0.0.1:PORT."""

    def __init__(self, workdir: Path, policy_path: Path, args: Sequence[str]) -> None:
        self.workdir = workdir
        self.policy_path = policy_path
        self.args = list(args)
        self.stderr_path = workdir / "stderr.log"
        self.stdout_path = workdir / "stdout.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "resolver", "serve", "--policy", str(self.policy_path),
                "--listen", "127.0.0.1:0", *self.args]

    def start(self, timeout: float = 15.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         cwd=self.workdir, env=env)

        def listening() -> int | None:
            m = LISTEN_RE.search(self.stderr_text())
            if m:
                return int(m.group(1))
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsguard exited with {self.proc.returncode} before listening")
            return None

        try:
            self.port = wait_until(listening, timeout, interval=0.02, what="dnsguard's listening line")
        except (TimeoutError, RuntimeError) as exc:
            self.kill()
            pytest.fail(f"{exc}\ncommand: {' '.join(self.command())}\n--- stderr ---\n"
                        f"{self.stderr_text()[-4000:]}", pytrace=False)

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def query(self, name: str, rdtype: str = "A", tcp: bool = False, *, timeout: float = 3.0,
              source: str | None = None, **kw: Any) -> dns.message.Message:
        """Ask dnsguard; dnspython checks the reply's ID and question match the query."""
        q = dns.message.make_query(name, rdtype, **kw)
        if tcp:
            return dns.query.tcp(q, "127.0.0.1", port=self.port, timeout=timeout, source=source)
        return dns.query.udp(q, "127.0.0.1", port=self.port, timeout=timeout, source=source)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` and wait (with a deadline) for the exit code."""
        assert self.proc is not None
        return _stop_process(self.proc, sig, timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def dnsguard(tmp_path: Path) -> Iterator[Callable[..., Dnsguard]]:
    """Factory: `dnsguard(policy_dict_or_text, *extra_args)` -> a running Dnsguard.

    A dict policy gets its lookup-log database placed in the test's tmp_path.  At
    teardown every instance is stopped; a Python traceback on its stderr fails the test.
    """
    started: list[Dnsguard] = []
    seq = itertools.count()

    def factory(policy: Mapping[str, Any] | str, *args: str) -> Dnsguard:
        n = next(seq)
        workdir = tmp_path / f"dnsguard-{n}"
        workdir.mkdir()
        if not isinstance(policy, str):
            policy = {k: dict(v) if isinstance(v, Mapping) else v for k, v in policy.items()}
            policy.setdefault("log", {}).setdefault("database", str(workdir / "dnsguard.db"))
            text = to_toml(policy)
        else:
            text = policy
        policy_path = workdir / "policy.toml"
        policy_path.write_text(text)
        g = Dnsguard(workdir, policy_path, args)
        started.append(g)
        g.start()
        return g

    yield factory
    problems = []
    for g in started:
        if g.proc is None:
            continue
        try:
            _stop_process(g.proc, signal.SIGTERM, 10.0)
        except subprocess.TimeoutExpired:
            problems.append(f"dnsguard on port {g.port} ignored SIGTERM for 10 s (killed)")
        text = g.stderr_text()
        if "Traceback (most recent call last)" in text:
            problems.append(f"dnsguard on port {g.port} printed a traceback:\n{text[-4000:]}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
