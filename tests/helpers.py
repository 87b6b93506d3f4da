"""Small helpers shared by the end-to-end and robustness tests.

Everything here talks to loopback only, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import dns.message
import dns.rdatatype

T = TypeVar("T")

LOOPBACK_CLIENTS = ["127.0.0.0/8", "::1/128"]


# --------------------------------------------------------------------- waiting
def _poll(predicate: Callable[[], T], deadline: float, timeout: float, what: str) -> T | None:
    """One look: the truthy value, None to look again, TimeoutError once past ``deadline``."""
    value = predicate()
    if value:
        return value
    if time.monotonic() >= deadline:
        raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
    return None


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.02,
               what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (value := _poll(predicate, deadline, timeout, what)) is None:
        time.sleep(interval)
    return value


async def async_wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.01,
                           what: str = "condition") -> T:
    """`wait_until` for a test running in the event loop: the loop keeps running meanwhile."""
    deadline = time.monotonic() + timeout
    while (value := _poll(predicate, deadline, timeout, what)) is None:
        await asyncio.sleep(interval)
    return value


# ------------------------------------------------------------------------ TOML
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """A tiny TOML writer: top-level scalars, then one level of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for key, table in data.items():
        if isinstance(table, Mapping):
            lines.append("")
            lines.append(f"[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def make_policy(upstreams: Sequence[str], *, allow: Sequence[str] = (), deny: Sequence[str] = (),
                cidrs: Sequence[str] = (), mode: str | None = None, timeout_ms: int = 1500,
                **sections: Mapping[str, Any]) -> dict[str, Any]:
    """A policy dict for tests. `sections` are merged over the defaults, table by table."""
    policy: dict[str, Any] = {}
    if mode is not None:
        policy["mode"] = mode
    policy["server"] = {"clients": list(LOOPBACK_CLIENTS)}
    policy["upstream"] = {"servers": list(upstreams), "timeout_ms": timeout_ms}
    policy["allow"] = {"domains": list(allow), "cidrs": list(cidrs)}
    policy["deny"] = {"domains": list(deny)}
    for name, table in sections.items():
        policy.setdefault(name, {}).update(table)
    return policy


# ------------------------------------------------------------------- raw wire
def frame(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def udp_exchange(wire: bytes, port: int, *, host: str = "127.0.0.1", timeout: float = 3.0,
                 source: str | None = None) -> bytes | None:
    """Send one datagram; return the first reply, or None if none came within `timeout`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if source is not None:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(wire, (host, port))
        try:
            data, _ = s.recvfrom(65535)
        except TimeoutError:
            return None
        return data


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Read exactly n bytes before `deadline` (monotonic); raise EOFError on close."""
    buf = b""
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"got {len(buf)} of {n} bytes before the deadline")
        sock.settimeout(remaining)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_frame(sock: socket.socket, timeout: float = 3.0) -> bytes:
    deadline = time.monotonic() + timeout
    (length,) = struct.unpack("!H", recv_exact(sock, 2, deadline))
    return recv_exact(sock, length, deadline)


@contextlib.contextmanager
def tcp_connect(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> Iterator[socket.socket]:
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def tcp_exchange(wire: bytes, port: int, timeout: float = 3.0) -> bytes:
    with tcp_connect(port, timeout=timeout) as s:
        s.sendall(frame(wire))
        return recv_frame(s, timeout)


def wait_closed(sock: socket.socket, timeout: float) -> float | None:
    """Wait for the peer to close `sock`; return seconds it took, or None on timeout.

    Any data that arrives meanwhile is read and discarded.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65535)
        except TimeoutError:
            return None
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        if not chunk:
            return time.monotonic() - start


# --------------------------------------------------------------------- answers
def addresses(msg: dns.message.Message, rdtype: str = "A") -> set[str]:
    t = dns.rdatatype.from_text(rdtype)
    return {rd.to_text() for rrset in msg.answer if rrset.rdtype == t for rd in rrset}


def question_bytes(wire: bytes) -> bytes:
    """The raw question section of a message with QDCOUNT=1 and an uncompressed qname."""
    i = 12
    for _ in range(128):
        n = wire[i]
        i += 1
        if n == 0:
            break
        i += n
    return wire[12:i + 4]


def write_log(path: str, fixture: Sequence[tuple[tuple, int]]) -> None:
    """Write ``(record, times)`` pairs through a real QueryLog writer and wait for it to finish."""
    from resolver.log.querylog import QueryLog

    log = QueryLog(path, retention_days=None)
    log.start()
    for record, n in fixture:
        for _ in range(n):
            log.submit(record)
    assert log.close()
