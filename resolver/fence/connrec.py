"""Record every connection the fence let through, from conntrack, as one ``connections`` row.

The fence's rules connmark what they let through (``MARK_ALLOWED``; ``MARK_AUDIT`` for what
``--audit`` would have blocked). `ConnRecorder` follows those conntrack entries in a thread
(``serve`` runs it in a process of its own: ``resolver.fence.connproc``) and keeps one row per
entry:

* a NEW event inserts the row (``end_ts`` NULL: open); an unnamed row takes its name when
  written again, if the name's note (another pipe) came after the event;
* a TCP state change to TIME_WAIT or CLOSE (FIN from both sides, or RST) closes it: a GET
  for that entry a moment later (``close_delay``, so the last ACK is counted) reads its
  counters, and ``end_ts`` and those counters are written together -- long before the
  kernel destroys the entry (after TIME_WAIT, two minutes later). The same request sets
  the entry's mark to ``MARK_DONE``, so the dumps and the entry's remaining events pass it
  by, and the recorder forgets it;
* a DESTROY event writes the final counters (UDP and ICMP flows end only by timeout);
* every ``refresh`` seconds a dump of the marked entries (filtered by mark in the kernel)
  refreshes the counters of long-lived connections, adopts entries whose NEW event was
  lost, and closes rows whose entry vanished without a DESTROY we saw.

Blocked attempts never become conntrack entries (the first packet is rejected before the
entry is confirmed); `NflogRecorder` records those. Under ``--audit`` it leaves the
would-block rows to this recorder, which sees their bytes.

Bounded: at most ``max_open`` open flows are followed at once; the kernel socket buffer is
the queue. A flow that cannot be followed or a row that cannot be written is counted in
``dropped``; an event-buffer overrun (``ENOBUFS``) in ``overruns``, and answered with an
immediate dump, which recovers every flow still in the table. Both are written to
``connection_overflow`` for the report.
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from resolver.core.logdb import ensure_connections_table
from resolver.fence.conntrack import (
    CLOSING_STATES,
    GROUP_DESTROY,
    GROUP_NEW,
    GROUP_UPDATE,
    MARK_ALLOWED,
    MARK_AUDIT,
    MARK_DONE,
    MARK_MASK,
    PROTOCOLS,
    CtEntry,
    CtSocket,
    accounting_state,
    enable_accounting,
    parse_messages,
)
from resolver.fence.describe import Describe
from resolver.fence.nflog import lookup_name

__all__ = ["ConnRecorder"]

DEFAULT_REFRESH = 30.0
DEFAULT_MAX_OPEN = 262_144
DECLINED_MAX = 262_144  # past this many, a dropped flow may be counted again
FINISHED_MAX = 131_072
CLOSE_DELAY = 0.2
FLUSH_INTERVAL = 0.25
FLUSH_ROWS = 2000
ERRORS_IN_A_ROW_MAX = 20  # then the thread gives up (and `serve` restarts the recorder process)

_INSERT = ("INSERT INTO connections (ts, source, destination, protocol, port, verdict, name, end_ts, "
           "source_port, packets_out, bytes_out, packets_in, bytes_in, client, rule) "
           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
_UPDATE = ("UPDATE connections SET end_ts = ?, packets_out = ?, bytes_out = ?, packets_in = ?, "
           "bytes_in = ?, name = ?, client = ?, rule = ? WHERE rowid = ?")


@dataclass(slots=True)
class _Flow:
    key: tuple
    rowid: int | None
    ts: float
    family: int
    proto: int
    src: str
    dst: str
    sport: int | None
    dport: int | None
    verdict: str
    name: str | None
    client: str | None
    rule: str | None
    raw_orig: bytes
    end_ts: float | None = None
    counters: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None)
    get_due: float | None = None

    @property
    def written_end(self) -> float | None:
        # end_ts and the final counters land together: while the GET for them is pending,
        # the row still reads as open.
        return self.end_ts if self.get_due is None else None

    def row(self) -> tuple:
        return (self.ts, self.src, self.dst, PROTOCOLS.get(self.proto, str(self.proto)), self.dport,
                self.verdict, self.name, self.written_end, self.sport, *self.counters, self.client, self.rule)


def _verdict(mark: int | None) -> str | None:
    if mark is None:
        return None
    bits = mark & MARK_MASK
    if bits == MARK_ALLOWED:
        return "allowed"
    if bits == MARK_AUDIT:
        return "would-block"
    return None


def _counters(e: CtEntry) -> tuple[int | None, int | None, int | None, int | None]:
    return (e.packets_out, e.bytes_out, e.packets_in, e.bytes_in)


class ConnRecorder:
    """Follows the fence's marked conntrack entries in a thread and keeps their rows.

    ``ConnRecorder(database, name_of=feeder.names.get, describe=policy_describer(...))``;
    `start()` (raises OSError if conntrack cannot be read), `stop()`.
    """

    def __init__(self, database: str, *, netns: str | None = None,
                 name_of: Callable[[str], object] | None = None, describe: Describe | None = None,
                 refresh: float = DEFAULT_REFRESH, max_open: int = DEFAULT_MAX_OPEN,
                 close_delay: float = CLOSE_DELAY, rcvbuf: int = 1 << 22,
                 control: tuple[int, Callable[[], bool]] | None = None) -> None:
        if refresh <= 0 or refresh > 60:
            raise ValueError("conntrack refresh interval must be in (0, 60] seconds")
        self.database = database
        self.netns = netns
        self.name_of = name_of
        self.describe = describe
        self.refresh = refresh
        self.max_open = max_open
        self.close_delay = close_delay
        self.rcvbuf = rcvbuf
        # (fd, handler): another input read in the same loop, before each batch of events, so
        # a name sent just before a connection opens is known when its NEW event is read.
        # The handler returns False at end of input: the recorder then stops.
        self.control = control
        self.inserted = 0  # rows written
        self.dropped = 0  # flows not recorded (over max_open, or the write failed)
        self.overruns = 0  # kernel event buffer overruns (answered with a dump)
        self.dumps = 0
        self.errors = 0  # other failed reads/requests, each answered with a resync
        self.last_error: str | None = None
        self._flows: dict[tuple, _Flow] = {}
        # Flows counted as dropped (never counted again, nor half-recorded) until their entry goes.
        self._declined: dict[tuple, None] = {}
        # Flows whose row is complete: events queued before the done-mark reached the kernel
        # still carry the old mark, and must not start a second row. FIFO-bounded: the done
        # mark hides them from everything after that lag.
        self._finished: dict[tuple, None] = {}
        self._dirty: dict[int, _Flow] = {}  # id(flow) -> flow
        self._closing: list[_Flow] = []
        self._resync = False
        self._saved_overflow = (0, 0)
        self._thread: threading.Thread | None = None
        self._events: CtSocket | None = None
        self._query: CtSocket | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False

    # -- lifecycle
    def start(self) -> None:
        try:
            # `firewall apply` (root) has normally done it: under the shipped unit /proc/sys is
            # read-only for us, and a write would only fail.
            if not all(accounting_state(self.netns).values()):
                enable_accounting(self.netns)
        except OSError as exc:  # rows still come; only their byte counts may be missing
            self.last_error = f"conntrack accounting: {exc}"
            print(f"dnsguard: cannot turn on conntrack accounting (net.netfilter.nf_conntrack_acct), "
                  f"connections may be recorded without byte counts: {exc}", file=sys.stderr, flush=True)
        events = CtSocket((GROUP_NEW, GROUP_UPDATE, GROUP_DESTROY), netns=self.netns, rcvbuf=self.rcvbuf)
        try:
            query = CtSocket(netns=self.netns, rcvbuf=1 << 22)
        except BaseException:
            events.close()
            raise
        db = sqlite3.connect(self.database, timeout=5.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            ensure_connections_table(db)
        finally:
            db.close()
        self._events, self._query = events, query
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="conntrack-recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (it writes what it has) and close the sockets."""
        if self._thread is None:
            return
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1
        for sock in (self._events, self._query):
            if sock is not None:
                sock.close()
        self._events = self._query = None

    close = stop

    def __enter__(self) -> ConnRecorder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def _overflow_changed(self) -> bool:
        return (self.dropped, self.overruns) != self._saved_overflow

    @property
    def open_flows(self) -> int:
        return len(self._flows)

    # -- the thread
    def _run(self) -> None:
        assert self._events is not None and self._query is not None
        db = sqlite3.connect(self.database, timeout=5.0)
        db.execute("PRAGMA synchronous=NORMAL")
        sel = selectors.DefaultSelector()
        sel.register(self._events.sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        if self.control is not None:
            sel.register(self.control[0], selectors.EVENT_READ)
        try:
            self._adopt(db)
            next_refresh = time.monotonic() + self.refresh
            next_flush = time.monotonic() + FLUSH_INTERVAL
            failing = 0
            while not self._stopping:
                try:
                    next_refresh, next_flush = self._step(db, sel, next_refresh, next_flush)
                    failing = 0
                except OSError as exc:
                    # A dump or a request that failed (ENOBUFS under a burst, a netlink hiccup):
                    # counted, then a resync dump recovers every flow still in the table.
                    failing += 1
                    if exc.errno == errno.ENOBUFS:
                        self.overruns += 1
                    else:
                        self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if failing > ERRORS_IN_A_ROW_MAX:
                        raise
                    if failing == 1:
                        print(f"dnsguard: connection recorder: {self.last_error}; resynchronising",
                              file=sys.stderr, flush=True)
                    self._resync = True
                    next_refresh = time.monotonic()
                    select.select([self._wake_r], [], [], min(0.05 * 2 ** failing, 5.0))
            self._read_events()
            self._flush(db)
        except Exception as exc:  # noqa: BLE001 - the recorder must say why it stopped
            self.last_error = f"{type(exc).__name__}: {exc}"
            print(f"dnsguard: connection recorder stopped: {self.last_error}", file=sys.stderr, flush=True)
        finally:
            sel.close()
            db.close()

    def _step(self, db: sqlite3.Connection, sel: selectors.BaseSelector, next_refresh: float,
              next_flush: float) -> tuple[float, float]:
        """One turn of the loop: wait, read events, complete closed flows, dump, flush."""
        now = time.monotonic()
        due = next_refresh
        if self._dirty or self._overflow_changed:
            due = min(due, next_flush)
        if self._closing:
            due = min(due, self._closing[0].get_due or now)
        sel.select(max(0.0, due - now))
        self._read_events()
        now = time.monotonic()
        if self._closing and (self._closing[0].get_due or 0) <= now:
            self._finish_closing(now)
        if self._resync or now >= next_refresh:
            self._resync = False
            self._dump()
            next_refresh = time.monotonic() + self.refresh
        if (self._dirty or self._overflow_changed) and (now >= next_flush or len(self._dirty) >= FLUSH_ROWS):
            self._flush(db)
            next_flush = time.monotonic() + FLUSH_INTERVAL
        return next_refresh, next_flush

    def _read_events(self) -> None:
        assert self._events is not None
        if self.control is not None and not self.control[1]():
            self._stopping = True
        sock = self._events.sock
        for _ in range(256):  # then give the timers a turn
            try:
                buf = sock.recv(1 << 17, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    self._resync = True
                    continue
                raise
            for item in parse_messages(buf):
                if not isinstance(item, int):
                    self._event(item, time.time())

    def _event(self, e: CtEntry, now: float) -> None:
        key = e.key
        flow = self._flows.get(key)
        if e.kind == "destroy":
            self._declined.pop(key, None)
            self._finished.pop(key, None)
            if flow is not None:
                del self._flows[key]
                if flow.end_ts is None:
                    flow.end_ts = now
                if e.bytes_out is not None:
                    flow.counters = _counters(e)
                flow.get_due = None
                self._dirty[id(flow)] = flow
            return
        if flow is None:
            flow = self._follow(e, now)
            if flow is None:
                return
        if e.tcp_state in CLOSING_STATES and flow.end_ts is None:
            self._close(flow, now)

    def _close(self, flow: _Flow, now: float) -> None:
        """A TCP flow closed (FIN both ways, or RST): its row completes after one more read."""
        flow.end_ts = now
        flow.get_due = time.monotonic() + self.close_delay
        self._closing.append(flow)

    def _follow(self, e: CtEntry, now: float) -> _Flow | None:
        verdict = _verdict(e.mark)
        if verdict is None:
            return None
        e.resolve()
        if e.key in self._declined or e.key in self._finished:
            return None
        if len(self._flows) >= self.max_open:
            self.dropped += 1
            if len(self._declined) < DECLINED_MAX:
                self._declined[e.key] = None
            return None
        name = lookup_name(self.name_of, e.dst)
        client, rule = self._describe(e.src, e.dst, name, verdict == "allowed")
        ts = e.start_ns / 1e9 if e.start_ns else now
        flow = _Flow(e.key, None, ts, e.family, e.proto, e.src, e.dst, e.sport, e.dport, verdict, name,
                     client, rule, e.raw_orig)
        if e.bytes_out is not None:
            flow.counters = _counters(e)
        self._flows[e.key] = flow
        self._dirty[id(flow)] = flow
        return flow

    def _describe(self, src: str, dst: str, name: str | None, allowed: bool) -> tuple:
        if self.describe is not None:
            try:
                return self.describe(src, dst, name, allowed)
            except Exception as exc:  # noqa: BLE001 - a policy problem must not lose the row
                self.last_error = f"describe: {exc}"
        return None, None

    def _finish_closing(self, now: float) -> None:
        """Complete the rows of closed TCP flows: read their counters, then mark them done so
        conntrack stops showing them to us (dumps filter on the mark; their events carry it)."""
        assert self._query is not None
        due = [f for f in self._closing if f.get_due is not None and f.get_due <= now]
        self._closing = [f for f in self._closing if f.get_due is not None and f.get_due > now]
        for i in range(0, len(due), 500):
            chunk = due[i:i + 500]
            finished = self._finished
            for f in chunk:
                f.get_due = None
                self._dirty[id(f)] = f  # end_ts, even if the entry is gone (DESTROY brought counters)
                if self._flows.pop(f.key, None) is not None:
                    finished[f.key] = None
            while len(finished) > FINISHED_MAX:
                del finished[next(iter(finished))]
            fresh = self._query.finish_many([(f.family, f.raw_orig) for f in chunk], MARK_DONE, MARK_MASK)
            by_tuple = {e.raw_orig: e for e in fresh}
            for f in chunk:
                e = by_tuple.get(f.raw_orig)
                if e is not None and e.bytes_out is not None:
                    f.counters = _counters(e)

    def _dump(self) -> None:
        assert self._query is not None
        now = time.time()
        seen: set[tuple] = set()
        for mark in (MARK_ALLOWED, MARK_AUDIT):
            for e in self._query.dump(mark, MARK_MASK):
                key = e.key
                seen.add(key)
                flow = self._flows.get(key)
                if flow is None:
                    flow = self._follow(e, now)
                    if flow is None:
                        continue
                if e.bytes_out is not None and flow.counters != _counters(e):
                    flow.counters = _counters(e)
                    self._dirty[id(flow)] = flow
                if e.tcp_state in CLOSING_STATES and flow.end_ts is None:
                    self._close(flow, now)
        self.dumps += 1
        for key in [k for k in self._declined if k not in seen]:
            del self._declined[key]
        # Gone from the table without a DESTROY we read (lost in an overrun): complete them now.
        for key in [k for k in self._flows if k not in seen]:
            flow = self._flows.pop(key)
            if flow.end_ts is None:
                flow.end_ts = now
            flow.get_due = None
            self._dirty[id(flow)] = flow
        self._closing = [f for f in self._closing if f.get_due is not None]

    def _adopt(self, db: sqlite3.Connection) -> None:
        """Take over the open rows of an earlier run: still in the table -> followed, else closed."""
        rows = db.execute("SELECT rowid, source, destination, source_port, port, protocol FROM connections "
                          "WHERE end_ts IS NULL AND verdict IN ('allowed', 'would-block')").fetchall()
        open_rows = {(r[1], r[2], r[3], r[4], r[5]): r[0] for r in rows}
        self._dump()
        if open_rows:
            for flow in self._flows.values():
                rowid = open_rows.pop((flow.src, flow.dst, flow.sport, flow.dport,
                                       PROTOCOLS.get(flow.proto, str(flow.proto))), None)
                if rowid is not None:
                    flow.rowid = rowid
            if open_rows:
                db.executemany("UPDATE connections SET end_ts = ? WHERE rowid = ?",
                               [(time.time(), rowid) for rowid in open_rows.values()])
                db.commit()

    def _flush(self, db: sqlite3.Connection) -> None:
        flows = list(self._dirty.values())
        self._dirty.clear()
        for f in flows:  # an unnamed flow looks again (see the module's docstring)
            if f.name is None and (name := lookup_name(self.name_of, f.dst)) is not None:
                f.name = name
                f.client, f.rule = self._describe(f.src, f.dst, name, f.verdict == "allowed")
        overflow = (self.dropped, self.overruns)
        for attempt in range(3):
            new: list[tuple[_Flow, int]] = []
            try:
                cur = db.cursor()
                for f in flows:
                    if f.rowid is None:
                        cur.execute(_INSERT, f.row())
                        new.append((f, cur.lastrowid))  # type: ignore[arg-type]
                cur.executemany(_UPDATE, [(f.written_end, *f.counters, f.name, f.client, f.rule, f.rowid)
                                          for f in flows if f.rowid is not None])
                if overflow != self._saved_overflow:
                    db.execute("INSERT INTO connection_overflow (ts, dropped, overruns) VALUES (?, ?, ?)",
                               (time.time(), overflow[0] - self._saved_overflow[0],
                                overflow[1] - self._saved_overflow[1]))
                db.commit()
            except sqlite3.Error as exc:
                self.last_error = f"sqlite: {exc}"
                if db.in_transaction:
                    db.rollback()
                if attempt < 2:
                    time.sleep(0.1 * (attempt + 1))
                    continue
                # Rows never written are counted once and their flows let go: a later update
                # must not insert them after all (they would be counted and recorded).
                for f in flows:
                    if f.rowid is None:
                        self.dropped += 1
                        if self._flows.pop(f.key, None) is not None and len(self._declined) < DECLINED_MAX:
                            self._declined[f.key] = None
                return
            for f, rowid in new:
                f.rowid = rowid
            self.inserted += len(new)
            self._saved_overflow = overflow
            return
