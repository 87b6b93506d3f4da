"""dnstap output: every exchange, as protobuf ``dnstap.Dnstap`` messages over Frame Streams.

The query path only calls ``DnstapWriter.sink`` (a bounded deque append, or a drop counted);
a writer thread turns the queued events into protobuf (written directly, with the field
numbers of the ``dnstap-pb`` schema; see below), talks Frame Streams to the collector,
and reconnects with a growing back-off when it goes away.
DNS never waits for the collector: past ``queue_max`` waiting events, new ones are dropped
and counted (``dropped``, in events: one client exchange or one upstream exchange, one or
two messages each; exposed as a metric and reported on stderr).

Per client query: CLIENT_QUERY and CLIENT_RESPONSE (no response when the packet was
dropped); per upstream exchange: FORWARDER_QUERY and FORWARDER_RESPONSE. A denial carries a
``Policy`` (type "dnsguard", the rule, action NXDOMAIN, match QNAME); audit mode's "would be
denied" carries action PASS. The decision is recomputed in the writer thread from the policy
in force (``policy_of``): it is a pure function of (policy, client, name), so this costs the
query path nothing; an answer made just before a reload is described by the new policy.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from dnstap_pb import dnstap_pb2 as pb

from resolver import __version__
from resolver.observe.framestream import FrameStreamError, Sender

# (client ip, wire qname) -> (rule or None, audit) for a denial; None when allowed or not served.
PolicyOf = Callable[[str, bytes], "tuple[str | None, bool] | None"]

BATCH = 64  # events encoded per GIL hold: small, so the event loop thread waits little
IDLE_WAIT = 0.005  # seconds the writer sleeps when the queue is empty
BACKOFF_MIN, BACKOFF_MAX = 0.25, 8.0
DROP_REPORT_INTERVAL = 10.0

_PROTO = {"udp": pb.UDP, "tcp": pb.TCP}


def question_name(msg: bytes) -> bytes | None:
    """The question's name in lower-cased wire form; None if unreadable (no compression in a query)."""
    i, end = 12, len(msg)
    if end < 12 or msg[4:6] == b"\x00\x00":
        return None
    while i < end:
        n = msg[i]
        if n == 0:
            return msg[12:i + 1].lower()
        if n & 0xC0:
            return None
        i += n + 1
    return None


# -- protobuf, written directly -------------------------------------------------------------
# Building dnstap-pb message objects costs ~20 µs per client exchange in the writer thread, which
# holds the GIL the event loop needs; writing the few fields directly costs ~5 µs. The
# field numbers and enum values come from dnstap-pb's descriptors, so they cannot drift from the
# schema, and tests parse what we write with dnstap-pb and with independent receivers.

def _num(message: type, name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number  # type: ignore[attr-defined]


_SMALL = [bytes((i,)) for i in range(0x80)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _vfield(message: type, name: str) -> Callable[[int], bytes]:
    key = _key(_num(message, name), 0)
    return lambda n: key + _varint(n)


def _bfield(message: type, name: str) -> Callable[[bytes], bytes]:
    key = _key(_num(message, name), 2)
    return lambda b: key + _varint(len(b)) + b


def _secfield(message: type, name: str) -> Callable[[int], bytes]:
    """A varint field that keeps its last encoding: timestamps repeat their second."""
    key = _key(_num(message, name), 0)
    last: list = [-1, b""]

    def enc(n: int) -> bytes:
        if n != last[0]:
            last[0], last[1] = n, key + _varint(n)
        return last[1]
    return enc


def _f32field(message: type, name: str) -> Callable[[int], bytes]:
    key = _key(_num(message, name), 5)
    return lambda n: key + struct.pack("<I", n)


M, P = pb.Message, pb.Policy
_TYPE = _vfield(M, "type")
_FAMILY = _vfield(M, "socket_family")
_PROTOCOL = _vfield(M, "socket_protocol")
_QADDR, _RADDR = _bfield(M, "query_address"), _bfield(M, "response_address")
_QPORT, _RPORT = _vfield(M, "query_port"), _vfield(M, "response_port")
_QSEC, _QNSEC = _secfield(M, "query_time_sec"), _f32field(M, "query_time_nsec")
_RSEC, _RNSEC = _secfield(M, "response_time_sec"), _f32field(M, "response_time_nsec")
_QMSG, _RMSG = _bfield(M, "query_message"), _bfield(M, "response_message")
_POLICY = _bfield(M, "policy")
_P_TYPE, _P_RULE, _P_VALUE = _bfield(P, "type"), _bfield(P, "rule"), _bfield(P, "value")
_P_ACTION, _P_MATCH = _vfield(P, "action"), _vfield(P, "match")
_D_MESSAGE = _bfield(pb.Dnstap, "message")
_D_TYPE_MESSAGE = _vfield(pb.Dnstap, "type")(pb.Dnstap.MESSAGE)
_CQ, _CR = _TYPE(M.CLIENT_QUERY), _TYPE(M.CLIENT_RESPONSE)
_FQ, _FR = _TYPE(M.FORWARDER_QUERY), _TYPE(M.FORWARDER_RESPONSE)
_POLICY_HEAD = _P_TYPE(b"dnsguard") + _P_MATCH(P.QNAME)


_PACKED: dict[str, bytes] = {}


def _endpoint(addr: tuple, addr_field: Callable[[bytes], bytes], port_field: Callable[[int], bytes]) -> bytes:
    if not addr:
        return b""
    ip = addr[0]
    packed = _PACKED.get(ip)
    if packed is None:
        try:
            packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip.split("%", 1)[0])
        except OSError:
            packed = b""
        if len(_PACKED) >= 65_536:
            _PACKED.clear()
        _PACKED[ip] = packed
    return addr_field(packed) + port_field(addr[1]) if packed else b""


def _time(t: float, sec_field: Callable[[int], bytes], nsec_field: Callable[[int], bytes]) -> bytes:
    sec = int(t)
    return sec_field(sec) + nsec_field(min(999_999_999, int((t - sec) * 1e9)))


class Encoder:
    """Queued events -> serialised ``dnstap.Dnstap`` messages."""

    def __init__(self, identity: str, version: str, policy_of: PolicyOf | None) -> None:
        ident = (identity or socket.gethostname()).encode()
        ver = (version or f"dnsguard {__version__}").encode()
        self._head = (_key(_num(pb.Dnstap, "identity"), 2) + _varint(len(ident)) + ident
                      + _key(_num(pb.Dnstap, "version"), 2) + _varint(len(ver)) + ver + _D_TYPE_MESSAGE)
        self.policy_of = policy_of
        self._rules: dict[tuple[str | None, bool], bytes] = {}
        self._fixed: dict[tuple, bytes] = {}

    def encode(self, ev: tuple) -> list[bytes]:
        if ev[0] == "client":
            return self._client(*ev[1:])
        return self._forwarder(*ev[1:])

    def _policy(self, ip: str, query: bytes) -> bytes:
        qname = question_name(query)
        if self.policy_of is None or qname is None:
            return b""
        decided = self.policy_of(ip, qname)
        if decided is None:
            return b""
        head = self._rules.get(decided)
        if head is None:
            rule, audit = decided
            head = (_POLICY_HEAD + _P_RULE((rule or "default deny (no allow rule)").encode())
                    + _P_ACTION(P.PASS if audit else P.NXDOMAIN))
            if len(self._rules) < 4096:
                self._rules[decided] = head
        return _POLICY(head + _P_VALUE(qname))

    def _client(self, transport: str, client: tuple, local: tuple, query: bytes, resp: bytes | None,
                t_in: float, t_out: float) -> list[bytes]:
        ip = client[0] if client else ""
        v6 = ":" in ip
        # Family, protocol and our own address repeat for every message of a listener.
        fixed = self._fixed.get((transport, v6, local))
        if fixed is None:
            fixed = (_FAMILY(pb.INET6 if v6 else pb.INET) + _PROTOCOL(_PROTO[transport])
                     + _endpoint(local, _RADDR, _RPORT))
            if len(self._fixed) < 1024:
                self._fixed[(transport, v6, local)] = fixed
        common = fixed + _endpoint(client, _QADDR, _QPORT) + _time(t_in, _QSEC, _QNSEC)
        policy = self._policy(ip, query)
        head = self._head
        out = [head + _D_MESSAGE(_CQ + common + _QMSG(query) + policy)]
        if resp is not None:
            out.append(head + _D_MESSAGE(_CR + common + _time(t_out, _RSEC, _RNSEC) + _RMSG(resp) + policy))
        return out

    def _forwarder(self, server: tuple, proto: str, packet: bytes, reply: bytes | None, sent: float,
                   received: float) -> list[bytes]:
        common = (_FAMILY(pb.INET6 if ":" in server[0] else pb.INET) + _PROTOCOL(_PROTO[proto])
                  + _endpoint(server, _RADDR, _RPORT) + _time(sent, _QSEC, _QNSEC))
        head = self._head
        out = [head + _D_MESSAGE(_FQ + common + _QMSG(packet))]
        if reply is not None:
            out.append(head + _D_MESSAGE(_FR + common + _time(received, _RSEC, _RNSEC) + _RMSG(reply)))
        return out


class DnstapWriter:
    """The queue the query path feeds, and the thread that empties it into a collector."""

    def __init__(self, address: str, *, identity: str = "", version: str = "", queue_max: int = 100_000,
                 policy_of: PolicyOf | None = None, log: Callable[[str], None] | None = None) -> None:
        self.address = address
        self.queue_max = queue_max
        self.encoder = Encoder(identity, version, policy_of)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.queue: deque[tuple] = deque()
        self.overflow = 0  # counted by the sink (event loop thread)
        self.lost = 0  # counted by the writer thread: events a failed send took with it
        self.sent = 0
        self.connects = 0
        self.connected = False
        self._stop = threading.Event()
        self._drain_deadline = float("inf")
        self._thread: threading.Thread | None = None
        q, limit = self.queue, queue_max
        append = q.append

        def sink(ev: tuple) -> None:
            if len(q) < limit:
                append(ev)
            else:
                self.overflow += 1
        self.sink: Callable[[tuple], None] = sink

    @property
    def dropped(self) -> int:
        return self.overflow + self.lost

    def depth(self) -> int:
        return len(self.queue)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dnsguard-dnstap", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Send what is queued (within ``timeout``), then STOP/FINISH and close."""
        self._drain_deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout + 3.0)
        if self.dropped:
            self.log(f"dnsguard: dnstap: {self.dropped} events dropped in all ({self.sent} messages sent)")

    # -- the writer thread ----------------------------------------------------------
    def _run(self) -> None:
        backoff = BACKOFF_MIN
        reported, last_report = 0, time.monotonic()
        sender: Sender | None = None
        while True:
            now = time.monotonic()
            if self.dropped != reported and now - last_report >= DROP_REPORT_INTERVAL:
                self.log(f"dnsguard: dnstap: {self.dropped - reported} events dropped "
                         f"(queue full or collector away); {self.dropped} in all")
                reported, last_report = self.dropped, now
            if sender is None:
                if self._stop.is_set():
                    break
                sender = Sender(self.address)
                try:
                    sender.open()
                except (OSError, FrameStreamError) as exc:
                    sender = None
                    if backoff == BACKOFF_MIN:
                        self.log(f"dnsguard: dnstap: cannot reach {self.address} ({exc}); retrying")
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                self.connects += 1
                self.connected = True
                backoff = BACKOFF_MIN
                self.log(f"dnsguard: dnstap: connected to {self.address}")
            batch = self._take()
            if batch:
                try:
                    payloads = [p for ev in batch for p in self.encoder.encode(ev)]
                except Exception as exc:  # a bug in encoding must cost messages, not the thread
                    self.lost += len(batch)
                    self.log(f"dnsguard: dnstap: cannot encode {len(batch)} events: {exc!r}")
                    continue
                try:
                    sender.send(payloads)
                    self.sent += len(payloads)
                except OSError as exc:
                    self.lost += len(batch)
                    self.connected = False
                    sender.close(graceful=False)
                    sender = None
                    self.log(f"dnsguard: dnstap: lost {self.address} ({exc}); reconnecting")
                    continue
            elif self._stop.is_set():
                break
            else:
                self._stop.wait(IDLE_WAIT)
        if sender is not None:
            self.connected = False
            sender.close(graceful=True)
        left = len(self.queue)
        if left:
            self.lost += left
            self.queue.clear()

    def _take(self) -> list[tuple]:
        q = self.queue
        if self._stop.is_set() and time.monotonic() > self._drain_deadline:
            return []
        n = min(len(q), BATCH)
        return [q.popleft() for _ in range(n)]
