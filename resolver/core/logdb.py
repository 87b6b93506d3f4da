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
