"""A small, real DNS server for tests (in the spirit of dnspython's nanonameserver).

It binds UDP and TCP on 127.0.0.1 with one shared port *before* its thread starts,
so `.port` / `.addr` are usable as soon as the context manager is entered.  It
serves from one thread (a selector loop), counts what it receives per transport,
and misbehaves on request:

    answer    answer from `records`; unknown names get NXDOMAIN
    blackhole read every query, never answer (TCP connections are kept open)
    servfail  answer SERVFAIL
    truncate  UDP: TC=1 with an empty answer; TCP: the complete answer
    poison    the real answer plus an A record for an unrelated owner in the answer
              section and an A record in the additional section
    wrong_id  first a spoofed answer (POISON_ADDRESS) with a mismatched ID, then the
              real answer with the right ID (UDP); over TCP only the real answer
    custom    whatever `responder(query_wire, transport)` returns (a list of raw replies):
              for hostile replies a real server would never send

Every loop here is bounded: the serving loop wakes at least every 0.2 s and exits
when `stop()` sets the flag; `stop()` waits for the thread with a deadline.
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

MODES = ("answer", "blackhole", "servfail", "truncate", "poison", "wrong_id", "custom")

POISON_OWNER = "evil.poison.test."
POISON_ADDRESS = "6.6.6.6"
POISON_ADDITIONAL_OWNER = "ns.poison.test."
POISON_ADDITIONAL_ADDRESS = "6.6.6.7"

# Records as {owner: {rdtype: [rdata text, ...]}} (a bare string value means one rdata).
Records = Mapping[str, Mapping[str, "str | Iterable[str]"]]


def big_a_rrset_records(owner: str, count: int = 300, ttl: int = 300) -> dict[str, dict[str, list[str]]]:
    """An A RRset too large for any UDP payload size: `count` (<= 768) distinct addresses.

    They come from the documentation ranges, which dnsguard's DNS-rebinding filter
    treats as public (private ranges would be stripped from answers).
    """
    nets = ("192.0.2", "198.51.100", "203.0.113")
    if not 0 < count <= 256 * len(nets):
        raise ValueError("count must be 1..768")
    addrs = [f"{nets[i // 256]}.{i % 256}" for i in range(count)]
    return {owner: {"A": addrs, "_ttl": [str(ttl)]}}


def _bind_pair(host: str, attempts: int = 50) -> tuple[socket.socket, socket.socket, int]:
    """Bind UDP on port 0, then TCP on the same port; retry when TCP's port is taken."""
    last: OSError | None = None
    for _ in range(attempts):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
            tcp.listen(64)
        except OSError as exc:
            udp.close()
            tcp.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            last = exc
            continue
        return udp, tcp, port
    raise RuntimeError(f"could not bind UDP+TCP on one port after {attempts} attempts: {last}")


class _Conn:
    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""


class Nameserver:
    """A threaded test DNS server on 127.0.0.1 (UDP and TCP, one port)."""

    def __init__(self, mode: str = "answer", records: Records | None = None, *,
                 ttl: int = 300, host: str = "127.0.0.1",
                 responder: Callable[[bytes, str], list[bytes]] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if (mode == "custom") != (responder is not None):
            raise ValueError("mode 'custom' needs a responder (and only it takes one)")
        self.mode = mode
        self.responder = responder
        self.host = host
        self.default_ttl = ttl
        self._rrsets: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        for owner, bytype in (records or {}).items():
            self.add_records(owner, bytype)
        self.udp_count = 0
        self.tcp_count = 0
        self.tcp_connections = 0
        self._names: dict[str, Counter[str]] = {"udp": Counter(), "tcp": Counter()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._conns: dict[int, _Conn] = {}
        self.port = 0
        self.errors: list[BaseException] = []

    # ---------------------------------------------------------------- records
    def add_records(self, owner: str, bytype: Mapping[str, str | Iterable[str]]) -> None:
        name = dns.name.from_text(owner)
        ttl = self.default_ttl
        if "_ttl" in bytype:
            t = bytype["_ttl"]
            ttl = int(t if isinstance(t, str) else next(iter(t)))
        slot = self._rrsets.setdefault(name, {})
        for rdtype_text, values in bytype.items():
            if rdtype_text == "_ttl":
                continue
            rdatas = [values] if isinstance(values, str) else list(values)
            rrset = dns.rrset.from_text_list(name, ttl, dns.rdataclass.IN, rdtype_text, rdatas)
            slot[rrset.rdtype] = rrset

    # -------------------------------------------------------------- lifecycle
    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> Nameserver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._udp, self._tcp, self.port = _bind_pair(self.host)
        self._udp.setblocking(False)
        self._tcp.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._serve, name=f"nameserver-{self.port}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        try:
            assert self._wake_w is not None
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        self._thread = None
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        for s in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        if alive:
            raise RuntimeError("nameserver thread did not stop within the deadline")

    # --------------------------------------------------------------- counters
    def count(self, transport: str | None = None) -> int:
        with self._lock:
            if transport == "udp":
                return self.udp_count
            if transport == "tcp":
                return self.tcp_count
            return self.udp_count + self.tcp_count

    def queries_for(self, name: str, transport: str | None = None) -> int:
        key = name.lower().rstrip(".") + "."
        with self._lock:
            if transport is None:
                return self._names["udp"][key] + self._names["tcp"][key]
            return self._names[transport][key]

    def wait_for_count(self, n: int, transport: str | None = None, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(transport) >= n:
                return True
            time.sleep(0.01)
        return self.count(transport) >= n

    # ------------------------------------------------------------- the server
    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        assert self._udp is not None and self._tcp is not None and self._wake_r is not None
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    if self._stop.is_set():
                        break
                    try:
                        self._on_ready(sel, key)
                    except Exception as exc:  # keep serving; tests can inspect .errors
                        self.errors.append(exc)
        finally:
            sel.close()

    def _on_ready(self, sel: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        what = key.data
        if what == "wake":
            return
        if what == "udp":
            assert self._udp is not None
            for _ in range(64):  # drain a bounded batch
                try:
                    wire, peer = self._udp.recvfrom(65535)
                except BlockingIOError:
                    return
                for reply in self._handle(wire, "udp"):
                    self._udp.sendto(reply, peer)
            return
        if what == "listen":
            assert self._tcp is not None
            try:
                sock, _ = self._tcp.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            with self._lock:
                self.tcp_connections += 1
            self._conns[sock.fileno()] = _Conn(sock)
            sel.register(sock, selectors.EVENT_READ, "conn")
            return
        conn = self._conns[key.fd]
        try:
            data = conn.sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            sel.unregister(conn.sock)
            del self._conns[key.fd]
            conn.sock.close()
            return
        conn.buf += data
        for _ in range(1000):
            if len(conn.buf) < 2:
                break
            (length,) = struct.unpack("!H", conn.buf[:2])
            if len(conn.buf) < 2 + length:
                break
            wire, conn.buf = conn.buf[2:2 + length], conn.buf[2 + length:]
            for reply in self._handle(wire, "tcp"):
                conn.sock.settimeout(2.0)
                try:
                    conn.sock.sendall(struct.pack("!H", len(reply)) + reply)
                finally:
                    conn.sock.setblocking(False)

    def _handle(self, wire: bytes, transport: str) -> list[bytes]:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            with self._lock:
                if transport == "udp":
                    self.udp_count += 1
                else:
                    self.tcp_count += 1
            return []
        with self._lock:
            if transport == "udp":
                self.udp_count += 1
            else:
                self.tcp_count += 1
            for q in query.question:
                self._names[transport][q.name.to_text().lower()] += 1
        if query.flags & dns.flags.QR:
            return []
        mode = self.mode
        if mode == "custom":
            assert self.responder is not None
            return self.responder(wire, transport)
        if mode == "blackhole":
            return []
        response = dns.message.make_response(query)
        if mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return [response.to_wire()]
        if mode == "truncate" and transport == "udp":
            response.flags |= dns.flags.TC
            return [response.to_wire()]
        self._fill(query, response)
        if mode == "poison":
            poison = dns.rrset.from_text(POISON_OWNER, 300, "IN", "A", POISON_ADDRESS)
            response.answer.append(poison)
            response.additional.append(
                dns.rrset.from_text(POISON_ADDITIONAL_OWNER, 300, "IN", "A", POISON_ADDITIONAL_ADDRESS))
        out = []
        if mode == "wrong_id" and transport == "udp":
            spoof = dns.message.make_response(query)
            spoof.id = (query.id ^ 0x5A5A) or 1
            if query.question:
                q = query.question[0]
                spoof.answer.append(dns.rrset.from_text(q.name, 300, "IN", "A", POISON_ADDRESS))
            out.append(spoof.to_wire())
        # Size limits: over TCP anything goes; over UDP we keep it simple and let
        # dnspython raise if a (non-truncate-mode) answer would be too big.
        out.append(response.to_wire(max_size=65535))
        return out

    def _fill(self, query: dns.message.Message, response: dns.message.Message) -> None:
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return
        q = query.question[0]
        byname = self._rrsets.get(q.name)
        if byname is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return
        response.flags |= dns.flags.AA
        cname = byname.get(dns.rdatatype.CNAME)
        if cname is not None and q.rdtype != dns.rdatatype.CNAME:
            response.answer.append(cname)
            target = self._rrsets.get(cname[0].target, {}).get(q.rdtype)
            if target is not None:
                response.answer.append(target)
            return
        rrset = byname.get(q.rdtype)
        if rrset is not None:
            response.answer.append(rrset)
