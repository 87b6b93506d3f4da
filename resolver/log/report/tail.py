"""The recent tail: single lookups, newest first, walking the rollup's hours so a rare
filter reads rows only in hours that have matches.
"""

from __future__ import annotations

import json

from sqlite_utils import Database

from resolver.log.report import query
from resolver.log.report.query import Filters, _filter_where, _rows, _Where, _where, iso
from resolver.log.schema import ROLLUP_SECONDS


def _lookup_dict(row: dict) -> dict:
    answers = row["answers"]
    if answers is not None:
        try:
            parsed = json.loads(answers)
        except ValueError:
            parsed = None
        answers = [str(a) for a in parsed] if isinstance(parsed, list) else [str(row["answers"])]
    return {
        "id": row["id"], "ts": row["ts"], "time": iso(row["ts"]), "client": row["client"],
        "client_name": row.get("client_name"),
        "transport": row["transport"], "qname": row["qname"], "qtype": row["qtype"],
        "verdict": row["verdict"], "mode": row["mode"], "rule": row["rule"], "rcode": row["rcode"],
        "answers": answers, "cached": bool(row["cached"]), "latency_ms": row["latency_ms"],
        "note": row["note"],
    }


def tail(db: Database, *, n: int = 20, after_id: int | None = None, max_id: int | None = None,
         since: float | None = None, until: float | None = None,
         filters: Filters = Filters()) -> list[dict]:
    """Recent lookups, oldest first, each matching :data:`LOOKUP_SCHEMA`.

    Without ``after_id``: the ``n`` newest matching lookups by time (id <= ``max_id`` if given).
    With it: the first ``n`` matching lookups whose id is greater (what ``tail -f`` polls
    with; ids only grow).
    """
    where = _where(db, since, until, filters)
    if max_id is not None:
        where = where.and_("r.id <= ?", max_id)
    if after_id is not None:
        where = where.and_("r.id > ?", after_id)
        ids = _ids(db, f"SELECT r.id FROM lookup_rows r WHERE {where.sql} ORDER BY r.id LIMIT ?",
                   (*where.params, n))
        order = "id"
    elif filters == Filters() or not query._has_rollup(db):
        # Newest first along the ts index (rowid breaks ties): the first n rows end the scan.
        ids = _ids(db, f"SELECT r.id FROM lookup_rows r WHERE {where.sql} "
                       "ORDER BY r.ts DESC, r.id DESC LIMIT ?", (*where.params, n))
        order = "ts, id"
    else:
        ids = _newest_matching(db, where, _filter_where(db, filters), since, until, n)
        order = "ts, id"
    if not ids:
        return []
    rows = _rows(db, f"SELECT * FROM lookups WHERE id IN ({','.join(map(str, ids))}) ORDER BY {order}")
    return [_lookup_dict(r) for r in rows]


def _ids(db: Database, sql: str, params: tuple) -> list[int]:
    return [r[0] for r in db.execute(sql, params).fetchall()]


def _newest_matching(db: Database, where: _Where, only: _Where, since: float | None,
                     until: float | None, n: int) -> list[int]:
    """The ``n`` newest rows matching a filter, read only from the hours the rollup says hold
    matches (newest first): a rare name costs a scan of its hours, not of the whole log."""
    cond, params = [only.sql], list(only.params)
    if since is not None:
        cond.append("r.hour >= ?")
        params.append(int(since // ROLLUP_SECONDS))
    if until is not None:
        cond.append("r.hour <= ?")
        params.append(int(until // ROLLUP_SECONDS))
    # Stepped lazily along the primary key (hour first, newest first): the scan stops with
    # the last hour needed instead of visiting the whole rollup.
    hours = db.execute(
        f"SELECT DISTINCT r.hour FROM lookup_rollup r WHERE {' AND '.join(cond)} ORDER BY r.hour DESC",
        params)
    ids: list[int] = []
    for (hour,) in hours:
        inside = where.and_("r.ts >= ? AND r.ts < ?", float(hour * ROLLUP_SECONDS),
                            float((hour + 1) * ROLLUP_SECONDS))
        ids += _ids(db, f"SELECT r.id FROM lookup_rows r WHERE {inside.sql} "
                        "ORDER BY r.ts DESC, r.id DESC LIMIT ?", (*inside.params, n - len(ids)))
        if len(ids) >= n:
            break
    return ids


def last_id(db: Database) -> int:
    """Highest row id so far (where ``tail -f`` starts when it printed nothing)."""
    return _rows(db, "SELECT coalesce(max(id), 0) AS id FROM lookup_rows")[0]["id"]
