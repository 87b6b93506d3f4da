"""Feed answer addresses into the kernel sets the firewall rules match on.

`SetFeeder.feed()` runs on the query path, right before an allowed answer is
sent, so it has to be cheap: it speaks ipset's netlink protocol directly on
one long-lived NETLINK_NETFILTER socket, packs every address of an answer into
ONE datagram (one `send` syscall), and sends without NLM_F_ACK so success
costs no reply; only failures come back, and they are drained (non-blocking)
on the next call. (pyroute2's IPSet costs ~190 µs per address and cannot be
called from inside a running asyncio loop.)

Adds go out without NLM_F_EXCL, which is ipset's `-exist`: re-adding an
address that is already in the set REFRESHES its timeout instead of failing.
The timeout is the answer's TTL clamped to [max(min_ttl, 1), min(max_ttl,
2147483)] (0 would mean "permanent", > 2147483 is rejected by the kernel).

Fail closed: entries expire by themselves; if dnsguard stops feeding,
nothing new becomes reachable.

Sets are `hash:ip` with a timeout, `dnsguard4` (inet) and `dnsguard6`
(inet6). `ensure_sets()` creates them if missing, with fixed creation
parameters, so `serve` and `firewall apply` can start in either order and
agree on what they create.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from resolver.core.errors import DnsguardError

__all__ = [
    "DEFAULT_SET4",
    "DEFAULT_SET6",
    "IpsetError",
    "SetFeeder",
    "SetInfo",
    "addresses_in_answer",
    "open_socket",
    "timeout_bounds",
]

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


# ------------------------------------------------------------ the feeder

def timeout_bounds(min_ttl: int, max_ttl: int) -> tuple[int, int]:
    """[max(min_ttl, 1), min(max_ttl, 2147483)]: the range set timeouts are clamped to.

    0 would make an entry permanent and the kernel rejects more than 2147483.
    """
    lo = min(max(int(min_ttl), 1), IPSET_MAX_TIMEOUT)
    hi = min(int(max_ttl), IPSET_MAX_TIMEOUT)
    if hi < lo:
        raise ValueError(f"firewall max_ttl ({max_ttl}) is below min_ttl ({min_ttl})")
    return lo, hi


class SetFeeder:
    """Adds (ip, ttl) pairs to the dnsguard sets over one netlink socket.

    `SetFeeder(min_ttl, max_ttl, set4="dnsguard4", set6="dnsguard6")`.
    Not thread-safe: call `feed` from one thread (the event loop). The
    `names` map (ip -> the name that last resolved to it) may be read from
    other threads (the NFLOG recorder).
    """

    NAMES_MAX = 65536

    def __init__(self, min_ttl: int = 30, max_ttl: int = 86400, set4: str = DEFAULT_SET4,
                 set6: str = DEFAULT_SET6, *, netns: str | None = None) -> None:
        self.min_timeout, self.max_timeout = timeout_bounds(min_ttl, max_ttl)
        self.set4 = set4
        self.set6 = set6
        self.netns = netns
        self.names: dict[str, str] = {}
        self.errors = 0  # adds the kernel refused (see last_error)
        self.last_error: str | None = None
        self._seq = int(time.time()) & 0xFFFF
        self._pending: dict[int, str] = {}  # seq -> ip, for error messages
        self._sock = open_socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER, netns=netns)
        self._sock.bind((0, 0))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._lock = threading.Lock()  # only for the rare blocking requests
        # Pre-built constant parts of an ADD message, per family.
        self._tmpl4 = _add_template(set4, NFPROTO_IPV4)
        self._tmpl6 = _add_template(set6, NFPROTO_IPV6)

    # -- lifecycle
    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SetFeeder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clamp(self, ttl: int) -> int:
        """The set timeout used for an answer TTL."""
        if ttl < self.min_timeout:
            return self.min_timeout
        if ttl > self.max_timeout:
            return self.max_timeout
        return ttl

    # -- hot path
    def feed(self, addrs: Iterable[tuple[str, int]], name: str | None = None) -> int:
        """Add/refresh each (ip, ttl); returns how many adds were sent.

        One datagram for all addresses, no acknowledgement on success.
        Failures (set missing, set full) are counted in `errors` /
        `last_error`; a missing set is re-created and the adds resent once.
        `name` (the query name, text) is remembered for NFLOG rows.
        """
        parts = []
        seq = self._seq
        names = self.names
        lo = self.min_timeout
        hi = self.max_timeout
        pending = self._pending
        for ip, ttl in addrs:
            try:
                if ":" not in ip:
                    raw = _inet_pton(_AF_INET, ip)
                    head, mid, length = self._tmpl4
                elif ip.startswith("::ffff:") and "." in ip:  # mapped: the kernel sees IPv4
                    ip = ip[7:]
                    raw = _inet_pton(_AF_INET, ip)
                    head, mid, length = self._tmpl4
                else:
                    raw = _inet_pton(_AF_INET6, ip)
                    head, mid, length = self._tmpl6
            except (OSError, TypeError):
                self.errors += 1
                self.last_error = f"not an IP address: {ip!r}"
                continue
            timeout = lo if ttl < lo else hi if ttl > hi else ttl
            seq = (seq + 1) & 0xFFFFFFFF
            parts.append(_NLMSGHDR.pack(length, _ADD_TYPE, NLM_F_REQUEST, seq, 0) + head + raw + mid
                         + _BE32.pack(timeout))
            pending[seq] = ip
            if name is not None:
                if ip in names:
                    del names[ip]
                elif len(names) >= self.NAMES_MAX:
                    del names[next(iter(names))]
                names[ip] = name
        self._seq = seq
        if parts:
            self._send(b"".join(parts))
        return len(parts)

    def _send(self, datagram: bytes, retry: bool = True) -> None:
        try:
            self._sock.send(datagram)
        except OSError as exc:
            self.errors += 1
            self.last_error = f"netlink send failed: {exc}"
            self._pending.clear()
            return
        # nfnetlink processes requests synchronously inside send(): any error
        # replies are already queued on the socket.
        failures = self._drain()
        if failures and retry and any(code == errno.ENOENT for code, _ in failures):
            try:
                self.ensure_sets()
            except IpsetError as exc:
                self.errors += len(failures)
                self.last_error = str(exc)
                self._pending.clear()
                return
            self._send(datagram, retry=False)
            return
        for code, seq in failures:
            self.errors += 1
            self.last_error = f"cannot add {self._pending.get(seq, '?')}: {_describe(code)}"
        self._pending.clear()

    def _drain(self) -> list[tuple[int, int]]:
        """Collect queued error replies as (errno, seq)."""
        failures: list[tuple[int, int]] = []
        while True:
            try:
                buf = self._sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return failures
            except OSError as exc:  # ENOBUFS: some error replies were lost
                self.errors += 1
                self.last_error = f"netlink receive: {exc}"
                return failures
            for mtype, _flags, seq, payload in _iter_messages(buf):
                if mtype != NLMSG_ERROR or len(payload) < 4:
                    continue
                code = -_ERRNO.unpack_from(payload)[0]
                if code:
                    failures.append((code, seq))

    # -- blocking requests (not on the hot path)
    def _request(self, msg_for_seq: Callable[[int], bytes], dump: bool = False) -> list[bytes]:
        """Send one request, wait for its ACK (or DONE); return the payloads of data replies."""
        with self._lock:
            for code, fseq in self._drain():  # stray failures of earlier feeds
                self.errors += 1
                self.last_error = f"cannot add {self._pending.get(fseq, '?')}: {_describe(code)}"
            self._pending.clear()
            self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
            self._sock.send(msg_for_seq(seq))
            replies: list[bytes] = []
            deadline = time.monotonic() + 5.0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise IpsetError("no reply from the kernel's ipset netlink interface")
                self._sock.settimeout(remaining)
                try:
                    buf = self._sock.recv(1 << 20)
                except TimeoutError:
                    continue
                finally:
                    self._sock.settimeout(None)
                for mtype, _flags, rseq, payload in _iter_messages(buf):
                    if rseq != seq:
                        continue
                    if mtype == NLMSG_ERROR:
                        code = -_ERRNO.unpack_from(payload)[0]
                        if code:
                            raise IpsetError(_describe(code), code)
                        if not dump:
                            return replies
                    elif mtype == NLMSG_DONE:
                        return replies
                    else:
                        replies.append(payload[4:])  # skip nfgenmsg
                        if not dump:
                            return replies

    def _type_revision(self, family: int) -> int:
        body = (_u8(IPSET_ATTR_PROTOCOL, IPSET_PROTOCOL) + _name(IPSET_ATTR_TYPENAME, "hash:ip")
                + _u8(IPSET_ATTR_FAMILY, family))
        replies = self._request(lambda seq: _message(IPSET_CMD_TYPE, NLM_F_REQUEST, seq, body, family))
        if not replies:
            raise IpsetError("kernel did not report hash:ip revisions")
        attrs = _parse_attrs(replies[0])
        return attrs[IPSET_ATTR_REVISION][0]

    def create_set(self, name: str, family: int) -> None:
        """Create a hash:ip set with timeout support unless one with the same settings exists."""
        revision = self._type_revision(family)
        data = _nested(IPSET_ATTR_DATA,
                       _be32(IPSET_ATTR_TIMEOUT, SET_DEFAULT_TIMEOUT),
                       _be32(IPSET_ATTR_HASHSIZE, SET_HASHSIZE),
                       _be32(IPSET_ATTR_MAXELEM, SET_MAXELEM))
        body = (_u8(IPSET_ATTR_PROTOCOL, IPSET_PROTOCOL) + _name(IPSET_ATTR_SETNAME, name)
                + _name(IPSET_ATTR_TYPENAME, "hash:ip") + _u8(IPSET_ATTR_REVISION, revision)
                + _u8(IPSET_ATTR_FAMILY, family) + data)
        try:
            # no NLM_F_EXCL: "create -exist", fine if an identical set exists
            self._request(lambda seq: _message(IPSET_CMD_CREATE, NLM_F_REQUEST | NLM_F_ACK, seq, body,
                                               family))
        except IpsetError as exc:
            if exc.code not in (IPSET_ERR_EXIST, errno.EEXIST):
                raise IpsetError(f"cannot create ipset {name}: {exc}", exc.code) from None
            info = self.info(name)  # exists with other parameters: usable if it is the right kind
            want = "inet" if family == NFPROTO_IPV4 else "inet6"
            if info is None or info.type != "hash:ip" or info.family != want or info.timeout is None:
                raise IpsetError(
                    f"ipset {name} exists but is not a hash:ip {want} set with timeout "
                    f"({info}); remove it (ipset destroy {name}) or choose another name",
                    exc.code) from None

    def ensure_sets(self) -> None:
        """Create `set4` (inet) and `set6` (inet6) if missing. Safe to call any time."""
        self.create_set(self.set4, NFPROTO_IPV4)
        self.create_set(self.set6, NFPROTO_IPV6)

    def destroy_set(self, name: str) -> bool:
        """Destroy a set; False if it did not exist. Raises IpsetError if still referenced."""
        if self.info(name) is None:  # (some kernels ACK destroying a missing set)
            return False
        body = _u8(IPSET_ATTR_PROTOCOL, IPSET_PROTOCOL) + _name(IPSET_ATTR_SETNAME, name)
        try:
            self._request(lambda seq: _message(IPSET_CMD_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, body))
        except IpsetError as exc:
            if exc.code == errno.ENOENT:
                return False
            raise IpsetError(f"cannot destroy ipset {name}: {exc}", exc.code) from None
        return True

    def _list(self, name: str, header_only: bool) -> list[bytes]:
        body = _u8(IPSET_ATTR_PROTOCOL, IPSET_PROTOCOL) + _name(IPSET_ATTR_SETNAME, name)
        if header_only:
            body += _attr(IPSET_ATTR_FLAGS | NLA_F_NET_BYTEORDER, _BE32.pack(IPSET_FLAG_LIST_HEADER))
        return self._request(lambda seq: _message(IPSET_CMD_LIST, NLM_F_REQUEST | NLM_F_DUMP, seq, body),
                             dump=True)

    def info(self, name: str) -> SetInfo | None:
        """The set's header, or None if there is no such set."""
        try:
            replies = self._list(name, header_only=True)
        except IpsetError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise
        for payload in replies:
            attrs = _parse_attrs(payload)
            if IPSET_ATTR_TYPENAME not in attrs:
                continue
            data = _parse_attrs(attrs.get(IPSET_ATTR_DATA, b""))

            def be32(key: int, data: dict[int, bytes] = data) -> int | None:
                raw = data.get(key)
                return _BE32.unpack(raw[:4])[0] if raw and len(raw) >= 4 else None

            fam = attrs.get(IPSET_ATTR_FAMILY, b"\0")[0]
            return SetInfo(
                name=attrs.get(IPSET_ATTR_SETNAME, b"").rstrip(b"\0").decode(),
                type=attrs[IPSET_ATTR_TYPENAME].rstrip(b"\0").decode(),
                family={NFPROTO_IPV4: "inet", NFPROTO_IPV6: "inet6"}.get(fam, str(fam)),
                timeout=be32(IPSET_ATTR_TIMEOUT),
                maxelem=be32(IPSET_ATTR_MAXELEM),
                references=be32(IPSET_ATTR_REFERENCES),
                entries=be32(IPSET_ATTR_ELEMENTS),
            )
        return None

    def members(self, name: str) -> dict[str, int | None]:
        """ip -> remaining timeout in seconds (None = permanent). Raises IpsetError if missing."""
        out: dict[str, int | None] = {}
        for payload in self._list(name, header_only=False):
            attrs = _parse_attrs(payload)
            adt = attrs.get(IPSET_ATTR_ADT)
            if not adt:
                continue
            for atype, entry in _iter_attrs(adt):
                if atype != IPSET_ATTR_DATA:
                    continue
                fields = _parse_attrs(entry)
                ipattrs = _parse_attrs(fields.get(IPSET_ATTR_IP, b""))
                if IPSET_ATTR_IPADDR_IPV4 in ipattrs:
                    ip = socket.inet_ntop(socket.AF_INET, ipattrs[IPSET_ATTR_IPADDR_IPV4][:4])
                elif IPSET_ATTR_IPADDR_IPV6 in ipattrs:
                    ip = socket.inet_ntop(socket.AF_INET6, ipattrs[IPSET_ATTR_IPADDR_IPV6][:16])
                else:
                    continue
                raw = fields.get(IPSET_ATTR_TIMEOUT)
                out[ip] = _BE32.unpack(raw[:4])[0] if raw else None
        return out

    def delete(self, ip: str) -> bool:
        """Remove one address (tests, manual revocation); False if it was not there."""
        family = NFPROTO_IPV6 if ":" in ip else NFPROTO_IPV4
        if family == NFPROTO_IPV4:
            inner = _attr(IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, socket.inet_pton(socket.AF_INET, ip))
            name = self.set4
        else:
            inner = _attr(IPSET_ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER,
                          socket.inet_pton(socket.AF_INET6, ip))
            name = self.set6
        body = (_u8(IPSET_ATTR_PROTOCOL, IPSET_PROTOCOL) + _name(IPSET_ATTR_SETNAME, name)
                + _nested(IPSET_ATTR_DATA, _attr(IPSET_ATTR_IP | NLA_F_NESTED, inner)))
        try:
            self._request(lambda seq: _message(IPSET_CMD_DEL, NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL, seq,
                                               body, family))
        except IpsetError as exc:
            if exc.code == IPSET_ERR_EXIST:  # on DEL: "it's not added"
                return False
            raise
        return True


# ------------------------------------------------------------ answers -> addresses

def addresses_in_answer(wire: bytes) -> list[tuple[str, int]]:
    """(ip, ttl) pairs a DNS response makes reachable.

    A/AAAA records for the question name or at the end of its CNAME chain,
    with the smallest TTL along the chain; plus ipv4hint/ipv6hint addresses
    of HTTPS/SVCB records on that chain. Records for unrelated owners
    (injected glue) are ignored. Returns [] for anything unparsable.
    """
    import dns.message
    import dns.rdatatype

    try:
        msg = dns.message.from_wire(wire, ignore_trailing=True)
    except Exception:  # noqa: BLE001 - any parse failure means "nothing to allow"
        return []
    if not msg.question:
        return []
    chain_ttl: dict[object, int] = {}
    name = msg.question[0].name
    ttl = IPSET_MAX_TIMEOUT
    by_owner: dict[object, list] = {}
    for rrset in msg.answer:
        by_owner.setdefault(rrset.name, []).append(rrset)
    seen = set()
    for _ in range(16):  # bounded CNAME chain
        if name in seen:
            break
        seen.add(name)
        chain_ttl[name] = ttl
        nxt = None
        for rrset in by_owner.get(name, []):
            if rrset.rdtype == dns.rdatatype.CNAME:
                nxt = rrset[0].target
                ttl = min(ttl, rrset.ttl)
        if nxt is None:
            break
        name = nxt
    out: list[tuple[str, int]] = []
    for owner, base in chain_ttl.items():
        for rrset in by_owner.get(owner, []):
            t = min(base, rrset.ttl)
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                out.extend((rd.address, t) for rd in rrset)
            elif rrset.rdtype in (dns.rdatatype.HTTPS, dns.rdatatype.SVCB):
                for rd in rrset:
                    for key in (4, 6):  # ipv4hint, ipv6hint
                        param = rd.params.get(key)
                        if param is not None:
                            out.extend((a, t) for a in param.addresses)
    return out
