"""sd_notify with a real NOTIFY_SOCKET: what systemd sees from a `Type=notify` dnsguard."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import dns.rcode
import pytest
from helpers import make_policy, wait_until

from resolver.core.notify import Notifier


class NotifySocket:
    """The receiving end systemd would hold: a bound AF_UNIX datagram socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def wait_for(self, key: str, value: str = "1", after: int = 0, timeout: float = 10.0) -> int:
        """Index of the first message at or after `after` carrying key=value."""
        def found() -> int | None:
            msgs = self.drain()
            for i in range(after, len(msgs)):
                if msgs[i].get(key) == value:
                    return i + 1  # +1: index 0 must be truthy for wait_until
            return None
        return wait_until(found, timeout, what=f"{key}={value} on NOTIFY_SOCKET") - 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
    yield ns
    ns.close()


def test_ready_reload_watchdog_stopping(dnsguard, dnsmasq, notify_socket, monkeypatch):
    up = dnsmasq()
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2s: a ping every 0.1 s
    g = dnsguard(make_policy([up.addr], allow=["allowed.test"]))
    ready = notify_socket.wait_for("READY")
    # READY=1 means answering: a query right after it is served.
    assert g.query("denied.test").rcode() == dns.rcode.NXDOMAIN
    assert f"127.0.0.1:{g.port}" in notify_socket.messages[ready]["STATUS"]
    assert not any("RELOADING" in m or "STOPPING" in m for m in notify_socket.messages[:ready + 1])

    # The watchdog keeps pinging from the event loop while the server runs.
    first = notify_socket.wait_for("WATCHDOG")
    notify_socket.wait_for("WATCHDOG", after=first + 1)

    before_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    mark = len(notify_socket.drain())
    g.proc.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait_for("RELOADING", after=mark)
    msg = notify_socket.messages[reloading]
    # MONOTONIC_USEC is CLOCK_MONOTONIC at the reload (systemd >= 253 matches reloads by it).
    after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before_ns // 1000 <= int(msg["MONOTONIC_USEC"]) <= after_us
    again = notify_socket.wait_for("READY", after=reloading)
    assert again > reloading
    wait_until(lambda: "policy reloaded" in g.stderr_text(), 5, what="the reload line")

    mark = len(notify_socket.drain())
    assert g.stop() == 0
    stopping = notify_socket.wait_for("STOPPING", after=mark, timeout=2)
    assert not any(m.get("READY") for m in notify_socket.drain()[stopping:])


def test_rejected_reload_still_says_ready(dnsguard, dnsmasq, notify_socket):
    up = dnsmasq()
    g = dnsguard(make_policy([up.addr], allow=["allowed.test"]))
    notify_socket.wait_for("READY")
    mark = len(notify_socket.drain())
    g.policy_path.write_text(g.policy_path.read_text() + "\n[allow\n")
    g.proc.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait_for("RELOADING", after=mark)
    notify_socket.wait_for("READY", after=reloading)  # else `systemctl reload` would hang
    wait_until(lambda: "rejected" in g.stderr_text(), 5, what="the rejection line")
    assert g.query("denied.test").rcode() == dns.rcode.NXDOMAIN
    # No watchdog configured: no pings.
    assert not any("WATCHDOG" in m for m in notify_socket.drain())


def test_notifier_abstract_socket_and_no_socket(tmp_path):
    name = f"dnsguard-test-notify-{os.getpid()}"
    recv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    recv.bind("\0" + name)
    recv.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_interval == 1.5
        assert n.ready("ok")
        assert recv.recv(100) == b"READY=1\nSTATUS=ok"
        n.close()
    finally:
        recv.close()
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready() and quiet.watchdog_interval is None
    # A watchdog meant for another process is not ours to feed.
    other = str(os.getpid() + 1)
    foreign = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": other})
    assert foreign.watchdog_interval is None
    # systemd went away: sending fails quietly.
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert gone.enabled and not gone.ready()
    gone.close()
