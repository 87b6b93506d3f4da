"""Transports and lifecycle: UDP and TCP listeners around one Resolver.

Lifecycle (as uvicorn does it): ``start()`` binds everything or fails before
serving anything; ``serve_forever()`` waits for SIGTERM/SIGINT (SIGHUP reloads
the policy); ``stop()`` closes listeners, lets in-flight answers finish within
a deadline, then drains the lookup log.

TCP follows RFC 7766: 2-byte length framing, several queries per connection,
answered concurrently (a slow miss does not hold up a cached answer behind it).
Idle and half-sent connections are closed after ``tcp_idle_timeout``; at the
connection cap the longest-idle connection is closed to make room, so a pile
of idle or slow clients can never lock out a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from resolver.dns import wire
from resolver.dns.chain import Resolver
from resolver.policy.config import Config, HostPort

# dnstap sink: ("client", transport, client addr, local addr, query, answer or None, t_in, t_out),
# wall-clock times. It only enqueues; None when dnstap is off.
Tap = Callable[[tuple], None]


def _format_listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


UDP_RCVBUF = 8 * 1024 * 1024


# Linux's IP_FREEBIND / IPV6_FREEBIND (older Pythons do not name them).
_FREEBIND = {socket.AF_INET: (socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15)),
             socket.AF_INET6: (socket.IPPROTO_IPV6, getattr(socket, "IPV6_FREEBIND", 78))}


def _is_local(family: int, host: str) -> bool:
    """Whether ``host`` is an address of this host now (uvloop's bind error has no errno to ask)."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def _freebind_socket(family: int, type_: int, host: str, port: int) -> socket.socket:
    """A socket bound to an address this host does not have (yet)."""
    sock = socket.socket(family, type_)
    try:
        level, opt = _FREEBIND[family]
        sock.setsockopt(level, opt, 1)
        if type_ == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _grow_receive_buffer(sock: socket.socket | None) -> None:
    """Give bursts room: the default ~200 KiB holds only a few hundred small datagrams.

    A query dropped in the kernel is a lost lookup (and an unlogged one). Root may exceed
    net.core.rmem_max with SO_RCVBUFFORCE; otherwise the kernel caps SO_RCVBUF silently.
    """
    if sock is None:
        return
    for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if opt is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, UDP_RCVBUF)
            return
        except OSError:
            continue


class UdpProtocol(asyncio.DatagramProtocol):
    __slots__ = ("handle", "transport", "sendto", "tap", "local")

    def __init__(self, resolver: Resolver, tap: Tap | None = None) -> None:
        self.handle = resolver.handle
        self.tap = tap
        self.local: tuple = ()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sendto = transport.sendto  # type: ignore[attr-defined]
        self.local = transport.get_extra_info("sockname") or ()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.tap is not None:  # dnstap on: the whole cost when off is this check
            self._tapped(data, addr)
            return
        r = self.handle(data, addr[0], "udp")
        if r is None:
            return
        if r.__class__ is bytes:
            self.sendto(r, addr)
            return
        r.then(self._answer, addr)  # a miss: answered when upstream has

    def _answer(self, resp: bytes | None, addr: tuple) -> None:
        if resp is not None and self.transport is not None and not self.transport.is_closing():
            self.sendto(resp, addr)

    def _tapped(self, data: bytes, addr: tuple) -> None:
        t_in = time.time()
        r = self.handle(data, addr[0], "udp")
        if r is None or r.__class__ is bytes:
            if r is not None:
                self.sendto(r, addr)
            self.tap(("client", "udp", addr, self.local, data, r, t_in, time.time()))  # type: ignore[misc]
            return
        r.then(self._tapped_answer, (addr, data, t_in))

    def _tapped_answer(self, resp: bytes | None, arg: tuple) -> None:
        addr, data, t_in = arg
        self._answer(resp, addr)
        self.tap(("client", "udp", addr, self.local, data, resp, t_in, time.time()))  # type: ignore[misc]

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (client went away): nothing to do, keep serving.
        pass


class TcpProtocol(asyncio.Protocol):
    """One client connection: frames in, answers out (possibly out of order).

    Backpressure: a client that pipelines queries and never reads its answers
    would make the write buffer grow without bound, so reading stops while the
    kernel and transport hold more than WRITE_HIGH bytes, or while
    MAX_PENDING queries of this connection wait for upstream.
    """

    WRITE_HIGH = 256 * 1024
    MAX_PENDING = 64

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.handle = server.resolver.handle
        self.tap = server.tap
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_addr: tuple = ()
        self.local: tuple = ()
        self.last_active = time.monotonic()
        self.partial_since: float | None = None  # when the frame still being received began
        self.pending = 0
        self._write_paused = False
        self._read_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=self.WRITE_HIGH)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "?"
        self.peer_addr = peer or ()
        self.local = transport.get_extra_info("sockname") or ()
        self.server.tcp_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.tcp_closed(self)
        self.transport = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        stop = self._write_paused or self.pending >= self.MAX_PENDING
        if stop and not self._read_paused:
            t.pause_reading()
            self._read_paused = True
        elif not stop and self._read_paused:
            t.resume_reading()
            self._read_paused = False

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_active = now
        buf = self.buf
        buf += data
        for msg in wire.tcp_frames(buf):
            t_in = time.time() if self.tap is not None else 0.0
            r = self.handle(msg, self.peer, "tcp")
            if r is None or r.__class__ is bytes:
                if r is not None:
                    self._send(r)
                if t_in:
                    self.tap(("client", "tcp", self.peer_addr, self.local, msg, r, t_in,  # type: ignore[misc]
                              time.time()))
            else:
                self.pending += 1
                r.then(self._answered, (msg, t_in))
        # A frame trickled in a byte at a time must not keep the connection alive forever:
        # the idle deadline of a partial frame runs from its first byte.
        if buf:
            if self.partial_since is None:
                self.partial_since = now
        else:
            self.partial_since = None
        self._update_reading()

    def _answered(self, resp: bytes | None, arg: tuple) -> None:
        msg, t_in = arg
        try:
            if resp is not None:
                self._send(resp)
            if t_in:
                self.tap(("client", "tcp", self.peer_addr, self.local, msg, resp, t_in,  # type: ignore[misc]
                          time.time()))
        finally:
            self.pending -= 1
            self.last_active = time.monotonic()
            self._update_reading()

    def _send(self, resp: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(resp).to_bytes(2, "big") + resp)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def idle_since(self) -> float:
        return self.partial_since if self.partial_since is not None else self.last_active


class DnsServer:
    """Owns the listeners, the resolver, and the background tasks."""

    def __init__(self, config: Config, resolver: Resolver, *, announce: Callable[[str], None] | None = None,
                 on_reload: Callable[[], None] | None = None, tap: Tap | None = None,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_stop = on_stop
        self.resolver = resolver
        self.tap = tap
        self.announce = announce or (lambda line: print(line, file=sys.stderr, flush=True))
        self.on_reload = on_reload
        self.udp_transports: list[asyncio.DatagramTransport] = []
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.tcp_conns: set[TcpProtocol] = set()
        self.bound: list[HostPort] = []
        self._stop = asyncio.Event()
        self._sweeper: asyncio.Task | None = None

    # -- connections --------------------------------------------------------------------

    def tcp_opened(self, conn: TcpProtocol) -> None:
        self.tcp_conns.add(conn)
        if len(self.tcp_conns) > self.config.server.tcp_max_connections:
            # Make room by closing the connection that has been quiet the longest.
            idle = [c for c in self.tcp_conns if c is not conn and not c.pending] or \
                   [c for c in self.tcp_conns if c is not conn]
            victim = min(idle, key=lambda c: c.idle_since())
            victim.close()

    def tcp_closed(self, conn: TcpProtocol) -> None:
        self.tcp_conns.discard(conn)

    async def _sweep(self) -> None:
        while True:
            idle = self.config.server.tcp_idle_timeout  # read each turn: a reload may change it
            await asyncio.sleep(min(1.0, idle / 4))
            self.resolver.tick()
            cutoff = time.monotonic() - idle
            for conn in [c for c in self.tcp_conns if c.idle_since() < cutoff and not c.pending]:
                conn.close()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.config.server.listen:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            freebind = not _is_local(family, host)
            if freebind:
                # Not an address of this host (yet): a Docker bridge's gateway before `compose
                # up` made the network. Bind anyway and answer once it appears, rather than fail
                # and be restarted by systemd until then; say so (a typo shows up here too).
                self.announce(f"dnsguard: {host} is not an address of this host yet; listening "
                              f"on it anyway (IP_FREEBIND): queries arrive once it is configured")
            for attempt in range(20):
                udp_t = tcp_s = None
                try:
                    where: dict[str, Any] = (
                        {"sock": _freebind_socket(family, socket.SOCK_DGRAM, host, port)} if freebind
                        else {"local_addr": (host, port), "family": family})
                    udp_t, _ = await loop.create_datagram_endpoint(
                        lambda: UdpProtocol(self.resolver, self.tap), **where)
                    real_port = udp_t.get_extra_info("sockname")[1]
                    _grow_receive_buffer(udp_t.get_extra_info("socket"))
                    where = ({"sock": _freebind_socket(family, socket.SOCK_STREAM, host, real_port)}
                             if freebind else {"host": host, "port": real_port, "reuse_address": True})
                    tcp_s = await loop.create_server(lambda: TcpProtocol(self), backlog=1024, **where)
                except OSError:
                    if udp_t is not None:
                        udp_t.close()
                    # Port 0: the kernel's UDP choice may be taken for TCP; pick again.
                    if port == 0 and attempt < 19:
                        continue
                    await self.stop()
                    raise
                self.udp_transports.append(udp_t)  # type: ignore[arg-type]
                self.tcp_servers.append(tcp_s)
                self.bound.append((host, real_port))
                break
        self._sweeper = loop.create_task(self._sweep())
        for host, port in self.bound:
            self.announce(f"dnsguard: listening on {_format_listen(host, port)} (udp+tcp)")

    def request_stop(self) -> None:
        if not self._stop.is_set() and self.on_stop is not None:
            self.on_stop()
        self._stop.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        if self.on_reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self.on_reload)
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            await self.stop()

    async def stop(self, grace: float | None = None) -> None:
        # In-flight misses finish within the upstream timeout (then they answer SERVFAIL):
        # waiting that long means no query is cut off unanswered and unlogged.
        if grace is None:
            grace = self.resolver.config.upstream.timeout + 1.0
        for s in self.tcp_servers:
            s.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        # In-flight misses get a bounded moment to finish and be sent; stragglers are cut off
        # (and logged as such) before the lookup log is closed behind them.
        await self.resolver.drain(grace)
        self.resolver.cancel_pending()
        for t in self.udp_transports:
            t.close()
        for conn in list(self.tcp_conns):
            conn.close()
        for s in self.tcp_servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1.0)
        self.udp_transports.clear()
        self.tcp_servers.clear()
