"""Lookups over time, and per client: the figures the HTML report draws beside ``summary``.

``series`` counts lookups per bucket (a minute for windows up to six hours, else an hour)
by outcome: allowed, denied, would-deny (audit mode) and no verdict (malformed or refused).
Hour buckets read the writer's ``lookup_rollup`` for whole hours and raw rows only at the
window's edges, as the summary does; minute buckets read raw rows in the window (a ts-range
scan of at most six hours).
"""

from __future__ import annotations

import time

from sqlite_utils import Database

from resolver.core.logdb import window
from resolver.log.report.query import (
    Filters,
    _filter_where,
    _has_rollup,
    _materialise_window,
    _rows,
    _whole_hours,
    iso,
)
from resolver.log.schema import ROLLUP_SECONDS

MINUTE_WINDOW_MAX = 6 * 3600
OUTCOMES = ("allowed", "denied", "would deny (audit)", "malformed / refused")
_OUTCOME_SQL = ("CASE WHEN r.verdict IS NULL OR r.verdict = -1 THEN 3 WHEN r.verdict = 1 THEN 0 "
                "WHEN r.mode = 1 THEN 2 ELSE 1 END")


def series(db: Database, *, since: float | None, until: float | None, filters: Filters = Filters(),
           now: float | None = None) -> dict:
    """``{"bucket_seconds", "buckets": [iso...], "outcomes": [...], "counts": {outcome: [n...]}}``."""
    now = time.time() if now is None else now
    until = now if until is None else until
    if since is None:
        first = _rows(db, "SELECT min(ts) AS t FROM lookup_rows")[0]["t"]
        since = first if first is not None else until - 3600
    step = 60 if until - since <= MINUTE_WINDOW_MAX else ROLLUP_SECONDS
    only = _filter_where(db, filters)
    counts: dict[tuple[int, int], int] = {}
    edges: list[tuple[float | None, float | None]] = [(since, until)]
    hours = _whole_hours(since, until) if step == ROLLUP_SECONDS and _has_rollup(db) else None
    if hours is not None:
        h0, h1 = hours
        for r in _rows(db, f"SELECT r.hour AS b, {_OUTCOME_SQL} AS o, sum(r.n) AS n FROM lookup_rollup r "
                           f"WHERE r.hour >= ? AND r.hour < ? AND {only.sql} GROUP BY 1, 2",
                       (h0, h1, *only.params)):
            counts[(r["b"], r["o"])] = counts.get((r["b"], r["o"]), 0) + r["n"]
        edges = [(since, h0 * ROLLUP_SECONDS), (h1 * ROLLUP_SECONDS, until)]
    for lo, hi in edges:
        cond, params = window(lo, hi, "r.ts")
        for r in _rows(db, f"SELECT CAST(r.ts / {step} AS INTEGER) AS b, {_OUTCOME_SQL} AS o, count(*) AS n "
                           f"FROM lookup_rows r WHERE {' AND '.join([*cond, only.sql])} GROUP BY 1, 2",
                       (*params, *only.params)):
            counts[(r["b"], r["o"])] = counts.get((r["b"], r["o"]), 0) + r["n"]
    b0, b1 = int(since // step), int(-(-until // step))
    buckets = list(range(b0, max(b1, b0 + 1)))
    return {
        "bucket_seconds": step,
        "buckets": [iso(b * step) for b in buckets],
        "outcomes": list(OUTCOMES),
        "counts": {name: [counts.get((b, i), 0) for b in buckets] for i, name in enumerate(OUTCOMES)},
    }


def clients(db: Database, *, since: float | None, until: float | None, filters: Filters = Filters(),
            top: int = 10) -> list[dict]:
    """The busiest clients in the window: lookups, denials, distinct names, first and last seen."""
    _materialise_window(db, since, until, _filter_where(db, filters))
    try:
        return _rows(
            db,
            "SELECT c.addr AS client, sum(w.n) AS lookups, "
            "sum(CASE WHEN w.verdict = 0 THEN w.n ELSE 0 END) AS denied, "
            "count(DISTINCT w.name_id) AS names, min(w.first) AS first, max(w.last) AS last "
            "FROM dg_window w JOIN clients c ON c.id = w.client_id GROUP BY w.client_id "
            "ORDER BY lookups DESC, c.addr LIMIT ?", (top,))
    finally:
        db.execute("DROP TABLE IF EXISTS temp.dg_window")
