"""Policy history: every policy `serve` loads is kept in the lookup-log database.

Table ``policies`` (created here when missing, next to the lookup log's tables)::

    id INTEGER PRIMARY KEY, ts REAL (epoch seconds, UTC), sha256 TEXT, path TEXT, content TEXT

``serve`` calls :func:`record_policy` at start and after every accepted reload; loading
the same content again right after itself adds no row. ``dnsguard policy history``
lists the versions with how many lookups each one denied, ``policy show N`` prints
one, and ``policy rollback N`` writes version N back to the policy file -- byte for
byte, atomically (temporary file + rename), keeping the current file as
``PATH.bak-<UTC timestamp>`` -- where the running server's file watcher (or a SIGHUP)
picks it up like any other edit.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from resolver.core.errors import DnsguardError, PolicyError
from resolver.core.logdb import VERDICT_CODES, open_readonly
from resolver.policy.config import parse_config

# record_policy runs on serve's event loop (start and reload): it must never stall DNS
# for long, so a busy database costs at most this much before the record is given up.
RECORD_BUSY_TIMEOUT_S = 0.25

CREATE_SQL = ("CREATE TABLE IF NOT EXISTS policies (id INTEGER PRIMARY KEY, ts REAL, sha256 TEXT, "
              "path TEXT, content TEXT)")


class HistoryError(DnsguardError):
    """A history request that cannot be served (no database, no such version, bad file)."""


@dataclass(frozen=True)
class Version:
    id: int
    ts: float
    sha256: str
    path: str
    size: int
    lookups: int | None = None   # lookups logged while this version was the newest (None: no log)
    denied: int | None = None    # ... of which denied

    def as_dict(self) -> dict:
        return {"id": self.id, "ts": self.ts, "time": iso(self.ts), "sha256": self.sha256, "path": self.path,
                "size": self.size, "lookups": self.lookups, "denied": self.denied}


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ensure_table(conn: sqlite3.Connection) -> None:
    conn.execute(CREATE_SQL)


def record_policy(db_path: str, text: str, sha256: str, path: str, *,
                  busy_timeout: float = RECORD_BUSY_TIMEOUT_S, now: float | None = None) -> int:
    """Store one loaded policy; returns its row id (the existing one for a repeat), -1 on failure.

    Never raises: a history that cannot be written must not stop the server from
    serving. Failures are one line on stderr.
    """
    conn = None
    try:
        conn = sqlite3.connect(db_path, timeout=busy_timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # as the lookup log; a no-op when already set
        except sqlite3.OperationalError:
            pass  # someone holds a lock: the mode is theirs to set, our insert still works
        ensure_table(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            last = conn.execute("SELECT id, sha256 FROM policies ORDER BY id DESC LIMIT 1").fetchone()
            if last is not None and last[1] == sha256:
                conn.execute("COMMIT")
                return int(last[0])
            cur = conn.execute("INSERT INTO policies (ts, sha256, path, content) VALUES (?, ?, ?, ?)",
                               (time.time() if now is None else now, sha256, path, text))
            conn.execute("COMMIT")
            return int(cur.lastrowid)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except Exception as exc:  # sqlite3.Error, OSError, bad arguments: all mean "not recorded"
        try:
            print(f"dnsguard: policy history {db_path}: could not record {path}: {exc}",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        return -1
    finally:
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass


def _open_ro(db_path: str) -> sqlite3.Connection:
    return open_readonly(
        db_path, "policies", HistoryError,
        missing_file=f"no database at {db_path} (pass --db PATH: the one `dnsguard serve` logs to)",
        missing_table=f"{db_path} has no policy history yet (it is recorded by `dnsguard serve`)")


def versions(db_path: str) -> list[Version]:
    """Every recorded version, oldest first, with lookups and denials during its time."""
    conn = _open_ro(db_path)
    try:
        rows = conn.execute("SELECT id, ts, sha256, path, length(CAST(content AS BLOB)) FROM policies "
                            "ORDER BY ts, id").fetchall()
        has_log = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'lookup_rows'"
                               ).fetchone() is not None
        out = []
        for i, (vid, ts, sha, path, size) in enumerate(rows):
            lookups = denied = None
            if has_log:
                end = rows[i + 1][1] if i + 1 < len(rows) else float("inf")
                lookups, denied = conn.execute(
                    "SELECT count(*), coalesce(sum(verdict = ?), 0) FROM lookup_rows "
                    "WHERE ts >= ? AND ts < ?",
                    (VERDICT_CODES["deny"], ts, end)).fetchone()
            out.append(Version(int(vid), float(ts), sha, path, int(size or 0), lookups, denied))
        return out
    except sqlite3.Error as exc:
        raise HistoryError(f"reading {db_path} failed: {exc}") from None
    finally:
        conn.close()


def content(db_path: str, version_id: int) -> tuple[Version, str]:
    """One version and its text exactly as it was loaded."""
    conn = _open_ro(db_path)
    try:
        row = conn.execute("SELECT id, ts, sha256, path, content FROM policies WHERE id = ?",
                           (version_id,)).fetchone()
    except sqlite3.Error as exc:
        raise HistoryError(f"reading {db_path} failed: {exc}") from None
    finally:
        conn.close()
    if row is None:
        raise HistoryError(f"no policy version {version_id} in {db_path} (see `dnsguard policy history`)")
    vid, ts, sha, path, text = row
    return Version(int(vid), float(ts), sha, path, len(text.encode("utf-8"))), text


def latest(db_path: str) -> Version | None:
    vs = versions(db_path)
    return vs[-1] if vs else None


def write_atomic(path: str, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` in one rename: readers see the old or the new file, never half.

    A symlink is followed (its target is replaced), so a linked policy stays linked.
    """
    path = os.path.realpath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is None:
            try:
                mode = os.stat(path).st_mode & 0o7777
            except FileNotFoundError:
                mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _backup_name(path: str, now: float) -> str:
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate = f"{path}.bak-{stamp}"
    for n in range(1, 1000):
        if not os.path.exists(candidate):
            return candidate
        candidate = f"{path}.bak-{stamp}-{n}"
    raise HistoryError(f"too many backups of {path} this second")


@dataclass(frozen=True)
class Rollback:
    version: Version
    path: str
    backup: str | None     # where the replaced file went (None: there was no file)
    unchanged: bool        # the file already had exactly this content


def rollback(db_path: str, version_id: int, policy_path: str | None = None, *,
             now: float | None = None, check: bool = True) -> Rollback:
    """Write version ``version_id`` back to ``policy_path`` byte-identically and atomically.

    ``policy_path`` defaults to the file the newest version was loaded from (the one a
    running server watches). The current file is first copied to ``PATH.bak-<stamp>``.
    With ``check`` the text is validated first, so a rollback never hands the server a
    file it would reject.
    """
    version, text = content(db_path, version_id)
    if policy_path is None:
        newest = latest(db_path)
        policy_path = newest.path if newest is not None else version.path
    if check:
        try:
            parse_config(text, policy_path)
        except PolicyError as exc:
            raise HistoryError(f"version {version_id} does not load any more: {exc}") from None
    data = text.encode("utf-8")
    now = time.time() if now is None else now
    backup = None
    mode = None
    try:
        with open(policy_path, "rb") as fh:
            current = fh.read()
        mode = os.stat(policy_path).st_mode & 0o7777
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise HistoryError(f"cannot read {policy_path}: {exc}") from None
    if current == data:
        return Rollback(version, policy_path, None, True)
    try:
        if current is not None:
            backup = _backup_name(policy_path, now)
            # Exclusive create: never overwrite an earlier backup, even in a race.
            with open(backup, "xb") as fh:
                fh.write(current)
                fh.flush()
                os.fsync(fh.fileno())
            if mode is not None:
                os.chmod(backup, mode)
        write_atomic(policy_path, data, mode=mode)
    except OSError as exc:
        raise HistoryError(f"cannot write {policy_path}: {exc}") from None
    return Rollback(version, policy_path, backup, False)
