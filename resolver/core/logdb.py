"""The lookup log's on-disk vocabulary, shared by its writer (``resolver.log``) and its
readers (``resolver.log.report``, ``resolver.policy.learn`` and ``history``): the integer
codes stored for transport, verdict and mode, the time-window condition, and a read-only
opener that is safe while ``serve`` writes.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse

TRANSPORT_CODES = {"udp": 0, "tcp": 1}
VERDICT_CODES = {"allow": 1, "deny": 0}
MODE_CODES = {"enforce": 0, "audit": 1}


def window(since: float | None, until: float | None, column: str = "ts") -> tuple[list[str], list[object]]:
    """SQL conditions and parameters for the half-open time window ``[since, until)``."""
    cond: list[str] = []
    params: list[object] = []
    if since is not None:
        cond.append(f"{column} >= ?")
        params.append(since)
    if until is not None:
        cond.append(f"{column} < ?")
        params.append(until)
    return cond, params


def open_readonly(path: str, required_table: str, error: type[Exception], *, missing_file: str,
                  missing_table: str, timeout: float = 2.0) -> sqlite3.Connection:
    """Open a dnsguard database read-only (``mode=ro``): safe while `serve` writes to it.

    Problems are raised as ``error`` (the caller's DnsguardError subclass) with the caller's
    own wording: ``missing_file`` when there is no file, ``missing_table`` when the file has
    no ``required_table``.
    """
    if not os.path.exists(path):
        raise error(missing_file)
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    except sqlite3.Error as exc:
        raise error(f"cannot read {path}: {exc}") from None
    if required_table not in tables:
        conn.close()
        raise error(missing_table)
    return conn


# ---------------------------------------------------------------- the connections table
# Written by the fence's recorders (NFLOG: blocked attempts; conntrack: every flow it let
# through, allowed or would-block), read by reports and learn. Issue #5 shipped the first
# eight columns; `ensure_connections_table` adds the rest to an older table in place.
CONNECTION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "REAL"), ("source", "TEXT"), ("destination", "TEXT"), ("protocol", "TEXT"),
    ("port", "INTEGER"), ("verdict", "TEXT"), ("name", "TEXT"),
    ("end_ts", "REAL"), ("source_port", "INTEGER"), ("packets_out", "INTEGER"),
    ("bytes_out", "INTEGER"), ("packets_in", "INTEGER"), ("bytes_in", "INTEGER"),
    ("client", "TEXT"), ("rule", "TEXT"),
)
CONNECTION_OVERFLOW_SQL = (
    "CREATE TABLE IF NOT EXISTS connection_overflow (ts REAL NOT NULL, dropped INTEGER NOT NULL, "
    "overruns INTEGER NOT NULL)"
)
# Added later, in place like the connections columns: names the fence could not hand the
# recorder (a full pipe), so connections to those addresses may be recorded without a name.
CONNECTION_OVERFLOW_LOST_NAMES = "lost_names INTEGER NOT NULL DEFAULT 0"
# Periods when the recorder was not running (it died and `serve` restarted it): connections
# made then may be missing. ``until`` NULL: not back (yet).
CONNECTION_GAPS_SQL = ("CREATE TABLE IF NOT EXISTS connection_gaps (since REAL NOT NULL, until REAL, "
                       "reason TEXT)")


def ensure_connections_table(conn: sqlite3.Connection, commit: bool = True) -> None:
    """Create ``connections`` (and ``connection_overflow``, ``connection_gaps``) or add missing columns.

    Safe to call from any writer at any time: ADD COLUMN is idempotent here, and a column
    another writer added meanwhile is skipped.
    """
    cols = ", ".join(f"{name} {kind}" for name, kind in CONNECTION_COLUMNS)
    conn.execute(f"CREATE TABLE IF NOT EXISTS connections (id INTEGER PRIMARY KEY, {cols})")
    have = {r[1] for r in conn.execute("PRAGMA table_info(connections)")}
    for name, kind in CONNECTION_COLUMNS:
        if name not in have:
            try:
                conn.execute(f"ALTER TABLE connections ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):
                    raise
    conn.execute("CREATE INDEX IF NOT EXISTS ix_connections_ts ON connections (ts)")
    # Open rows are found by the recorder on restart and by `report connections --open`.
    conn.execute("CREATE INDEX IF NOT EXISTS ix_connections_open ON connections (end_ts) "
                 "WHERE end_ts IS NULL")
    # A report window finds the connections that began before it and ended inside it.
    conn.execute("CREATE INDEX IF NOT EXISTS ix_connections_end ON connections (end_ts)")
    conn.execute(CONNECTION_OVERFLOW_SQL)
    if "lost_names" not in {r[1] for r in conn.execute("PRAGMA table_info(connection_overflow)")}:
        try:
            conn.execute(f"ALTER TABLE connection_overflow ADD COLUMN {CONNECTION_OVERFLOW_LOST_NAMES}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise
    conn.execute(CONNECTION_GAPS_SQL)
    if commit and conn.in_transaction:
        conn.commit()
