"""dnstap output: every exchange, as protobuf ``dnstap.Dnstap`` messages over Frame Streams.

The query path only calls ``DnstapWriter.sink`` (a bounded deque append, or a drop counted);
a writer thread turns the queued events into protobuf (the ``dnstap-pb`` classes), talks
Frame Streams to the collector, and reconnects with a growing back-off when it goes away.
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

BATCH = 512
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


def _addr(msg: pb.Message, ip: str, port: int | None, which: str) -> None:
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip.split("%", 1)[0])
    except OSError:
        return
    setattr(msg, f"{which}_address", packed)
    if port is not None:
        setattr(msg, f"{which}_port", port)


def _times(msg: pb.Message, t: float, which: str) -> None:
    sec = int(t)
    setattr(msg, f"{which}_time_sec", sec)
    setattr(msg, f"{which}_time_nsec", int((t - sec) * 1e9))


class Encoder:
    def __init__(self, identity: str, version: str, policy_of: PolicyOf | None) -> None:
        self.identity = (identity or socket.gethostname()).encode()
        self.version = (version or f"dnsguard {__version__}").encode()
        self.policy_of = policy_of

    def _frame(self, message: pb.Message) -> bytes:
        d = pb.Dnstap(identity=self.identity, version=self.version, type=pb.Dnstap.MESSAGE)
        d.message.CopyFrom(message)
        return d.SerializeToString()

    def encode(self, ev: tuple) -> list[bytes]:
        if ev[0] == "client":
            return self._client(*ev[1:])
        return self._forwarder(*ev[1:])

    def _client(self, transport: str, client: tuple, local: tuple, query: bytes, resp: bytes | None,
                t_in: float, t_out: float) -> list[bytes]:
        base = pb.Message(socket_protocol=_PROTO[transport])
        ip = client[0] if client else ""
        base.socket_family = pb.INET6 if ":" in ip else pb.INET
        if client:
            _addr(base, ip, client[1], "query")
        if local:
            _addr(base, local[0], local[1], "response")
        _times(base, t_in, "query")
        policy = None
        qname = question_name(query)
        if self.policy_of is not None and qname is not None:
            decided = self.policy_of(ip, qname)
            if decided is not None:
                rule, audit = decided
                policy = pb.Policy(type="dnsguard", rule=(rule or "default deny (no allow rule)").encode(),
                                   action=pb.Policy.PASS if audit else pb.Policy.NXDOMAIN,
                                   match=pb.Policy.QNAME, value=qname)
        q = pb.Message()
        q.CopyFrom(base)
        q.type = pb.Message.CLIENT_QUERY
        q.query_message = query
        if policy is not None:
            q.policy.CopyFrom(policy)
        out = [self._frame(q)]
        if resp is not None:
            r = base
            r.type = pb.Message.CLIENT_RESPONSE
            r.response_message = resp
            _times(r, t_out, "response")
            if policy is not None:
                r.policy.CopyFrom(policy)
            out.append(self._frame(r))
        return out

    def _forwarder(self, server: tuple, proto: str, packet: bytes, reply: bytes | None, sent: float,
                   received: float) -> list[bytes]:
        base = pb.Message(socket_protocol=_PROTO[proto],
                          socket_family=pb.INET6 if ":" in server[0] else pb.INET)
        _addr(base, server[0], server[1], "response")
        _times(base, sent, "query")
        q = pb.Message()
        q.CopyFrom(base)
        q.type = pb.Message.FORWARDER_QUERY
        q.query_message = packet
        out = [self._frame(q)]
        if reply is not None:
            base.type = pb.Message.FORWARDER_RESPONSE
            base.response_message = reply
            _times(base, received, "response")
            out.append(self._frame(base))
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
