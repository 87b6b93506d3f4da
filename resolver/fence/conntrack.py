"""ctnetlink (conntrack over netlink) spoken directly: event subscription, mark-filtered dumps,
single-entry gets, and the parsing of one conntrack message into a `CtEntry`.

Raw netlink like ``resolver.fence.netlink`` does for ipset: no library is installed for it
(pyroute2 is not a dependency), and the recorder needs only a few message types. Constants
are from linux/netfilter/nfnetlink_conntrack.h and linux/netfilter/nf_conntrack_tcp.h.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from resolver.fence.netlink import (
    NETLINK_NETFILTER,
    NLA_TYPE_MASK,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    open_socket,
)

__all__ = [
    "MARK_ALLOWED",
    "MARK_AUDIT",
    "MARK_DONE",
    "MARK_MASK",
    "CLOSING_STATES",
    "GROUP_DESTROY",
    "GROUP_NEW",
    "GROUP_UPDATE",
    "CtEntry",
    "CtSocket",
    "ACCT_SYSCTLS",
    "accounting_state",
    "enable_accounting",
    "parse_messages",
]

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
MSG_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MSG_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
MSG_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET

GROUP_NEW, GROUP_UPDATE, GROUP_DESTROY = 1, 2, 3  # NFNLGRP_CONNTRACK_*
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_MARK = 8
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_ID = 12
CTA_TIMESTAMP = 20
CTA_MARK_MASK = 21
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_COUNTERS32_PACKETS, CTA_COUNTERS32_BYTES = 3, 4
CTA_TIMESTAMP_START = 1

# TCP conntrack states: from FIN_WAIT on, one side has closed (TIME_WAIT / CLOSE: both, or RST).
TCP_FIN_WAIT, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_TIME_WAIT, TCP_CLOSE = 4, 5, 6, 7, 8
CLOSING_STATES = frozenset({TCP_TIME_WAIT, TCP_CLOSE})
T = TypeVar("T")

# The fence's connmark bits (resolver.fence.rules sets them; only these bits, so a host's own
# connmarks -- Docker, Kubernetes, VPNs use low bits -- are left alone).
MARK_MASK = 0x00300000
MARK_ALLOWED = 0x00100000
MARK_AUDIT = 0x00200000
# Set by the recorder on a connection whose row is complete (closed, final counters): its
# remaining events and the refresh dumps pass it by for the minutes it spends in TIME_WAIT.
MARK_DONE = 0x00300000

PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 136: "udplite", 33: "dccp"}

_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


@dataclass(slots=True)
class CtEntry:
    """One conntrack message, parsed. Counters are None when the message carries none."""

    kind: str  # "new" | "update" | "destroy"
    id: int | None
    family: int
    proto: int
    src: str
    dst: str
    sport: int | None
    dport: int | None
    mark: int | None
    tcp_state: int | None = None
    packets_out: int | None = None
    bytes_out: int | None = None
    packets_in: int | None = None
    bytes_in: int | None = None
    start_ns: int | None = None
    raw_orig: bytes = b""  # the CTA_TUPLE_ORIG attribute as sent, to ask for this entry again

    @property
    def key(self) -> tuple:
        """Identity of the flow: the kernel's id plus the original tuple (ids can be reused).

        The tuple's wire bytes, not its text: most events only need to be recognised, and
        turning addresses into text is most of a message's parsing cost.
        """
        return (self.id, self.raw_orig)

    def resolve(self) -> CtEntry:
        """Fill in proto, addresses and ports from the raw tuple (once); returns self."""
        if not self.src and len(self.raw_orig) > 4:
            self.src, self.dst, self.proto, self.sport, self.dport = _tuple(
                self.raw_orig, 4, len(self.raw_orig), self.family)
        return self


def _attrs(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) for each attribute in buf[pos:end]."""
    while pos + 4 <= end:
        length, atype = _NLA.unpack_from(buf, pos)
        if length < 4 or pos + length > end:
            return
        yield atype & NLA_TYPE_MASK, pos + 4, pos + length
        pos += (length + 3) & ~3


def _tuple(buf: bytes, pos: int, end: int, family: int) -> tuple[str, str, int, int | None, int | None]:
    src = dst = ""
    proto = 0
    sport = dport = None
    af = socket.AF_INET if family == socket.AF_INET else socket.AF_INET6
    for t, s, e in _attrs(buf, pos, end):
        if t == CTA_TUPLE_IP:
            for it, is_, ie in _attrs(buf, s, e):
                if it in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = socket.inet_ntop(af, buf[is_:ie])
                elif it in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = socket.inet_ntop(af, buf[is_:ie])
        elif t == CTA_TUPLE_PROTO:
            for pt, ps, _pe in _attrs(buf, s, e):
                if pt == CTA_PROTO_NUM:
                    proto = buf[ps]
                elif pt == CTA_PROTO_SRC_PORT:
                    sport = _BE16.unpack_from(buf, ps)[0]
                elif pt == CTA_PROTO_DST_PORT:
                    dport = _BE16.unpack_from(buf, ps)[0]
                elif pt in (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE):
                    # ICMP has no ports; the type stands in for the destination port (8 = echo).
                    dport = buf[ps]
    return src, dst, proto, sport, dport


def _counters(buf: bytes, pos: int, end: int) -> tuple[int | None, int | None]:
    packets = nbytes = None
    for t, s, _e in _attrs(buf, pos, end):
        if t == CTA_COUNTERS_PACKETS:
            packets = _BE64.unpack_from(buf, s)[0]
        elif t == CTA_COUNTERS_BYTES:
            nbytes = _BE64.unpack_from(buf, s)[0]
        elif t == CTA_COUNTERS32_PACKETS:
            packets = _BE32.unpack_from(buf, s)[0]
        elif t == CTA_COUNTERS32_BYTES:
            nbytes = _BE32.unpack_from(buf, s)[0]
    return packets, nbytes


def parse_message(buf: bytes, pos: int, end: int, mtype: int, flags: int) -> CtEntry | None:
    """A conntrack NEW/DELETE message (header at pos) -> CtEntry; None if it is none of ours."""
    if mtype == MSG_DELETE:
        kind = "destroy"
    elif mtype == MSG_NEW:
        # Events carry NLM_F_CREATE|NLM_F_EXCL for a new entry; dumps and updates do not.
        kind = "new" if flags & 0x600 == 0x600 else "update"
    else:
        return None
    if pos + 20 > end:
        return None
    family = buf[pos + 16]
    entry = CtEntry(kind, None, family, 0, "", "", None, None, None)
    # The top level inline (no generator): it runs for every event in the namespace.
    apos = pos + 20
    unpack = _NLA.unpack_from
    while apos + 4 <= end:
        alen, t = unpack(buf, apos)
        if alen < 4 or apos + alen > end:
            break
        t &= NLA_TYPE_MASK
        s, e = apos + 4, apos + alen
        apos += (alen + 3) & ~3
        if t == CTA_TUPLE_ORIG:
            entry.raw_orig = buf[s - 4:e]
        elif t == CTA_MARK:
            entry.mark = _BE32.unpack_from(buf, s)[0]
        elif t == CTA_ID:
            entry.id = _BE32.unpack_from(buf, s)[0]
        elif t == CTA_TUPLE_REPLY or t == CTA_STATUS:
            continue
        elif t == CTA_COUNTERS_ORIG:
            entry.packets_out, entry.bytes_out = _counters(buf, s, e)
        elif t == CTA_COUNTERS_REPLY:
            entry.packets_in, entry.bytes_in = _counters(buf, s, e)
        elif t == CTA_PROTOINFO:
            for pt, ps, pe in _attrs(buf, s, e):
                if pt == CTA_PROTOINFO_TCP:
                    for tt, ts, _te in _attrs(buf, ps, pe):
                        if tt == CTA_PROTOINFO_TCP_STATE:
                            entry.tcp_state = buf[ts]
        elif t == CTA_TIMESTAMP:
            for tt, ts, _te in _attrs(buf, s, e):
                if tt == CTA_TIMESTAMP_START:
                    entry.start_ns = _BE64.unpack_from(buf, ts)[0]
    if not entry.raw_orig:
        return None
    return entry


def parse_messages(buf: bytes) -> Iterator[CtEntry | int]:
    """Every conntrack entry in one datagram; an int for NLMSG_DONE (0) or an error (errno)."""
    pos = 0
    n = len(buf)
    while pos + 16 <= n:
        length, mtype, flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, pos)
        if length < 16:
            return
        end = min(pos + length, n)
        if mtype == NLMSG_DONE:
            yield 0
        elif mtype == NLMSG_ERROR:
            code = -struct.unpack_from("=i", buf, pos + 16)[0] if pos + 20 <= end else 0
            if code:
                yield code
        else:
            entry = parse_message(buf, pos, end, mtype, flags)
            if entry is not None:
                yield entry
        pos += (length + 3) & ~3


def _attr(atype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, atype) + payload + b"\0" * (((length + 3) & ~3) - length)


def _request(mtype: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    payload = struct.pack("=BBH", family, 0, 0) + body
    return _NLMSGHDR.pack(16 + len(payload), mtype, flags, seq, 0) + payload


class CtSocket:
    """One ctnetlink socket, opened in `netns` (an `ip netns` name or path) or here.

    ``CtSocket(groups=(GROUP_NEW, GROUP_DESTROY))`` subscribes to events; without groups it
    is a request socket for `dump()` / `get()`.
    """

    def __init__(self, groups: tuple[int, ...] = (), *, netns: str | None = None,
                 rcvbuf: int = 1 << 22) -> None:
        self.sock = open_socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER, netns=netns)
        try:
            self.sock.bind((0, 0))
            try:  # FORCE: above net.core.rmem_max (root may)
                self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            for group in groups:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except BaseException:
            self.sock.close()
            raise
        self._seq = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def dump(self, mark: int, mask: int, timeout: float = 5.0) -> list[CtEntry]:
        """Every conntrack entry whose ``mark & mask == mark``, with counters (both families)."""
        body = _attr(CTA_MARK, _BE32.pack(mark)) + _attr(CTA_MARK_MASK, _BE32.pack(mask))
        seq = self._next_seq()
        self.sock.send(_request(MSG_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, socket.AF_UNSPEC, body))
        out: list[CtEntry] = []
        self.sock.settimeout(timeout)
        try:
            while True:
                buf = self.sock.recv(1 << 20)
                for item in parse_messages(buf):
                    if isinstance(item, int):
                        if item:
                            raise OSError(item, f"conntrack dump: {os.strerror(item)}")
                        return out
                    item.kind = "update"
                    out.append(item.resolve())
        finally:
            self.sock.settimeout(None)

    def finish_many(self, entries: list[tuple[int, bytes]], mark: int, mask: int,
                    timeout: float = 2.0) -> list[CtEntry]:
        """For each (family, CTA_TUPLE_ORIG attribute): read the entry (counters), then set its
        mark bits under ``mask`` to ``mark``; returns the entries read.

        All requests go out before any reply is read, each with NLM_F_ACK so every one is
        answered exactly once (an entry gone meanwhile answers ENOENT and is left out). The
        kernel keeps the other mark bits: new = (old & ~mask) ^ mark.
        """
        if not entries:
            return []
        mark_attrs = _attr(CTA_MARK, _BE32.pack(mark)) + _attr(CTA_MARK_MASK, _BE32.pack(mask))
        out: list[CtEntry] = []
        pending = 0
        self.sock.settimeout(timeout)
        try:
            for family, tuple_attr in entries:
                self.sock.send(_request(MSG_GET, NLM_F_REQUEST | NLM_F_ACK, self._next_seq(), family,
                                        tuple_attr)
                               + _request(MSG_NEW, NLM_F_REQUEST | NLM_F_ACK, self._next_seq(), family,
                                          tuple_attr + mark_attrs))
                pending += 2
            while pending > 0:
                buf = self.sock.recv(1 << 20)
                pos = 0
                while pos + 16 <= len(buf):
                    length, mtype, flags, _seq, _pid = _NLMSGHDR.unpack_from(buf, pos)
                    if length < 16:
                        break
                    if mtype == NLMSG_ERROR:
                        pending -= 1  # an ACK (0) or a failure: either way, that request is done
                    else:
                        entry = parse_message(buf, pos, min(pos + length, len(buf)), mtype, flags)
                        if entry is not None:
                            entry.kind = "update"
                            out.append(entry)
                    pos += (length + 3) & ~3
        except TimeoutError:
            pass
        finally:
            self.sock.settimeout(None)
        return out


ACCT_SYSCTLS = ("net.netfilter.nf_conntrack_acct", "net.netfilter.nf_conntrack_timestamp")


def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def _in_netns(netns: str | None, work: Callable[[], T]) -> T:
    """Run ``work`` with ``/proc/sys/net`` meaning namespace ``netns`` (None: ours).

    ``/proc/sys/net`` resolves to the namespace of the thread that opens it, so in another
    namespace a short-lived thread joins it and does the work (see `open_socket`).
    """
    if netns is None:
        return work()
    import ctypes
    import threading

    from resolver.fence.netlink import _CLONE_NEWNET, _netns_path

    libc = ctypes.CDLL(None, use_errno=True)
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            out.append(work())
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    t = threading.Thread(target=run, name=f"ct-sysctl-{netns}", daemon=True)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out[0]


def enable_accounting(netns: str | None = None) -> None:
    """Turn on per-connection byte/packet counters and start timestamps in that namespace.

    Both sysctls are per network namespace and only apply to connections created after.
    ``dnsguard firewall apply`` (root) does this; ``serve`` tries again, which fails under
    the shipped unit (ProtectKernelTunables=yes makes /proc/sys read-only).
    """
    def write() -> None:
        for key in ACCT_SYSCTLS:
            with open(_sysctl_path(key), "w") as f:
                f.write("1\n")

    _in_netns(netns, write)


def accounting_state(netns: str | None = None) -> dict[str, bool | None]:
    """sysctl -> on/off in that namespace; None where it cannot be read (nf_conntrack not loaded)."""
    def read() -> dict[str, bool | None]:
        out: dict[str, bool | None] = {}
        for key in ACCT_SYSCTLS:
            try:
                with open(_sysctl_path(key)) as f:
                    out[key] = f.read().strip() not in ("", "0")
            except OSError:
                out[key] = None
        return out

    return _in_netns(netns, read)
