"""Record the connection attempts the fence blocked (or, in audit, would block).

The rules made by `resolver.firewall` send every rejected packet (rate
limited) to an NFLOG group before rejecting it, with the prefix
``dnsguard:blocked`` (or ``dnsguard:would-block`` under ``apply --audit``).
`NflogRecorder` binds that group over netlink (NETLINK_NETFILTER,
nfnetlink_log: NFULNL_MSG_CONFIG / NFULNL_CFG_CMD_BIND, copy mode "packet",
first 128 bytes), parses the IPv4/IPv6 and TCP/UDP headers in a thread, and
writes rows into the SQLite table ``connections`` (``resolver.core.logdb``):

    ts, source, destination, protocol, port, verdict ('blocked' | 'would-block'), name,
    client, end_ts (= ts: an attempt is over when it is made); no ports or counters

Allowed (and, under --audit, would-block) flows are recorded from conntrack by
``resolver.fence.connrec``; with it running this recorder skips would-block packets.

``name`` is the name that last resolved to the destination, as remembered by
`SetFeeder.feed(..., name=...)`; NULL if dnsguard never answered with it
(which is the interesting case: a hard-coded address).

Only one process can bind a group; `start()` raises NflogError if another
one already has it.
"""

from __future__ import annotations

import os
import selectors
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable

from resolver.core.errors import DnsguardError
from resolver.core.logdb import ensure_connections_table

__all__ = [
    "DEFAULT_GROUP",
    "PREFIX_AUDIT",
    "PREFIX_BLOCKED",
    "NflogError",
    "NflogRecorder",
    "parse_packet",
]

DEFAULT_GROUP = 53
PREFIX_BLOCKED = "dnsguard:blocked"
PREFIX_AUDIT = "dnsguard:would-block"
COPY_RANGE = 128  # enough for IPv6 + a few extension headers + TCP ports

# netlink / nfnetlink_log constants (linux/netfilter/nfnetlink_log.h)
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10

_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")

PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 136: "udplite"}
_WITH_PORTS = {6, 17, 132, 136}
_V6_EXT = {0, 43, 60, 51, 44}  # hop-by-hop, routing, destination options, AH, fragment


class NflogError(DnsguardError):
    """The NFLOG group cannot be bound."""


def parse_packet(payload: bytes) -> tuple[str, str, str, int | None] | None:
    """(source, destination, protocol, destination port) from an IP packet; None if not IP."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0x0F) * 4
        proto = payload[9]
        src = socket.inet_ntop(socket.AF_INET, payload[12:16])
        dst = socket.inet_ntop(socket.AF_INET, payload[16:20])
        frag_offset = struct.unpack_from(">H", payload, 6)[0] & 0x1FFF
        off = ihl if frag_offset == 0 else -1
    elif version == 6 and len(payload) >= 40:
        proto = payload[6]
        src = socket.inet_ntop(socket.AF_INET6, payload[8:24])
        dst = socket.inet_ntop(socket.AF_INET6, payload[24:40])
        off = 40
        for _ in range(8):  # bounded walk over extension headers
            if proto not in _V6_EXT or off + 8 > len(payload):
                break
            if proto == 44:  # fragment: ports only in the first fragment
                frag_offset = struct.unpack_from(">H", payload, off + 2)[0] >> 3
                proto = payload[off]
                off = off + 8 if frag_offset == 0 else -1
                break
            nxt = payload[off]
            length = (payload[off + 1] + 2) * 4 if proto == 51 else (payload[off + 1] + 1) * 8
            proto, off = nxt, off + length
    else:
        return None
    port = None
    if proto in _WITH_PORTS and 0 <= off and off + 4 <= len(payload):
        port = struct.unpack_from(">H", payload, off + 2)[0]
    return src, dst, PROTOCOLS.get(proto, str(proto)), port


def _attr(atype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, atype) + payload + b"\0" * (((length + 3) & ~3) - length)


def _config_msg(group: int, seq: int, *attrs: bytes) -> bytes:
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", group) + b"".join(attrs)
    return _NLMSGHDR.pack(16 + len(body), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                          NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _open_netlink(netns: str | None) -> socket.socket:
    from resolver.fence.ipsets import open_socket

    return open_socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER, netns=netns)


class NflogRecorder:
    """Reads one NFLOG group in a thread and appends rows to ``connections``.

    ``NflogRecorder(database, group=53, name_of=feeder.names.get)``; `start()`,
    `stop()`. `recorded` counts rows written, `overruns` counts kernel
    buffer overruns (packets lost to a flood; the rules' rate limit should
    keep this at 0).
    """

    def __init__(self, database: str, group: int = DEFAULT_GROUP, *,
                 name_of: Callable[[str], object] | None = None, netns: str | None = None,
                 client_of: Callable[[str], str | None] | None = None, skip_audit: bool = False) -> None:
        if not 0 <= group <= 65535:
            raise ValueError("NFLOG group must be 0..65535")
        self.database = database
        self.group = group
        self.name_of = name_of
        self.netns = netns
        self.client_of = client_of
        # With the conntrack recorder running, a would-block flow is its row (with bytes):
        # the NFLOG copy of its first packet would count it twice.
        self.skip_audit = skip_audit
        self.recorded = 0
        self.overruns = 0
        self.last_error: str | None = None
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stopping = False

    # -- lifecycle
    def start(self) -> None:
        """Bind the group (raises NflogError) and start the reader thread."""
        sock = _open_netlink(self.netns)
        try:
            sock.bind((0, 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            self._configure(sock)
        except BaseException:
            sock.close()
            raise
        db = sqlite3.connect(self.database, timeout=5.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            ensure_connections_table(db)
        finally:
            db.close()
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"nflog-{self.group}", daemon=True)
        self._thread.start()

    def _configure(self, sock: socket.socket) -> None:
        sock.settimeout(5.0)
        mode = struct.pack(">IBB", COPY_RANGE, NFULNL_COPY_PACKET, 0)
        steps = [
            ("unbind", _attr(NFULA_CFG_CMD, bytes((NFULNL_CFG_CMD_UNBIND,)))),  # a stale binding of ours
            ("bind", _attr(NFULA_CFG_CMD, bytes((NFULNL_CFG_CMD_BIND,)))),
            ("mode", _attr(NFULA_CFG_MODE, mode)),
            ("flush", _attr(NFULA_CFG_QTHRESH, struct.pack(">I", 1))
             + _attr(NFULA_CFG_TIMEOUT, struct.pack(">I", 10))),
        ]
        for seq, (what, attr) in enumerate(steps, 1):
            sock.send(_config_msg(self.group, seq, attr))
            code = self._ack(sock, seq)
            if code and what == "unbind":
                continue
            if code:
                hint = " (another process, e.g. another dnsguard or ulogd, has this group)" \
                    if code in (16, 1) else ""
                raise NflogError(f"cannot {what} NFLOG group {self.group}: {os.strerror(code)}{hint}")
        sock.settimeout(None)

    @staticmethod
    def _ack(sock: socket.socket, seq: int) -> int:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            buf = sock.recv(65536)
            pos = 0
            while pos + 16 <= len(buf):
                length, mtype, _f, rseq, _pid = _NLMSGHDR.unpack_from(buf, pos)
                if mtype == NLMSG_ERROR and rseq == seq:
                    return -struct.unpack_from("=i", buf, pos + 16)[0]
                pos += (max(length, 16) + 3) & ~3
        raise NflogError("no reply from nfnetlink_log")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (it flushes what it has) and close the socket."""
        if self._thread is None:
            return
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    close = stop

    def __enter__(self) -> NflogRecorder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until at least `count` rows were written (tests); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.recorded >= count, timeout)

    # -- the thread
    def _run(self) -> None:
        assert self._sock is not None
        sock = self._sock
        db = sqlite3.connect(self.database, timeout=5.0)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for _key, _ in sel.select():
                    pass
                rows = []
                while True:
                    try:
                        buf = sock.recv(1 << 16, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    except OSError as exc:  # ENOBUFS: the kernel dropped log messages
                        self.overruns += 1
                        self.last_error = str(exc)
                        continue
                    rows.extend(self._rows(buf))
                    if len(rows) >= 1000:
                        break
                if rows:
                    self._write(db, rows)
        finally:
            sel.close()
            db.close()

    def _write(self, db: sqlite3.Connection, rows: list[tuple]) -> None:
        for attempt in range(3):
            try:
                db.executemany("INSERT INTO connections (ts, source, destination, protocol, port, verdict, "
                               "name, client, end_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                db.commit()
                break
            except sqlite3.Error as exc:
                self.last_error = f"sqlite: {exc}"
                if db.in_transaction:
                    db.rollback()
                if attempt == 2:
                    return
        with self._cond:
            self.recorded += len(rows)
            self._cond.notify_all()

    def _rows(self, buf: bytes) -> list[tuple]:
        out = []
        now = time.time()
        pos = 0
        while pos + 20 <= len(buf):
            length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, pos)
            if length < 16:
                break
            end = pos + length
            if mtype == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                prefix = ""
                payload = b""
                apos = pos + 20  # nlmsghdr + nfgenmsg
                while apos + 4 <= end:
                    alen, atype = _NLA.unpack_from(buf, apos)
                    if alen < 4:
                        break
                    atype &= 0x3FFF
                    if atype == NFULA_PREFIX:
                        prefix = buf[apos + 4:apos + alen].rstrip(b"\0").decode("ascii", "replace")
                    elif atype == NFULA_PAYLOAD:
                        payload = buf[apos + 4:apos + alen]
                    apos += (alen + 3) & ~3
                parsed = parse_packet(payload)
                if parsed is not None:
                    src, dst, proto, port = parsed
                    verdict = "would-block" if prefix.startswith(PREFIX_AUDIT) else "blocked"
                    if verdict == "would-block" and self.skip_audit:
                        pos += (length + 3) & ~3
                        continue
                    # An attempt is over when it is made: end_ts = ts (NULL means still open).
                    out.append((now, src, dst, proto, port, verdict, self._name(dst), self._client(src), now))
            pos += (length + 3) & ~3
        return out

    def _name(self, ip: str) -> str | None:
        return lookup_name(self.name_of, ip)

    def _client(self, ip: str) -> str | None:
        if self.client_of is None:
            return None
        try:
            return self.client_of(ip)
        except Exception:  # noqa: BLE001 - a policy problem must not lose the row
            return None


def lookup_name(name_of: Callable[[str], object] | None, ip: str) -> str | None:
    """The text name `name_of(ip)` remembers (the feeder keeps wire bytes); None if none."""
    if name_of is None:
        return None
    try:
        name = name_of(ip)
    except Exception:  # noqa: BLE001 - a lookup problem must not lose the row
        return None
    if name is None:
        return None
    if isinstance(name, bytes):  # lower-cased wire form from the query path
        from resolver.core.names import wire_to_text

        try:
            return wire_to_text(name)
        except Exception:  # noqa: BLE001
            return None
    return str(name)
