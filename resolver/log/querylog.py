"""The lookup log: every query, written to SQLite off the hot path, never lost silently.

Producer side (the event loop) calls :meth:`QueryLog.submit` once per query. That is a
length check and a ``deque.append`` -- no lock, no disk, no ``Event.set`` -- so logging
costs the DNS path well under a microsecond whatever state the database is in.

Consumer side is ONE writer thread that drains the deque in batched transactions
(``executemany``, WAL, ``synchronous=NORMAL``). When it is idle it polls with a short
wait instead of being woken per record. When the database cannot be written (disk full,
locked by someone else, unwritable path) it prints one line to stderr per episode, keeps
the records it holds plus everything queued up to ``queue_max`` (beyond that they are
counted in :attr:`QueryLog.overflow` and the count is persisted later), and retries
with backoff until it can write again.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`; see the README's "Lookup log" section)
----------------------------------------------------------------------------------------
Inserting into a table with TEXT indexes costs ~12 µs/row against ~2 µs/row with
integer ones, so names, clients and rules are normalised into lookup tables and the
base table ``lookup_rows`` holds only integers, reals and the rarely-present texts:

* ``names(id, name UNIQUE)``        presentation names (lower case, no trailing dot)
* ``clients(id, addr UNIQUE)``      source IP addresses
* ``rules(id, rule UNIQUE)``        policy entries that decided
* ``rrtypes(code, mnemonic)``       dnspython's type table, so qtype reads as ``AAAA``
* ``lookup_rows``                   ts REAL epoch UTC, client_id, transport (0 udp, 1 tcp),
                                    name_id, qtype (int), verdict (1 allow, 0 deny, NULL
                                    malformed), mode (0 enforce, 1 audit), rule_id, rcode (int,
                                    NULL = no reply sent), answers (JSON text), cached (0/1),
                                    latency_ms, note
* ``log_overflow(ts, dropped)``     one row per time the queue bound discarded records
* ``log_size_drops(ts, dropped)``   one row per chunk of oldest rows deleted for ``max_size_mb``
* ``connections``                   (issue #5) ts, source, destination, protocol, port, verdict, name
* VIEW ``lookups``                  the contract columns, decoded: id, ts (REAL), time (ISO
                                    8601 UTC text, ms), client, transport, qname, qtype
                                    (mnemonic), verdict, mode, rule, rcode (mnemonic such as
                                    ``NOERROR``/``NXDOMAIN``; NULL = dropped), answers, cached,
                                    latency_ms, note

"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

from resolver.core.logdb import MODE_CODES, TRANSPORT_CODES, VERDICT_CODES
from resolver.core.names import wire_to_text
from resolver.log.schema import (
    _CHUNK_ROWS,
    _INSERT_ROW,
    _MARK_SQL,
    _RECORD_LEN,
    _ROLLUP_UPSERT,
    _TS_MAX,
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    ID_CACHE_MAX,
    IDLE_POLL_S,
    MEMO_MAX,
    ROLLUP_NULL,
    ROLLUP_SECONDS,
    _insert_chunk_sql,
    open_for_writing,
)
from resolver.log.upkeep import SHRINK_TO, Upkeep

__all__ = ["SHRINK_TO", "QueryLog"]


# ------------------------------------------------------------------------- writer
class QueryLog(Upkeep):
    """Asynchronous, bounded, batched SQLite writer for lookup-log records.

    ``submit`` is the only method meant for the event loop. Everything else may be
    called from any thread. ``last_error`` keeps the text of the most recent write
    error (it is not cleared on recovery; ``failing`` says whether writes fail now).
    """

    def __init__(self, path: str, *, queue_max: int = 200_000, retention_days: float | None = 30,
                 batch_max: int = 5000, prune_interval: float = 60.0, batch_interval: float = 0.0,
                 max_size_mb: float | None = None,
                 namer: Callable[[str], str | None] | None = None) -> None:
        self.path = str(path)
        self.max_bytes = int(max_size_mb * 1024 * 1024) if max_size_mb else 0
        self.size_dropped = 0
        self._shrinking = False
        self._next_size_check = 0.0
        self.queue_max = queue_max
        self.retention_days = retention_days
        self.batch_max = batch_max
        self.prune_interval = prune_interval
        self.batch_interval = batch_interval
        self._last_batch = 0.0
        self.overflow = 0
        self.written = 0
        self.pruned = 0
        self.bad_records = 0
        self.last_error: str | None = None
        self.failing = False
        self._q: deque[tuple] = deque()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closing = False
        self._deadline = float("inf")
        self._busy = False  # writer holds records that are not yet committed
        self._conn: sqlite3.Connection | None = None
        self._names: dict[Any, int] = {}
        self._clients: dict[str, int] = {}
        self._rules: dict[str, int] = {}
        # Client names (schema 3): address -> name, asked once per client per batch.
        self.namer = namer
        self._client_addrs: dict[int, str] = {}
        self._labels: dict[int, str | None] = {}
        # (client .. rcode) of a record -> its columns; see _convert.
        self._memo: dict[tuple, tuple[tuple, tuple, int]] = {}
        self._combos = 0  # serial number of each mapping, so a batch's counts key on a small int
        self._chunk = (_CHUNK_ROWS, _insert_chunk_sql(_CHUNK_ROWS))
        self._overflow_saved = 0
        self._next_prune = 0.0

    # -- hot path -------------------------------------------------------------
    def submit(self, record: tuple) -> None:
        """Queue one record (``resolver.model.LOG_FIELDS`` order). O(1); never blocks."""
        if len(self._q) < self.queue_max:
            self._q.append(record)
        else:
            self.overflow += 1

    def submit_many(self, records: Sequence[tuple]) -> None:
        """Queue records in bulk (the writer process's feed). Wakes the writer once a full
        batch is waiting, so throughput is never capped by the idle poll."""
        room = self.queue_max - len(self._q)
        if len(records) <= room:
            self._q.extend(records)
        else:
            self._q.extend(records[:max(room, 0)])
            self.overflow += len(records) - max(room, 0)
        if len(self._q) >= self.batch_max:
            self._wake.set()

    def configure(self, retention_days: float | None, max_size_mb: float | None, queue_max: int) -> None:
        """New bounds (a policy reload); the next writer turn prunes and checks the size."""
        self.retention_days = retention_days or None
        self.max_bytes = int(max_size_mb * 1024 * 1024) if max_size_mb else 0
        self.queue_max = queue_max
        self._next_prune = 0.0
        self._next_size_check = 0.0
        self._wake.set()

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Start the writer thread. Never raises for database trouble: that is retried."""
        if self._thread is not None:
            return
        # Daemon so a crashed server still exits; the orderly path is close().
        self._thread = threading.Thread(target=self._run, name="dnsguard-querylog", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> bool:
        """Write everything queued, then stop the writer. Returns True if nothing was lost.

        If the database stays unwritable, gives up after ``timeout`` seconds and says on
        stderr how many records were not written.
        """
        if self._thread is None:
            if not self._q:
                return True
            self.start()  # records were submitted before start(): still write them
        assert self._thread is not None
        self._deadline = time.monotonic() + timeout
        self._closing = True
        self._wake.set()
        self._thread.join(timeout + 2.0)
        return not self._thread.is_alive() and not self._q and not self._busy

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record submitted so far is committed (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        # The writer sets _busy before it pops, so "queue empty and not busy" cannot be
        # observed while records are in flight.
        while self._q or self._busy:
            if time.monotonic() >= deadline or (self._thread is None or not self._thread.is_alive()):
                return False
            time.sleep(0.005)
        return True

    @property
    def queued(self) -> int:
        return len(self._q)

    # -- writer thread --------------------------------------------------------
    def _say(self, message: str) -> None:
        try:
            print(f"dnsguard: lookup log {self.path}: {message}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # stderr closed: nothing better to do, and never kill the writer for it

    def _fail(self, exc: BaseException, what: str) -> None:
        text = f"{what}: {exc}"
        self.last_error = text
        if not self.failing:
            # Say it before raising the flag: whoever waits on `failing` finds the line written.
            self._say(f"{text} -- keeping up to {self.queue_max} records queued "
                      f"(beyond that they are counted and dropped) and retrying")
            self.failing = True
        # Start the next attempt from a fresh connection: after disk-full or I/O errors a
        # connection's state is not worth trusting, and reopening is cheap next to backoff.
        if self._conn is not None:
            try:
                if self._conn.in_transaction:
                    self._conn.rollback()
            except sqlite3.Error:
                pass
            self._drop_connection()

    def _recovered(self) -> None:
        if self.failing:
            self.failing = False
            self._say(f"writing again ({len(self._q)} records still queued)")

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        # Ids cached for a connection may not match a file that was replaced meanwhile.
        self._names.clear()
        self._clients.clear()
        self._rules.clear()
        self._memo.clear()
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _wait(self, seconds: float) -> None:
        if self._closing:
            seconds = min(seconds, max(0.0, self._deadline - time.monotonic()))
            time.sleep(seconds)  # _wake stays set once closing; Event.wait would not wait
        else:
            self._wake.wait(seconds)

    def _run(self) -> None:
        pending: list[tuple] = []
        backoff = BACKOFF_START_S
        while True:
            if not pending:
                self._busy = True
                q = self._q
                n = min(len(q), self.batch_max)
                popleft = q.popleft
                pending = [popleft() for _ in range(n)]
                if pending:
                    self._last_batch = time.monotonic()
                else:
                    self._busy = False
            stuck = False
            if self._conn is None:
                try:
                    self._conn = open_for_writing(self.path)
                    limit = self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _RECORD_LEN
                    if min(limit, _CHUNK_ROWS) != self._chunk[0]:
                        size = max(1, min(limit, _CHUNK_ROWS))
                        self._chunk = (size, _insert_chunk_sql(size))
                except Exception as exc:  # sqlite3/OS errors, or sqlite-utils' own: retried alike
                    self._fail(exc, "cannot open")
                    stuck = True
            if not stuck and self._conn is not None:
                try:
                    if pending:
                        self._write(pending)
                        pending = []
                        self._recovered()  # before _busy drops, so flush() never sees a stale failing
                        self._busy = False
                    self._housekeeping()
                    self._recovered()
                    backoff = BACKOFF_START_S
                except (sqlite3.Error, OSError) as exc:
                    self._fail(exc, "cannot write")
                    stuck = True
                except Exception as exc:  # a bug must not kill the thread and silently stop logging
                    self._fail(exc, f"unexpected {type(exc).__name__}")
                    stuck = True
            if stuck:
                if self._closing and time.monotonic() >= self._deadline:
                    lost = len(pending) + len(self._q)
                    if lost:
                        self._say(f"gave up at exit: {lost} records not written")
                    break
                self._wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if not pending:
                if self._q:
                    # Under load, gather: a part-full batch waits out the rest of batch_interval.
                    # Bigger transactions add each (hour, key) count once for many rows and pay
                    # the commit once; a full batch wakes the writer (submit_many) at once.
                    wait = 0.0 if self._closing or len(self._q) >= self.batch_max else (
                        self._last_batch + self.batch_interval - time.monotonic())
                elif self._closing:
                    break
                else:
                    wait = IDLE_POLL_S
                if wait > 0:
                    self._wait(wait)
                    if not self._closing:
                        self._wake.clear()
        self._drop_connection()

    def _write(self, batch: list[tuple]) -> None:
        conn = self._conn
        assert conn is not None
        new_names: dict[Any, int] = {}
        new_clients: dict[str, int] = {}
        new_rules: dict[str, int] = {}
        rollup: dict[tuple, list] = {}
        conn.execute("BEGIN IMMEDIATE")
        rows = self._convert(conn, batch, new_names, new_clients, new_rules, rollup)
        # Whole chunks through one multi-row INSERT (a third cheaper per row than executemany,
        # which steps and resets the statement once per row); the rest row by row.
        size, sql = self._chunk
        whole = len(rows) - len(rows) % size
        for i in range(0, whole, size):
            conn.execute(sql, list(chain.from_iterable(rows[i:i + size])))
        if whole < len(rows):
            conn.executemany(_INSERT_ROW, rows[whole:])
        conn.execute(_MARK_SQL)
        # The batch's rows and their counts commit together: the rollup never disagrees with them.
        conn.executemany(_ROLLUP_UPSERT, [(*key, *agg) for key, agg in rollup.items()])
        labels = self._label(conn, rollup) if self.namer is not None else {}
        conn.commit()
        if len(self._labels) + len(labels) > ID_CACHE_MAX:
            self._labels.clear()  # a miss reads the open label back from the table
        self._labels.update(labels)
        # Ids minted inside the transaction are only real once it has committed.
        for cache, new in ((self._names, new_names), (self._clients, new_clients),
                           (self._rules, new_rules)):
            if len(cache) + len(new) > ID_CACHE_MAX:
                cache.clear()
            cache.update(new)
        self.written += len(batch)

    def _convert(self, conn: sqlite3.Connection, batch: Sequence[tuple], new_names: dict,
                 new_clients: dict, new_rules: dict, rollup: dict[tuple, list]) -> list[tuple]:
        """Records -> ``lookup_rows`` tuples, and the batch's per-hour counts into ``rollup``.

        This loop is most of the writer's Python time, so a record's middle fields (client ..
        rcode: few distinct combinations in any log) are mapped once per combination, and
        each row is then two tuple concatenations and a dict update.
        """
        memo = self._memo
        if len(memo) > MEMO_MAX:
            memo.clear()
            self._client_addrs.clear()  # refilled by the memo misses that follow
        bucket = ROLLUP_SECONDS
        hours: dict[tuple, list] = {}
        out = []
        for rec in batch:
            try:
                if len(rec) != _RECORD_LEN:
                    raise ValueError(f"{len(rec)} fields, not {_RECORD_LEN}")
                ts = float(rec[0])
                if not 0.0 <= ts < _TS_MAX:  # also NaN; an hour past SQLite's integers would wedge
                    raise ValueError(f"timestamp {ts}")
                middle = rec[1:9]
                mapped = memo.get(middle)
                if mapped is None:
                    mapped = self._map(conn, middle, new_names, new_clients, new_rules)
                    if not (new_names or new_clients or new_rules):
                        memo[middle] = mapped  # ids minted in this transaction are not final yet
                row = (ts,) + mapped[0] + rec[9:]
                key = (ts // bucket, mapped[2])  # two numbers: cheaper to hash than the record fields
            except (TypeError, ValueError, IndexError, KeyError, AttributeError, OverflowError) as exc:
                # One malformed record must not wedge the queue behind it forever.
                self.bad_records += 1
                self.last_error = f"bad record skipped: {exc}"
                continue
            out.append(row)
            agg = hours.get(key)
            if agg is None:
                hours[key] = [1, ts, ts, mapped[1]]
            else:
                agg[0] += 1
                if ts < agg[1]:
                    agg[1] = ts
                elif ts > agg[2]:
                    agg[2] = ts
        for (hour, _), (n, first, last, tail) in hours.items():
            key = (int(hour), *tail)
            agg = rollup.get(key)
            if agg is None:
                rollup[key] = [n, first, last]
            else:  # two combinations that differ only in transport or qtype
                agg[0] += n
                agg[1] = min(agg[1], first)
                agg[2] = max(agg[2], last)
        return out

    def _label(self, conn: sqlite3.Connection, rollup: dict[tuple, list]) -> dict[int, str | None]:
        """Open or close ``client_labels`` intervals for the batch's clients whose name changed;
        returns every batch client's name, for the cache once the transaction has committed."""
        firsts: dict[int, float] = {}
        for key, agg in rollup.items():
            cid = key[4]
            if cid != ROLLUP_NULL and (cid not in firsts or agg[1] < firsts[cid]):
                firsts[cid] = agg[1]
        names: dict[int, str | None] = {}
        namer = self.namer
        assert namer is not None
        for cid, first in firsts.items():
            addr = self._client_addrs.get(cid)
            if addr is None:
                continue
            name = namer(addr)
            if cid in self._labels:
                current = self._labels[cid]
            else:
                row = conn.execute("SELECT name FROM client_labels WHERE client_id = ? AND until IS NULL "
                                   "ORDER BY since DESC LIMIT 1", (cid,)).fetchone()
                current = row[0] if row else None
            if current != name:
                conn.execute("UPDATE client_labels SET until = ? WHERE client_id = ? AND until IS NULL",
                             (first, cid))
                if name is not None:
                    conn.execute("INSERT INTO client_labels (client_id, name, since) VALUES (?, ?, ?)",
                                 (cid, name, first))
            names[cid] = name
        return names

    def _map(self, conn: sqlite3.Connection, middle: tuple, new_names: dict, new_clients: dict,
             new_rules: dict) -> tuple[tuple, tuple, int]:
        """(client, transport, qname, qtype, verdict, mode, rule, rcode) -> the row's columns
        for them, the rollup key's columns (without the hour), and a serial number."""
        client, transport, qname, qtype, verdict, mode, rule, rcode = middle
        names, clients, rules = self._names, self._clients, self._rules
        nid = cid = rid = None
        if qname is not None:
            nid = names.get(qname) or new_names.get(qname)
            if nid is None:
                nid = new_names[qname] = self._intern(conn, "names", "name", _name_text(qname))
        if client is not None:
            cid = clients.get(client) or new_clients.get(client)
            if cid is None:
                cid = new_clients[client] = self._intern(conn, "clients", "addr", str(client))
            self._client_addrs[cid] = str(client)
        if rule is not None:
            rid = rules.get(rule) or new_rules.get(rule)
            if rid is None:
                rid = new_rules[rule] = self._intern(conn, "rules", "rule", str(rule))
        for what, code in (("qtype", qtype), ("rcode", rcode)):
            if code is not None and not (isinstance(code, int) and 0 <= code <= 0xFFFF):
                raise ValueError(f"{what} {code!r}")
        v = VERDICT_CODES.get(verdict)
        m = MODE_CODES.get(mode)
        none = ROLLUP_NULL
        columns = (cid, TRANSPORT_CODES.get(transport), nid, qtype, v, m, rid, rcode)
        key = tuple(none if x is None else x for x in (nid, v, m, cid, rid, rcode))
        self._combos += 1
        return columns, key, self._combos

    @staticmethod
    def _intern(conn: sqlite3.Connection, table: str, column: str, value: str) -> int:
        row = conn.execute(f"SELECT id FROM {table} WHERE {column} = ?", (value,)).fetchone()
        if row is not None:
            return row[0]
        return conn.execute(f"INSERT INTO {table} ({column}) VALUES (?)", (value,)).lastrowid


def _name_text(qname: bytes | str) -> str:
    if isinstance(qname, bytes | bytearray):
        return wire_to_text(bytes(qname).lower())
    # Tolerate text from callers that already decoded the name.
    text = str(qname).lower()
    if text.endswith(".") and text != "." and not text.endswith("\\."):
        text = text[:-1]
    return text or "."
