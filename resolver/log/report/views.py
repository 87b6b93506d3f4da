"""The aggregate views: ``summary`` (totals, top names, failures, connections, findings)
and ``names`` (one line per name).
"""

from __future__ import annotations

import time

from sqlite_utils import Database

from resolver.core.logdb import VERDICT_CODES
from resolver.log.report.connections import connection_overflow, egress
from resolver.log.report.query import (
    _FAILURE_RCODES,
    _MODE_NAMES,
    _VERDICT_NAMES,
    Filters,
    ReportError,
    _blocked_connections,
    _clients_for,
    _filter_where,
    _head,
    _materialise_window,
    _rcode_text,
    _rows,
    _rules_for,
    _top_names,
    iso,
)
from resolver.log.report.schema import _FINDING_NAMES, NAMES_SCHEMA_ID, SUMMARY_SCHEMA_ID
from resolver.policy import suspicious


# -------------------------------------------------------------------- reports
def summary(db: Database, *, since: float | None, until: float | None,
            filters: Filters = Filters(), top: int = 10, now: float | None = None,
            upload_warn_mb: float = 10.0) -> dict:
    """The default report: totals, top denied/allowed names, upstream failures, connections.

    Returns a dict matching :data:`SUMMARY_SCHEMA`.
    """
    now = time.time() if now is None else now
    only = _filter_where(db, filters)
    out = _head(db, SUMMARY_SCHEMA_ID, since, until, filters, now)
    _materialise_window(db, since, until, only)
    by = _rows(db, "SELECT verdict, mode, sum(n) AS count FROM dg_window GROUP BY verdict, mode "
                   "ORDER BY verdict DESC, mode")
    distinct = _rows(db, "SELECT count(DISTINCT name_id) AS names, count(DISTINCT client_id) AS clients "
                         "FROM dg_window")[0]
    totals = {
        "lookups": sum(r["count"] for r in by),
        "allow": sum(r["count"] for r in by if r["verdict"] == 1),
        "deny": sum(r["count"] for r in by if r["verdict"] == 0),
        "undecided": sum(r["count"] for r in by if r["verdict"] is None),
        "enforce": sum(r["count"] for r in by if r["mode"] == 0),
        "audit": sum(r["count"] for r in by if r["mode"] == 1),
        "distinct_names": distinct["names"],
        "distinct_clients": distinct["clients"],
        "by_verdict_mode": [
            {"verdict": _VERDICT_NAMES.get(r["verdict"]), "mode": _MODE_NAMES.get(r["mode"]),
             "count": r["count"]}
            for r in by
        ],
    }
    fails = _rows(
        db,
        "SELECT w.name_id AS name_id, n.name AS name, w.rcode AS rcode, sum(w.n) AS count, "
        "min(w.first) AS first, max(w.last) AS last FROM dg_window w JOIN names n ON n.id = w.name_id "
        f"WHERE w.verdict = 1 AND w.rcode IN ({','.join(map(str, _FAILURE_RCODES))}) "
        "GROUP BY w.name_id, w.rcode ORDER BY count DESC, n.name LIMIT ?",
        (top,),
    )
    fail_clients = _clients_for(db, sorted({r["name_id"] for r in fails}),
                                f"w.verdict = 1 AND w.rcode IN ({','.join(map(str, _FAILURE_RCODES))})")
    out.update({
        "totals": totals,
        "top_denied": _top_names(db, VERDICT_CODES["deny"], top),
        "top_allowed": _top_names(db, VERDICT_CODES["allow"], top),
        "upstream_failures": [
            {"name": r["name"], "rcode": _rcode_text(r["rcode"]), "count": r["count"],
             "first_seen": iso(r["first"]), "last_seen": iso(r["last"]),
             "clients": fail_clients.get(r["name_id"], ([], 0))[0],
             "client_count": fail_clients.get(r["name_id"], ([], 0))[1]}
            for r in fails
        ],
        "blocked_connections": _blocked_connections(db, since, until, filters, top),
        "egress": {**egress(db, since=since, until=until, filters=filters, top=top,
                            upload_warn_mb=upload_warn_mb),
                   "overflow": connection_overflow(db, since, until)},
        "suspicious": _suspicious(db, top),
    })
    db.execute("DROP TABLE IF EXISTS temp.dg_window")
    return out


def _suspicious(db: Database, top: int) -> list[dict]:
    """Exfiltration-shaped names in the window, by the same detector `learn` uses."""
    rows = _rows(db, "SELECT n.name AS name, min(w.first) AS first, max(w.last) AS last, sum(w.n) AS n "
                     "FROM dg_window w JOIN names n ON n.id = w.name_id GROUP BY w.name_id")
    findings = suspicious.detect([suspicious.Observation(r["name"], r["first"], r["last"], r["n"])
                                  for r in rows])
    findings.sort(key=lambda f: (-len(f.names), -f.lookups, f.domain))
    return [{"domain": f.domain, "kind": f.kind, "reason": f.reason, "names": list(f.names[:_FINDING_NAMES]),
             "name_count": len(f.names), "lookups": f.lookups, "first_seen": iso(f.first_seen),
             "last_seen": iso(f.last_seen)} for f in findings[:top]]


NAME_SORTS = {
    "count": "count DESC, name",
    "deny": "deny DESC, count DESC, name",
    "name": "name",
    "last": "last DESC, name",
    "first": "first, name",
}


def names(db: Database, *, since: float | None, until: float | None,
          filters: Filters = Filters(), sort: str = "count", limit: int | None = 100,
          now: float | None = None) -> dict:
    """One row per name seen in the window; returns a dict matching :data:`NAMES_SCHEMA`."""
    if sort not in NAME_SORTS:
        raise ReportError(f"sort must be one of {', '.join(NAME_SORTS)}, not {sort!r}")
    now = time.time() if now is None else now
    only = _filter_where(db, filters)
    out = _head(db, NAMES_SCHEMA_ID, since, until, filters, now)
    _materialise_window(db, since, until, only)
    rows = _rows(
        db,
        "SELECT w.name_id AS name_id, n.name AS name, sum(w.n) AS count, "
        "sum(CASE WHEN w.verdict = 1 THEN w.n ELSE 0 END) AS allow, "
        "sum(CASE WHEN w.verdict = 0 THEN w.n ELSE 0 END) AS deny, "
        "sum(CASE WHEN w.mode = 0 THEN w.n ELSE 0 END) AS enforce, "
        "sum(CASE WHEN w.mode = 1 THEN w.n ELSE 0 END) AS audit, "
        "min(w.first) AS first, max(w.last) AS last "
        "FROM dg_window w JOIN names n ON n.id = w.name_id GROUP BY w.name_id "
        f"ORDER BY {NAME_SORTS[sort]} LIMIT ?",
        (limit if limit else -1,),
    )
    ids = [r["name_id"] for r in rows]
    clients: dict[int, tuple[list[str], int]] = {}
    rules: dict[int, list[str | None]] = {}
    rcodes: dict[int, dict[str, int]] = {}
    # Chunked: SQLite caps bound parameters, and `names --limit 0` may list every name.
    for i in range(0, len(ids), 5000):
        chunk = ids[i:i + 5000]
        clients.update(_clients_for(db, chunk))
        rules.update(_rules_for(db, chunk))
        marks = ",".join("?" * len(chunk))
        for r in _rows(db, "SELECT name_id, rcode, sum(n) AS n FROM dg_window "
                           f"WHERE name_id IN ({marks}) GROUP BY name_id, rcode ORDER BY name_id, rcode",
                       chunk):
            rcodes.setdefault(r["name_id"], {})[_rcode_text(r["rcode"])] = r["n"]
    out["names"] = [
        {
            "name": r["name"], "count": r["count"], "allow": r["allow"], "deny": r["deny"],
            "enforce": r["enforce"], "audit": r["audit"],
            "rules": rules.get(r["name_id"], []),
            "rcodes": rcodes.get(r["name_id"], {}),
            "clients": clients.get(r["name_id"], ([], 0))[0],
            "client_count": clients.get(r["name_id"], ([], 0))[1],
            "first_seen": iso(r["first"]), "last_seen": iso(r["last"]),
        }
        for r in rows
    ]
    db.execute("DROP TABLE IF EXISTS temp.dg_window")
    return out


