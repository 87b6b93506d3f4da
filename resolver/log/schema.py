"""The lookup log's schema: tables, the decoding ``lookups`` view, the per-hour rollup and
the migrations that bring an older log to ``SCHEMA_VERSION`` in place. The table layout
and why it is normalised: ``resolver.log.querylog``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import dns.rcode
import dns.rdatatype
from sqlite_utils import Database

from resolver.core.logdb import MODE_CODES, TRANSPORT_CODES, VERDICT_CODES, ensure_connections_table
from resolver.core.model import LOG_FIELDS

SCHEMA_VERSION = 6

# How long one SQLite call may wait for a lock. Python's default is 5 s, which would
# leave the writer deaf to close() and to its own backoff for that long.
BUSY_TIMEOUT_S = 0.05
# Idle poll period: the price of not signalling the writer per record is up to this
# much delay before a quiet query reaches the disk.
IDLE_POLL_S = 0.05
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0
PRUNE_CHUNK = 5000
# Cap on each name/client/rule -> id cache. A client looking up millions of unique
# names (tunnelling, scanners) must not grow the writer without bound; after a reset
# misses are answered by the UNIQUE index.
ID_CACHE_MAX = 500_000
# Cap on the record-combination memo (see QueryLog._convert): ~250 bytes an entry.
MEMO_MAX = 50_000

# Report aggregation key: ``lookup_rollup`` holds one row per hour and key with its count.
ROLLUP_COLUMNS = ("name_id", "verdict", "mode", "client_id", "rule_id", "rcode")
ROLLUP_SECONDS = 3600
# lookup_rollup is keyed by its columns (an upsert target) and SQLite's UNIQUE treats NULLs
# as distinct, so a NULL key column (default deny has no rule, a malformed packet no name)
# is stored as this value there; readers map it back with nullif().
ROLLUP_NULL = -1


def _case(column: str, mapping: dict[str, int]) -> str:
    arms = " ".join(f"WHEN {code} THEN '{text}'" for text, code in mapping.items())
    return f"CASE {column} {arms} END"


def _rcode_case(column: str) -> str:
    arms = " ".join(f"WHEN {int(rc)} THEN '{rc.name}'" for rc in dns.rcode.Rcode)
    # NULL (no reply sent) falls through to ELSE, where 'RCODE' || NULL is NULL.
    return f"CASE {column} {arms} ELSE 'RCODE' || {column} END"


_VIEW_HEAD = """SELECT r.id AS id,
  r.ts AS ts,
  strftime('%Y-%m-%dT%H:%M:%fZ', r.ts, 'unixepoch') AS time,
  c.addr AS client,
"""
# Schema 3: who the client was when it asked (a container's name, ``user:NAME``), from the
# label the writer held for that address at that time.
_CLIENT_NAME = """  (SELECT l.name FROM client_labels l WHERE l.client_id = r.client_id AND l.since <= r.ts
     AND (l.until IS NULL OR r.ts < l.until) ORDER BY l.since DESC LIMIT 1) AS client_name,
"""
_VIEW_TAIL = f"""  {_case('r.transport', TRANSPORT_CODES)} AS transport,
  n.name AS qname,
  CASE WHEN r.qtype IS NULL THEN NULL ELSE coalesce(t.mnemonic, 'TYPE' || r.qtype) END AS qtype,
  {_case('r.verdict', VERDICT_CODES)} AS verdict,
  {_case('r.mode', MODE_CODES)} AS mode,
  u.rule AS rule,
  {_rcode_case('r.rcode')} AS rcode,
  r.answers AS answers,
  r.cached AS cached,
  r.latency_ms AS latency_ms,
  r.note AS note
FROM lookup_rows r
LEFT JOIN clients c ON c.id = r.client_id
LEFT JOIN names n ON n.id = r.name_id
LEFT JOIN rrtypes t ON t.code = r.qtype
LEFT JOIN rules u ON u.id = r.rule_id"""
LOOKUPS_VIEW_SQL_V1 = _VIEW_HEAD + _VIEW_TAIL
LOOKUPS_VIEW_SQL = _VIEW_HEAD + _CLIENT_NAME + _VIEW_TAIL

_RECORD_LEN = len(LOG_FIELDS)
_TS_MAX = 1e11  # seconds since 1970: the year 5138
_INSERT_ROW = (
    "INSERT INTO lookup_rows (ts, client_id, transport, name_id, qtype, verdict, mode, rule_id,"
    " rcode, answers, cached, latency_ms, note) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
# Rows per multi-row INSERT, at most; fewer where the SQLite build allows fewer bound
# parameters per statement (999 before 3.32, and any build may lower it).
_CHUNK_ROWS = 1000


def _insert_chunk_sql(rows: int) -> str:
    return _INSERT_ROW.split(" VALUES ")[0] + " VALUES " + ",".join(
        ["(" + ",".join("?" * _RECORD_LEN) + ")"] * rows)


# ------------------------------------------------------------------------- schema
def _migrate_to_1(db: Database) -> None:
    db["names"].create({"id": int, "name": str}, pk="id", not_null={"name"}, if_not_exists=True)
    db["names"].create_index(["name"], unique=True, if_not_exists=True)
    db["clients"].create({"id": int, "addr": str}, pk="id", not_null={"addr"}, if_not_exists=True)
    db["clients"].create_index(["addr"], unique=True, if_not_exists=True)
    db["rules"].create({"id": int, "rule": str}, pk="id", not_null={"rule"}, if_not_exists=True)
    db["rules"].create_index(["rule"], unique=True, if_not_exists=True)
    db["rrtypes"].create({"code": int, "mnemonic": str}, pk="code", if_not_exists=True)
    db["lookup_rows"].create(
        {
            "id": int, "ts": float, "client_id": int, "transport": int, "name_id": int,
            "qtype": int, "verdict": int, "mode": int, "rule_id": int, "rcode": int,
            "answers": str, "cached": int, "latency_ms": float, "note": str,
        },
        pk="id",
        not_null={"ts"},
        foreign_keys=[
            ("client_id", "clients", "id"),
            ("name_id", "names", "id"),
            ("rule_id", "rules", "id"),
        ],
        if_not_exists=True,
    )
    # (Schema 1 as it shipped; schema 2 drops all but the ts index.)
    # Integer-only indexes (cheap to maintain on insert), each led by what a report
    # filters on and ending in ts so a window is a range scan inside it.
    rows = db["lookup_rows"]
    rows.create_index(["ts"], "ix_lookup_rows_ts", if_not_exists=True)
    rows.create_index(["client_id", "ts"], "ix_lookup_rows_client_ts", if_not_exists=True)
    rows.create_index(["verdict", "ts"], "ix_lookup_rows_verdict_ts", if_not_exists=True)
    # Led by name_id, so it serves name filters, and covering in GROUP BY order, so a report
    # over a large share of the log aggregates by scanning it instead of through SQLite's
    # sorter (~4x faster). A fifth index would cost the writer ~30%, so this one replaces
    # a plain (name_id, ts).
    rows.create_index(list(ROLLUP_COLUMNS) + ["ts"], "ix_lookup_rows_rollup", if_not_exists=True)
    db["log_overflow"].create({"ts": float, "dropped": int}, not_null={"ts", "dropped"},
                              if_not_exists=True)
    db["connections"].create(
        {"id": int, "ts": float, "source": str, "destination": str, "protocol": str,
         "port": int, "verdict": str, "name": str},
        pk="id", not_null={"ts"}, if_not_exists=True,
    )
    db["connections"].create_index(["ts"], "ix_connections_ts", if_not_exists=True)
    db.create_view("lookups", LOOKUPS_VIEW_SQL_V1, replace=True)


_ROLLUP_UPSERT = (
    "INSERT INTO lookup_rollup (hour, name_id, verdict, mode, client_id, rule_id, rcode, n, first, last)"
    " VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (hour, name_id, verdict, mode, client_id, rule_id, rcode)"
    " DO UPDATE SET n = n + excluded.n, first = min(first, excluded.first), last = max(last, excluded.last)"
)


# The hour of ts, rounded down also for times before 1970 (SQLite 3.40 may lack floor()).
_HOUR_SQL = (f"(CAST(ts / {ROLLUP_SECONDS} AS INTEGER) - (ts < 0 AND "
             f"CAST(ts / {ROLLUP_SECONDS} AS INTEGER) * {ROLLUP_SECONDS} != ts))")


def rollup_rows_after(conn: sqlite3.Connection, after_id: int) -> None:
    """Add the rows with ``id > after_id`` to ``lookup_rollup`` and move the mark past them."""
    keys = ", ".join(f"coalesce({c}, {ROLLUP_NULL})" for c in ROLLUP_COLUMNS)
    conn.execute(
        f"INSERT INTO lookup_rollup (hour, {', '.join(ROLLUP_COLUMNS)}, n, first, last) "
        f"SELECT {_HOUR_SQL}, {keys}, count(*), min(ts), max(ts) FROM lookup_rows WHERE id > ? "
        f"GROUP BY 1, {', '.join(str(i) for i in range(2, 2 + len(ROLLUP_COLUMNS)))} "
        "ON CONFLICT (hour, name_id, verdict, mode, client_id, rule_id, rcode) DO UPDATE SET "
        "n = n + excluded.n, first = min(first, excluded.first), last = max(last, excluded.last)",
        (after_id,))
    conn.execute(_MARK_SQL)


def rebuild_rollup(conn: sqlite3.Connection) -> None:
    """Recompute ``lookup_rollup`` from ``lookup_rows`` (migration, and bulk loaders)."""
    conn.execute("DELETE FROM lookup_rollup")
    rollup_rows_after(conn, 0)


# The highest row id the rollup has counted, moved with every batch. A row above it was
# written by something that does not keep the rollup (an older dnsguard on this file):
# ensure_schema counts those when the writer next opens the log.
_MARK_SQL = "UPDATE lookup_rollup_mark SET last_id = (SELECT coalesce(max(id), 0) FROM lookup_rows)"


def _catch_up_rollup(conn: sqlite3.Connection) -> None:
    mark = conn.execute("SELECT last_id FROM lookup_rollup_mark").fetchone()[0]
    if conn.execute("SELECT coalesce(max(id), 0) FROM lookup_rows").fetchone()[0] > mark:
        conn.execute("BEGIN IMMEDIATE")
        try:
            rollup_rows_after(conn, mark)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _migrate_to_2(db: Database) -> None:
    # Schema 1 served wide report windows from a covering index over every row; it cost the
    # writer ~6 µs of its ~12 µs per row and capped the log below dnsperf's load. Schema 2
    # keeps per-hour counts instead (the writer adds a batch's counts in one upsert per
    # key), so lookup_rows needs only its append-only ts index. Reports read the rollup
    # for whole hours and raw rows for the partial hours at a window's edges.
    conn = db.conn
    conn.execute(
        "CREATE TABLE IF NOT EXISTS lookup_rollup (hour INTEGER NOT NULL, name_id INTEGER NOT NULL,"
        " verdict INTEGER NOT NULL, mode INTEGER NOT NULL, client_id INTEGER NOT NULL,"
        " rule_id INTEGER NOT NULL, rcode INTEGER NOT NULL, n INTEGER NOT NULL, first REAL NOT NULL,"
        " last REAL NOT NULL,"
        " PRIMARY KEY (hour, name_id, verdict, mode, client_id, rule_id, rcode)) WITHOUT ROWID")
    conn.execute("CREATE TABLE IF NOT EXISTS lookup_rollup_mark (last_id INTEGER NOT NULL)")
    conn.execute("INSERT INTO lookup_rollup_mark (last_id) SELECT 0 WHERE NOT EXISTS "
                 "(SELECT 1 FROM lookup_rollup_mark)")
    for index in ("ix_lookup_rows_rollup", "ix_lookup_rows_client_ts", "ix_lookup_rows_verdict_ts"):
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    rebuild_rollup(conn)


def _migrate_to_3(db: Database) -> None:
    # [log] max_size_mb: rows deleted to keep the log under its size are counted here, as
    # log_overflow counts the ones never written, so a report can say that rows are missing.
    db.conn.execute("CREATE TABLE IF NOT EXISTS log_size_drops (ts REAL NOT NULL, dropped INTEGER NOT NULL)")


def _migrate_to_4(db: Database) -> None:
    # Issue #12: every outbound connection from conntrack, with its end, ports, counters,
    # client and rule. Old rows keep NULL there; blocked rows are over when they start.
    old = {r[1] for r in db.conn.execute("PRAGMA table_info(connections)")}
    ensure_connections_table(db.conn, commit=False)
    if "end_ts" not in old:  # every row so far is an NFLOG attempt (the recorder adds end_ts)
        db.conn.execute("UPDATE connections SET end_ts = ts WHERE end_ts IS NULL")


# Subtract the counts of the rows with id <= ? from the rollup (their hour and key), so it
# keeps agreeing with the rows left; keys that reach zero go.
_ROLLUP_SUBTRACT_SQL = (
    f"INSERT INTO lookup_rollup (hour, {', '.join(ROLLUP_COLUMNS)}, n, first, last) "
    f"SELECT {_HOUR_SQL}, {', '.join(f'coalesce({c}, {ROLLUP_NULL})' for c in ROLLUP_COLUMNS)}, "
    f"-count(*), min(ts), max(ts) FROM lookup_rows WHERE id <= ? "
    f"GROUP BY 1, {', '.join(str(i) for i in range(2, 2 + len(ROLLUP_COLUMNS)))} "
    "ON CONFLICT (hour, name_id, verdict, mode, client_id, rule_id, rcode) DO UPDATE SET n = n + excluded.n")


def drop_oldest_rows(conn: sqlite3.Connection, limit: int, now: float) -> int:
    """Delete a chunk of the oldest rows -- logged lookups (and their share of the rollup) and
    finished connections alike -- and record how many in ``log_size_drops``; the caller holds
    the transaction. Returns the rows deleted (0: nothing left that may go).

    Oldest by time across both tables: each chunk goes up to the earlier of the two tables'
    ``limit``-th oldest row, so a flood of connection rows cannot push out every lookup (nor
    the other way round) -- what is kept is the most recent stretch of both. A connection still
    open is never deleted: the recorder completes its row when it closes.
    """
    lrow = conn.execute("SELECT max(id), count(*), max(ts) FROM "
                        "(SELECT id, ts FROM lookup_rows ORDER BY id LIMIT ?)", (limit,)).fetchone()
    crow = conn.execute("SELECT count(*), max(ts) FROM (SELECT ts FROM connections "
                        "WHERE end_ts IS NOT NULL ORDER BY ts LIMIT ?)", (limit,)).fetchone()
    ends = [t for n, t in ((lrow[1], lrow[2]), (crow[0], crow[1])) if n]
    if not ends:
        return 0
    cutoff = min(ends)
    lookups = 0
    if lrow[1]:
        # Rows are written in time order, so the chunk's ids up to the cutoff are its oldest.
        upto = conn.execute("SELECT max(id) FROM (SELECT id, ts FROM lookup_rows ORDER BY id LIMIT ?) "
                            "WHERE ts <= ?", (limit, cutoff)).fetchone()[0]
        if upto is not None:
            lookups, low, high = conn.execute(f"SELECT count(*), min({_HOUR_SQL}), max({_HOUR_SQL}) "
                                              "FROM lookup_rows WHERE id <= ?", (upto,)).fetchone()
            conn.execute(_ROLLUP_SUBTRACT_SQL, (upto,))
            # Only the chunk's hours can have reached zero: no scan of the whole rollup.
            conn.execute("DELETE FROM lookup_rollup WHERE hour BETWEEN ? AND ? AND n <= 0", (low, high))
            conn.execute("DELETE FROM lookup_rows WHERE id <= ?", (upto,))
    connections = conn.execute(
        "DELETE FROM connections WHERE rowid IN (SELECT rowid FROM connections "
        "WHERE end_ts IS NOT NULL AND ts <= ? ORDER BY ts LIMIT ?)", (cutoff, limit)).rowcount
    if lookups or connections:
        conn.execute("INSERT INTO log_size_drops (ts, dropped, connections) VALUES (?, ?, ?)",
                     (now, lookups, connections))
    return lookups + connections


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database file in use (pages not on the free list): what deleting rows shrinks."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return (pages - free) * conn.execute("PRAGMA page_size").fetchone()[0]


def _migrate_to_5(db: Database) -> None:
    # Names for client addresses (Docker containers, fenced users), as intervals: an address
    # is reused (a container replaced, a new one given the same IP), so a lookup's name is the
    # label whose [since, until) holds its time. Written per batch and per client by the
    # writer, never per row; the lookups view picks the label for each row.
    conn = db.conn
    conn.execute(
        "CREATE TABLE IF NOT EXISTS client_labels (client_id INTEGER NOT NULL REFERENCES clients(id),"
        " name TEXT NOT NULL, since REAL NOT NULL, until REAL)")
    conn.execute("CREATE INDEX IF NOT EXISTS ix_client_labels ON client_labels (client_id, since)")
    conn.execute("DROP VIEW IF EXISTS lookups")
    conn.execute(f"CREATE VIEW lookups AS {LOOKUPS_VIEW_SQL}")


def _migrate_to_6(db: Database) -> None:
    # [log] max_size_mb deletes finished connection rows too (oldest first, with the lookups):
    # how many, beside the lookups, so a report can say that connections are missing.
    cols = {r[1] for r in db.conn.execute("PRAGMA table_info(log_size_drops)")}
    if "connections" not in cols:
        db.conn.execute("ALTER TABLE log_size_drops ADD COLUMN connections INTEGER NOT NULL DEFAULT 0")
    # Report windows find connections by when they ended (see ensure_connections_table).
    ensure_connections_table(db.conn, commit=False)


# Index i migrates a database from user_version i to i + 1. Later issues append here
# and bump SCHEMA_VERSION.
MIGRATIONS: list[Callable[[Database], None]] = [_migrate_to_1, _migrate_to_2, _migrate_to_3,
                                                 _migrate_to_4, _migrate_to_5, _migrate_to_6]
assert len(MIGRATIONS) == SCHEMA_VERSION


def ensure_schema(conn: sqlite3.Connection) -> int:
    """Create or migrate the log schema on ``conn``; returns the version now in force.

    Each step runs in its own transaction together with the ``user_version`` bump, so a
    crash mid-migration leaves the previous version intact.
    """
    db = Database(conn, execute_plugins=False)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        # A newer dnsguard made this file; its extra tables are its business, ours still work.
        return version
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version](db)
            version += 1
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    if version == SCHEMA_VERSION:
        _catch_up_rollup(conn)
    # Refresh the type table when dnspython knows more types than it holds. Only then:
    # a write here would make every reopen fail while someone else holds the lock.
    known = [(int(t), t.name) for t in dns.rdatatype.RdataType]
    if conn.execute("SELECT count(*) FROM rrtypes").fetchone()[0] != len(known):
        conn.executemany("INSERT OR REPLACE INTO rrtypes (code, mnemonic) VALUES (?, ?)", known)
        conn.commit()
    return version


def open_for_writing(path: str, busy_timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open (creating if needed) a log database in WAL mode with the current schema."""
    conn = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        # 64 MB page cache: index pages of the recent past stay hot, so inserts rarely read.
        conn.execute("PRAGMA cache_size=-65536")
        ensure_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn


