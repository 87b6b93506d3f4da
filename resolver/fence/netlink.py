"""ipset's netlink protocol spoken directly: constants, message building and parsing, the
errors the kernel returns, and sockets opened inside another network namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from resolver.core.errors import DnsguardError

DEFAULT_SET4 = "dnsguard4"
DEFAULT_SET6 = "dnsguard6"
# Creation parameters: identical from every creator (the kernel refuses a
# "create -exist" whose parameters differ from the existing set's).
SET_DEFAULT_TIMEOUT = 300  # only used for adds without a timeout; we always send one
SET_HASHSIZE = 1024
SET_MAXELEM = 262144
IPSET_MAX_TIMEOUT = 2147483  # (UINT_MAX / 1000) / 2: the kernel rejects larger values

# --- netlink / nfnetlink / ipset constants (linux/netlink.h, linux/netfilter/ipset/ip_set.h)
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_DUMP = 0x300
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

NFNL_SUBSYS_IPSET = 6
IPSET_PROTOCOL = 6  # accepted by every kernel since 3.x (min 6, current 7)
IPSET_CMD_PROTOCOL = 1
IPSET_CMD_CREATE = 2
IPSET_CMD_DESTROY = 3
IPSET_CMD_LIST = 7
IPSET_CMD_ADD = 9
IPSET_CMD_DEL = 10
IPSET_CMD_HEADER = 12
IPSET_CMD_TYPE = 13

IPSET_ATTR_PROTOCOL = 1
IPSET_ATTR_SETNAME = 2
IPSET_ATTR_TYPENAME = 3
IPSET_ATTR_REVISION = 4
IPSET_ATTR_FAMILY = 5
IPSET_ATTR_FLAGS = 6
IPSET_ATTR_DATA = 7
IPSET_ATTR_ADT = 8
IPSET_ATTR_REVISION_MIN = 10
# inside DATA
IPSET_ATTR_IP = 1
IPSET_ATTR_TIMEOUT = 6
IPSET_ATTR_HASHSIZE = 18
IPSET_ATTR_MAXELEM = 19
IPSET_ATTR_REFERENCES = 25
IPSET_ATTR_ELEMENTS = 24
# inside IP
IPSET_ATTR_IPADDR_IPV4 = 1
IPSET_ATTR_IPADDR_IPV6 = 2

IPSET_FLAG_LIST_HEADER = 1 << 2
IPSET_ERR_PROTOCOL = 4097
IPSET_ERR_FIND_TYPE = 4098
IPSET_ERR_EXIST = 4103
IPSET_ERR_REFERENCED = 4108
IPSET_ERR_HASH_FULL = 4352 + 1  # IPSET_ERR_TYPE_SPECIFIC + 1
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10

_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_BE32 = struct.Struct(">I")
_ERRNO = struct.Struct("=i")

_IPSET_ERRORS = {
    IPSET_ERR_PROTOCOL: "kernel does not support ipset protocol 6",
    IPSET_ERR_FIND_TYPE: "kernel has no hash:ip set type (module ip_set_hash_ip missing?)",
    IPSET_ERR_EXIST: "a set with that name already exists with different settings",
    IPSET_ERR_REFERENCED: "set is still referenced by firewall rules",
    IPSET_ERR_HASH_FULL: "set is full",
    4106: "wrong address family for this set",
    4107: "set was created without timeout support",
    4102: "set exists with a different type",
}


class IpsetError(DnsguardError):
    """An ipset netlink request failed."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


def _describe(code: int) -> str:
    if code in _IPSET_ERRORS:
        return _IPSET_ERRORS[code]
    try:
        return os.strerror(code)
    except ValueError:
        return f"error {code}"


# ------------------------------------------------------------ namespaces

_CLONE_NEWNET = 0x40000000
_libc: ctypes.CDLL | None = None


def _netns_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join("/run/netns", netns)


def open_socket(family: int, type_: int, proto: int = 0, *, netns: str | None = None) -> socket.socket:
    """A socket, created inside network namespace `netns` (an `ip netns` name or a path) if given.

    A socket belongs to the namespace it was created in for its whole life, so
    a short-lived thread switches into the namespace, creates it and exits;
    the calling thread (and the rest of the process) never changes namespace.
    """
    if netns is None:
        return socket.socket(family, type_, proto)
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    libc = _libc
    path = _netns_path(netns)
    out: dict[str, object] = {}

    def work() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            out["sock"] = socket.socket(family, type_, proto)
        except BaseException as exc:  # handed to the caller below
            out["error"] = exc

    t = threading.Thread(target=work, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["sock"]  # type: ignore[return-value]


# ------------------------------------------------------------ message building

def _pad(n: int) -> int:
    return (n + 3) & ~3


def _attr(atype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, atype) + payload + b"\0" * (_pad(length) - length)


def _nested(atype: int, *children: bytes) -> bytes:
    return _attr(atype | NLA_F_NESTED, b"".join(children))


def _u8(atype: int, value: int) -> bytes:
    return _attr(atype, bytes((value,)))


def _be32(atype: int, value: int) -> bytes:
    return _attr(atype | NLA_F_NET_BYTEORDER, _BE32.pack(value))


def _name(atype: int, value: str) -> bytes:
    raw = value.encode() + b"\0"
    if len(raw) > 32:
        raise IpsetError(f"ipset name too long (max 31 bytes): {value!r}")
    return _attr(atype, raw)


def _nfgen(family: int, res_id: int = 0) -> bytes:
    return struct.pack("=BB", family, 0) + struct.pack(">H", res_id)


def _message(cmd: int, flags: int, seq: int, body: bytes, family: int = NFPROTO_IPV4) -> bytes:
    payload = _nfgen(family) + body
    return _NLMSGHDR.pack(16 + len(payload), (NFNL_SUBSYS_IPSET << 8) | cmd, flags, seq, 0) + payload


def _parse_attrs(buf: bytes, start: int = 0, end: int | None = None) -> dict[int, bytes]:
    """type -> payload for one attribute level (later duplicates win)."""
    out: dict[int, bytes] = {}
    end = len(buf) if end is None else end
    pos = start
    while pos + 4 <= end:
        length, atype = _NLA.unpack_from(buf, pos)
        if length < 4:
            break
        out[atype & NLA_TYPE_MASK] = buf[pos + 4:pos + length]
        pos += _pad(length)
    return out


def _iter_attrs(buf: bytes) -> Iterable[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(buf):
        length, atype = _NLA.unpack_from(buf, pos)
        if length < 4:
            break
        yield atype & NLA_TYPE_MASK, buf[pos + 4:pos + length]
        pos += _pad(length)


def _iter_messages(buf: bytes) -> Iterable[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) for each netlink message in a datagram."""
    pos = 0
    while pos + 16 <= len(buf):
        length, mtype, flags, seq, _pid = _NLMSGHDR.unpack_from(buf, pos)
        if length < 16:
            break
        yield mtype, flags, seq, buf[pos + 16:pos + length]
        pos += _pad(length)


_ADD_TYPE = (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_ADD
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_inet_pton = socket.inet_pton


def _add_template(set_name: str, nfproto: int) -> tuple[bytes, bytes, int]:
    """(bytes before the address, bytes between address and timeout value, message length).

    An ADD message is: nlmsghdr, nfgenmsg, PROTOCOL, SETNAME,
    DATA{ IP{ IPADDR_IPVx }, TIMEOUT } -- fixed layout for a given set.
    """
    addr_len = 4 if nfproto == NFPROTO_IPV4 else 16
    addr_type = IPSET_ATTR_IPADDR_IPV4 if nfproto == NFPROTO_IPV4 else IPSET_ATTR_IPADDR_IPV6
    ip_attr_len = 4 + 4 + addr_len
    timeout_attr_len = 8
    data_len = 4 + ip_attr_len + timeout_attr_len
    head = (_nfgen(nfproto) + _u8(IPSET_ATTR_PROTOCOL, IPSET_PROTOCOL) + _name(IPSET_ATTR_SETNAME, set_name)
            + _NLA.pack(data_len, IPSET_ATTR_DATA | NLA_F_NESTED)
            + _NLA.pack(ip_attr_len, IPSET_ATTR_IP | NLA_F_NESTED)
            + _NLA.pack(4 + addr_len, addr_type | NLA_F_NET_BYTEORDER))
    mid = _NLA.pack(timeout_attr_len, IPSET_ATTR_TIMEOUT | NLA_F_NET_BYTEORDER)
    return head, mid, 16 + len(head) + addr_len + len(mid) + 4


@dataclass(frozen=True)
class SetInfo:
    """What the kernel says about one set (from a LIST header)."""

    name: str
    type: str
    family: str  # "inet" / "inet6"
    timeout: int | None  # default timeout; None = created without timeout support
    maxelem: int | None
    references: int | None
    entries: int | None


