"""The lookup log's upkeep, run by the writer thread between batches: overflow counts become
rows, rows older than ``retention_days`` are pruned, and the file is kept under
``max_size_mb`` by deleting the oldest rows -- one small chunk per turn each, so upkeep never
holds the write lock long enough to back the queue up.
"""

from __future__ import annotations

import sqlite3
import time

from resolver.log.schema import PRUNE_CHUNK, ROLLUP_SECONDS, drop_oldest_rows, used_bytes

# How often the database size is compared with max_size_mb while under it; once over, every
# writer turn deletes one chunk of the oldest rows until it is under SHRINK_TO of the limit.
SIZE_CHECK_S = 1.0
SHRINK_TO = 0.9


class Upkeep:
    """Mixed into the writer (``querylog.QueryLog``), which owns these fields."""

    _conn: sqlite3.Connection | None
    overflow: int
    _overflow_saved: int
    max_bytes: int
    size_dropped: int
    _shrinking: bool
    _next_size_check: float
    retention_days: float | None
    prune_interval: float
    _next_prune: float
    pruned: int

    def _say(self, message: str) -> None:
        raise NotImplementedError

    def _housekeeping(self) -> None:
        conn = self._conn
        assert conn is not None
        dropped = self.overflow - self._overflow_saved
        if dropped > 0:
            with conn:
                conn.execute("INSERT INTO log_overflow (ts, dropped) VALUES (?, ?)", (time.time(), dropped))
            self._overflow_saved += dropped
        if self.max_bytes and (self._shrinking or time.monotonic() >= self._next_size_check):
            self._keep_under_size(conn)
        if self.retention_days and time.monotonic() >= self._next_prune:
            # Whole hours only, so the rollup and the rows it counts always cover the same span.
            hour = int((time.time() - self.retention_days * 86400.0) // ROLLUP_SECONDS)
            cutoff = float(hour * ROLLUP_SECONDS)
            # One small chunk per loop turn, interleaved with batches, so pruning a
            # backlog never holds the write lock long enough to back the queue up.
            with conn:
                cur = conn.execute(
                    "DELETE FROM lookup_rows WHERE id IN "
                    "(SELECT id FROM lookup_rows WHERE ts < ? LIMIT ?)", (cutoff, PRUNE_CHUNK))
                # Only hours no remaining row falls in, so while a backlog is pruned chunk by
                # chunk the rollup still counts every row left; a day of hours at most per turn
                # (a log left alone for months has many).
                oldest = conn.execute("SELECT min(ts) FROM lookup_rows").fetchone()[0]
                below = hour if oldest is None else min(hour, int(oldest // ROLLUP_SECONDS))
                hours = conn.execute("DELETE FROM lookup_rollup WHERE hour < ? AND hour < "
                                     "(SELECT min(hour) FROM lookup_rollup) + 24", (below,))
                conn.execute("DELETE FROM log_overflow WHERE ts < ?", (cutoff,))
                conn.execute("DELETE FROM connections WHERE ts < ?", (cutoff,))
                conn.execute("DELETE FROM client_labels WHERE until < ?", (cutoff,))
            self.pruned += cur.rowcount
            if cur.rowcount < PRUNE_CHUNK and hours.rowcount == 0:
                self._next_prune = time.monotonic() + self.prune_interval

    def _keep_under_size(self, conn: sqlite3.Connection) -> None:
        used = used_bytes(conn)
        if used <= (SHRINK_TO * self.max_bytes if self._shrinking else self.max_bytes):
            if self._shrinking:
                self._shrinking = False
                self._say(f"under max_size_mb again ({used / 1048576:.1f} MiB used); "
                          f"{self.size_dropped} oldest rows deleted so far")
            self._next_size_check = time.monotonic() + SIZE_CHECK_S
            return
        if not self._shrinking:
            self._shrinking = True
            self._say(f"{used / 1048576:.1f} MiB used, over max_size_mb ({self.max_bytes / 1048576:g}): "
                      f"deleting the oldest rows until under {SHRINK_TO:.0%} of it")
        # One chunk per writer turn, like retention pruning: the queue keeps draining meanwhile.
        with conn:
            n = drop_oldest_rows(conn, PRUNE_CHUNK, time.time())
        self.size_dropped += n
        if n == 0:  # what is left is names, clients and rules: nothing more to delete safely
            self._shrinking = False
            self._next_size_check = time.monotonic() + 60.0
            self._say("over max_size_mb with no rows left to delete")
