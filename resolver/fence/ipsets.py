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

import errno
import socket
import threading
import time
from collections.abc import Callable, Iterable

from resolver.fence.netlink import (
    _ADD_TYPE,
    _AF_INET,
    _AF_INET6,
    _BE32,
    _ERRNO,
    _NLMSGHDR,
    DEFAULT_SET4,
    DEFAULT_SET6,
    IPSET_ATTR_ADT,
    IPSET_ATTR_DATA,
    IPSET_ATTR_ELEMENTS,
    IPSET_ATTR_FAMILY,
    IPSET_ATTR_FLAGS,
    IPSET_ATTR_HASHSIZE,
    IPSET_ATTR_IP,
    IPSET_ATTR_IPADDR_IPV4,
    IPSET_ATTR_IPADDR_IPV6,
    IPSET_ATTR_MAXELEM,
    IPSET_ATTR_PROTOCOL,
    IPSET_ATTR_REFERENCES,
    IPSET_ATTR_REVISION,
    IPSET_ATTR_SETNAME,
    IPSET_ATTR_TIMEOUT,
    IPSET_ATTR_TYPENAME,
    IPSET_CMD_CREATE,
    IPSET_CMD_DEL,
    IPSET_CMD_DESTROY,
    IPSET_CMD_LIST,
    IPSET_CMD_TYPE,
    IPSET_ERR_EXIST,
    IPSET_FLAG_LIST_HEADER,
    IPSET_MAX_TIMEOUT,
    IPSET_PROTOCOL,
    NETLINK_NETFILTER,
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NLA_F_NESTED,
    NLA_F_NET_BYTEORDER,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SET_DEFAULT_TIMEOUT,
    SET_HASHSIZE,
    SET_MAXELEM,
    IpsetError,
    SetInfo,
    _add_template,
    _attr,
    _be32,
    _describe,
    _inet_pton,
    _iter_attrs,
    _iter_messages,
    _message,
    _name,
    _nested,
    _parse_attrs,
    _u8,
    open_socket,
)

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

    def set_ttl_bounds(self, min_ttl: int, max_ttl: int) -> None:
        """New clamps (a policy reload); entries already in the sets keep their timeouts."""
        self.min_timeout, self.max_timeout = timeout_bounds(min_ttl, max_ttl)

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
