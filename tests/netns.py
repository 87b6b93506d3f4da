"""Network-namespace topology for the firewall tests.

    agent  (192.0.2.2, 2001:db8:a::2)
      | a0 -- r0
    router (192.0.2.1 / 198.51.100.1, 2001:db8:a::1 / 2001:db8:b::1): forwards; holds the
      | r1 -- i0                                                     dnsguard rules and sets
    internet (198.51.100.2, 2001:db8:b::2; "servers" on lo: 203.0.113.10-12, 203.0.113.53,
              2001:db8:c::10-11)

Only TEST-NET / documentation addresses and loopback. Nothing here touches the
root namespace: every command runs under `ip netns exec <ours>` (links are
created from inside the router namespace straight into their peers), and
every socket the test process uses is created inside one of our namespaces
(`resolver.fence.netlink.open_socket(..., netns=...)`). Namespaces are named
``dnsguard-test-<pid>-<n>-<role>``; `cleanup_stale()` removes those whose pid
is gone, `Topology.destroy()` removes ours (call it from a finalizer).
"""

from __future__ import annotations

import itertools
import os
import re
import selectors
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence

from helpers import wait_until  # noqa: F401  (one poller for all tests; re-exported for the netns suite)

from resolver.fence.ipsets import open_socket

PREFIX = "dnsguard-test-"
_counter = itertools.count(1)

AGENT4, AGENT6 = "192.0.2.2", "2001:db8:a::2"
ROUTER_IN4, ROUTER_IN6 = "192.0.2.1", "2001:db8:a::1"
ROUTER_OUT4, ROUTER_OUT6 = "198.51.100.1", "2001:db8:b::1"
INET4, INET6 = "198.51.100.2", "2001:db8:b::2"
SERVER4 = ["203.0.113.10", "203.0.113.11", "203.0.113.12"]
SERVER6 = ["2001:db8:c::10", "2001:db8:c::11"]
DNS4 = "203.0.113.53"
AGENT_NET4, AGENT_NET6 = "192.0.2.0/24", "2001:db8:a::/64"


def sh(argv: Sequence[str], check: bool = True, timeout: float = 20.0,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                          input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why the netns suite cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, ipset)"
    for tool in ("ip", "iptables", "ip6tables", "iptables-restore", "iptables-save", "setpriv", "bash"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    name = f"{PREFIX}{os.getpid()}-probe"
    proc = sh(["ip", "netns", "add", name], check=False)
    if proc.returncode != 0:
        return f"cannot create network namespaces: {proc.stderr.strip()}"
    try:
        for cmd in (["iptables", "-S"], ["ip6tables", "-S"]):
            p = sh(["ip", "netns", "exec", name, *cmd], check=False)
            if p.returncode != 0:
                return f"{cmd[0]} does not work in a namespace: {p.stderr.strip()}"
    finally:
        sh(["ip", "netns", "del", name], check=False)
    return None


def list_ours() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def cleanup_stale() -> None:
    """Delete dnsguard-test namespaces left by test runs whose process is gone."""
    for name in list_ours():
        m = re.match(rf"{re.escape(PREFIX)}(\d+)-", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            sh(["ip", "netns", "del", name], check=False)


def fresh_topology() -> Iterator[Topology]:
    """Body of a module-scoped fixture: our three namespaces, created and always destroyed.
    As root the suite must run, so a missing tool or capability fails rather than skips."""
    reason = unavailable()
    if reason:
        import pytest

        pytest.fail(f"network namespaces are required: {reason}")
    cleanup_stale()
    t = Topology().create()
    try:
        yield t
    finally:
        t.destroy()


class Topology:
    def __init__(self) -> None:
        base = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.agent = f"{base}-agent"
        self.router = f"{base}-router"
        self.internet = f"{base}-inet"
        self.procs: list[subprocess.Popen] = []

    @property
    def names(self) -> list[str]:
        return [self.agent, self.router, self.internet]

    def ns(self, name: str, *argv: str, check: bool = True, timeout: float = 20.0,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
        assert name in self.names, name  # never anything outside our namespaces
        return sh(["ip", "netns", "exec", name, *argv], check=check, timeout=timeout, input=input)

    def create(self) -> Topology:
        for name in self.names:
            sh(["ip", "netns", "add", name])
        try:
            self._wire()
        except BaseException:
            self.destroy()
            raise
        return self

    def _wire(self) -> None:
        a, r, i = self.agent, self.router, self.internet
        for name in self.names:
            self.ns(name, "ip", "link", "set", "lo", "up")
        # created inside the router namespace, peers moved straight into theirs
        self.ns(r, "ip", "link", "add", "r0", "type", "veth", "peer", "name", "a0", "netns", a)
        self.ns(r, "ip", "link", "add", "r1", "type", "veth", "peer", "name", "i0", "netns", i)
        self.ns(r, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        plan = [
            (a, "a0", [f"{AGENT4}/24", f"{AGENT6}/64"]),
            (r, "r0", [f"{ROUTER_IN4}/24", f"{ROUTER_IN6}/64"]),
            (r, "r1", [f"{ROUTER_OUT4}/24", f"{ROUTER_OUT6}/64"]),
            (i, "i0", [f"{INET4}/24", f"{INET6}/64"]),
        ]
        for ns, dev, addrs in plan:
            for addr in addrs:
                extra = ["nodad"] if ":" in addr else []
                self.ns(ns, "ip", "addr", "add", addr, "dev", dev, *extra)
            self.ns(ns, "ip", "link", "set", dev, "up")
        for addr in [*SERVER4, DNS4]:
            self.ns(i, "ip", "addr", "add", f"{addr}/32", "dev", "lo")
        for addr in SERVER6:
            self.ns(i, "ip", "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
        self.ns(a, "ip", "route", "add", "default", "via", ROUTER_IN4)
        self.ns(a, "ip", "-6", "route", "add", "default", "via", ROUTER_IN6)
        self.ns(r, "ip", "route", "add", "default", "via", INET4)
        self.ns(r, "ip", "-6", "route", "add", "default", "via", INET6)
        self.ns(i, "ip", "route", "add", AGENT_NET4, "via", ROUTER_OUT4)
        self.ns(i, "ip", "-6", "route", "add", AGENT_NET6, "via", ROUTER_OUT6)

    def spawn(self, name: str, *argv: str, **kw: object) -> subprocess.Popen:
        assert name in self.names, name
        proc = subprocess.Popen(["ip", "netns", "exec", name, *argv], **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def destroy(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        self.procs.clear()
        for name in self.names:
            sh(["ip", "netns", "del", name], check=False)

    # -- sockets inside a namespace
    def socket(self, name: str, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM
               ) -> socket.socket:
        assert name in self.names, name
        return open_socket(family, type_, netns=name)

    def tcp_connect(self, name: str, host: str, port: int, timeout: float = 3.0) -> str:
        """'ok' (connected and echoed), 'refused', 'unreachable' or 'timeout'."""
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with self.socket(name, fam, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect((host, port))
                s.sendall(b"ping")
                return "ok" if s.recv(16) == b"ping" else "closed"
            except ConnectionRefusedError:
                return "refused"
            except OSError as exc:
                if isinstance(exc, TimeoutError) or exc.errno is None:
                    return "timeout"
                return "unreachable"

    def udp_exchange(self, name: str, host: str, port: int, payload: bytes = b"ping",
                     timeout: float = 3.0) -> tuple[str, bytes]:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with self.socket(name, fam, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect((host, port))
            try:
                s.send(payload)
                return "ok", s.recv(4096)
            except ConnectionRefusedError:
                return "refused", b""
            except TimeoutError:
                return "timeout", b""
            except OSError:
                return "unreachable", b""

    def run_as(self, name: str, uid: int, script: str, timeout: float = 10.0
               ) -> subprocess.CompletedProcess[str]:
        """Run a bash script as `uid` (no supplementary groups) inside namespace `name`."""
        return self.ns(name, "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                       "bash", "-c", script, check=False, timeout=timeout)


class Servers:
    """TCP and UDP echo servers on given (netns, address, port) endpoints, one thread."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.sel = selectors.DefaultSelector()
        self.listeners: list[socket.socket] = []
        self.seen: list[tuple[str, str, tuple]] = []  # (proto, local "addr:port", peer)
        self._stop_r, self._stop_w = os.pipe()
        self.sel.register(self._stop_r, selectors.EVENT_READ, ("stop", None))
        self._thread = threading.Thread(target=self._loop, daemon=True, name="test-servers")
        self._conns: set[socket.socket] = set()

    def tcp(self, ns: str, host: str, port: int) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = self.topo.socket(ns, fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(64)
        s.setblocking(False)
        self.listeners.append(s)
        self.sel.register(s, selectors.EVENT_READ, ("accept", f"{host}:{port}"))

    def udp(self, ns: str, host: str, port: int) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = self.topo.socket(ns, fam, socket.SOCK_DGRAM)
        s.bind((host, port))
        s.setblocking(False)
        self.listeners.append(s)
        self.sel.register(s, selectors.EVENT_READ, ("udp", f"{host}:{port}"))

    def start(self) -> Servers:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            for key, _ in self.sel.select():
                kind, where = key.data
                if kind == "stop":
                    return
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if kind == "accept":
                        conn, peer = sock.accept()
                        conn.setblocking(False)
                        self.seen.append(("tcp", where, peer))
                        self._conns.add(conn)
                        self.sel.register(conn, selectors.EVENT_READ, ("conn", where))
                    elif kind == "udp":
                        data, peer = sock.recvfrom(4096)
                        self.seen.append(("udp", where, peer))
                        sock.sendto(data, peer)
                    else:
                        data = sock.recv(4096)
                        if not data:
                            raise ConnectionResetError
                        sock.sendall(data)
                except BlockingIOError:
                    continue
                except OSError:
                    if kind == "conn":
                        self.sel.unregister(sock)
                        self._conns.discard(sock)
                        sock.close()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for s in [*self.listeners, *self._conns]:
            s.close()
        self.sel.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
