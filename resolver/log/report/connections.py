"""The connection views: ``connections`` (one line per recorded connection) and the
summary's egress sections (``egress``: bytes per name and client, large uploads, traffic
to addresses dnsguard never handed out).

Rows come from the ``connections`` table the fence's recorders write (``resolver.fence``):
``blocked`` attempts from NFLOG, ``allowed`` and ``would-block`` flows from conntrack with
byte counters. A connection is in a window when it was open at some time inside it.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from sqlite_utils import Database

from resolver.log.report.query import (
    Filters,
    ReportError,
    _below,
    _parse_name_pattern,
    _rows,
    iso,
)
from resolver.log.report.schema import CONNECTIONS_SCHEMA_ID

CONNECTION_VERDICTS = ("allowed", "blocked", "would-block")
MB = 1_000_000
_FIELDS = ("id", "start", "end", "open", "duration_s", "source", "source_port", "client", "destination",
           "protocol", "port", "name", "verdict", "rule", "packets_out", "bytes_out", "packets_in",
           "bytes_in")


@dataclass(frozen=True, slots=True)
class ConnFilters:
    """``client``: a ``[[clients]]`` name, an address or a CIDR (source); ``name``: as for
    lookups (``*.example.com`` below it); ``verdict``: allowed / blocked / would-block;
    ``open_only``: connections still open."""

    client: str | None = None
    name: str | None = None
    verdict: str | None = None
    open_only: bool = False

    def as_dict(self) -> dict:
        return {"client": self.client, "name": self.name, "verdict": self.verdict, "open": self.open_only}


def _has_table(db: Database) -> bool:
    return "connections" in db.table_names()


def _columns(db: Database) -> set[str]:
    return {r["name"] for r in _rows(db, "SELECT name FROM pragma_table_info('connections')")}


def _where(db: Database, since: float | None, until: float | None, filters: ConnFilters | Filters
           ) -> tuple[list[str], list[object]]:
    cond: list[str] = []
    params: list[object] = []
    cols = _columns(db)
    end = "end_ts" if "end_ts" in cols else "ts"
    if since is None:
        if until is not None:
            cond.append("ts < ?")
            params.append(until)
    elif end == "ts":  # a log from before connections had an end: attempts, over when made
        cond.append("ts >= ? AND ts < ?")
        params += [since, float("inf") if until is None else until]
    else:
        # Open at some time in the window: began in it, or began before and ended (or not)
        # after its start. Three ranges, each on an index (SQLite's multi-index OR), so a
        # short window on a long log reads its own rows, not every row before `until`.
        upto = float("inf") if until is None else until
        cond.append("((ts >= ? AND ts < ?) OR (ts < ? AND end_ts >= ?) OR (end_ts IS NULL AND ts < ?))")
        params += [since, upto, since, since, upto]
    client = filters.client.strip() if filters.client else None
    if client:
        try:
            net = ipaddress.ip_network(client, strict=False)
        except ValueError:
            # A [[clients]] name, or a container's / fenced user's label the source had then.
            by_label = ("EXISTS (SELECT 1 FROM client_labels l JOIN clients c ON c.id = l.client_id "
                        "WHERE l.name = ? AND c.addr = connections.source AND l.since <= connections.ts "
                        "AND (l.until IS NULL OR l.until > connections.ts))"
                        if "client_labels" in db.table_names() else None)
            named = "client = ?" if "client" in cols else None
            terms = [t for t in (named, by_label) if t is not None]
            cond.append(f"({' OR '.join(terms)})" if terms else "0")
            params.extend([client] * len(terms))
        else:
            # Text addresses cannot be range-compared in SQL; the few CIDR forms people use
            # are matched exactly (one address) or in Python (below) through dg_in_net.
            db.conn.create_function("dg_in_net", 1, lambda a: _in_net(a, net), deterministic=True)
            cond.append("dg_in_net(source)")
    if filters.name:
        wildcard, text = _parse_name_pattern(filters.name)
        if wildcard:
            db.conn.create_function("dg_below", 2, _below, deterministic=True)
            cond.append("dg_below(name, ?)")
        else:
            cond.append("name = ?")
        params.append(text)
    verdict = getattr(filters, "verdict", None)
    if verdict is not None:
        if verdict not in CONNECTION_VERDICTS:
            raise ReportError(f"connection verdict must be one of {', '.join(CONNECTION_VERDICTS)}, "
                              f"not {verdict!r}")
        cond.append("verdict = ?")
        params.append(verdict)
    if getattr(filters, "open_only", False):
        cond.append(f"{end} IS NULL")
    return cond or ["1"], params


def _in_net(addr: str | None, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        a = ipaddress.ip_address(addr or "")
    except ValueError:
        return False
    return a.version == net.version and a in net


def connection_overflow(db: Database, since: float | None, until: float | None) -> dict:
    """Flows the recorder could not record (``dropped``), event-buffer overruns and names the fence
    could not hand it (``lost_names``), cumulative; and the periods it was not running (``gaps``)
    that overlap the window: connections made then may be missing."""
    out: dict = {"dropped": 0, "dropped_in_window": 0, "overruns": 0, "lost_names": 0, "last": None,
                 "gaps": []}
    tables = db.table_names()
    if "connection_overflow" in tables:
        cols = {c.name for c in db["connection_overflow"].columns}
        lost = "coalesce(sum(lost_names), 0)" if "lost_names" in cols else "0"
        row = _rows(db, f"SELECT coalesce(sum(dropped), 0) AS d, coalesce(sum(overruns), 0) AS o, "
                        f"{lost} AS l, max(ts) AS last FROM connection_overflow")[0]
        win = _rows(db, "SELECT coalesce(sum(dropped), 0) AS d FROM connection_overflow "
                        "WHERE ts >= ? AND ts < ?",
                    (float("-inf") if since is None else since, float("inf") if until is None else until))[0]
        out.update(dropped=int(row["d"]), dropped_in_window=int(win["d"]), overruns=int(row["o"]),
                   lost_names=int(row["l"]), last=iso(row["last"]))
    if "connection_gaps" in tables:
        gaps = _rows(db, "SELECT since, until, reason FROM connection_gaps WHERE since < ? "
                         "AND (until IS NULL OR until >= ?) ORDER BY since",
                     (float("inf") if until is None else until, float("-inf") if since is None else since))
        out["gaps"] = [{"since": iso(g["since"]), "until": iso(g["until"]), "reason": g["reason"]}
                       for g in gaps]
    return out


def connections(db: Database, *, since: float | None, until: float | None,
                filters: ConnFilters = ConnFilters(), limit: int | None = 100,
                now: float | None = None) -> dict:
    """The most recent `limit` connections in the window, oldest first (CONNECTIONS_SCHEMA)."""
    now = time.time() if now is None else now
    path = db.execute("PRAGMA database_list").fetchone()[2]
    out: dict = {
        "schema": CONNECTIONS_SCHEMA_ID, "database": path, "generated": iso(now),
        "window": {"since": iso(since), "until": iso(until)}, "filters": filters.as_dict(),
        "overflow": connection_overflow(db, since, until), "connections": [],
    }
    if not _has_table(db):
        return out
    cols = _columns(db)
    select = ", ".join(c if c in cols else f"NULL AS {c}" for c in (
        "end_ts", "source_port", "client", "rule", "packets_out", "bytes_out", "packets_in", "bytes_in"))
    cond, params = _where(db, since, until, filters)
    # The source's label (a container, a fenced user) at the time the connection started.
    label = ("(SELECT l.name FROM client_labels l JOIN clients c ON c.id = l.client_id "
             "WHERE c.addr = connections.source AND l.since <= connections.ts "
             "AND (l.until IS NULL OR l.until > connections.ts) ORDER BY l.since DESC LIMIT 1)"
             if "client_labels" in db.table_names() else "NULL")
    rows = _rows(db, f"SELECT rowid AS id, ts, source, destination, protocol, port, verdict, name, {select}, "
                     f"{label} AS client_name "
                     f"FROM connections WHERE {' AND '.join(cond)} ORDER BY ts DESC, rowid DESC LIMIT ?",
                 (*params, limit if limit else -1))
    rows.reverse()
    out["connections"] = [_row(r, now) for r in rows]
    return out


def _row(r: dict, now: float) -> dict:
    is_open = r["end_ts"] is None and r["verdict"] != "blocked"
    end = r["end_ts"] if r["end_ts"] is not None else (None if is_open else r["ts"])
    return {
        "id": r["id"], "start": iso(r["ts"]), "end": iso(end), "open": is_open,
        "duration_s": round((now if end is None else end) - r["ts"], 3),
        "source": r["source"], "source_port": r["source_port"], "client": r["client"],
        "client_name": r["client_name"],
        "destination": r["destination"], "protocol": r["protocol"], "port": r["port"], "name": r["name"],
        "verdict": r["verdict"], "rule": r["rule"],
        "packets_out": r["packets_out"], "bytes_out": r["bytes_out"],
        "packets_in": r["packets_in"], "bytes_in": r["bytes_in"],
    }


def egress(db: Database, *, since: float | None, until: float | None, filters: Filters = Filters(),
           top: int = 10, upload_warn_mb: float = 10.0) -> dict:
    """The summary's connection sections: ``egress_by_name``, ``large_uploads``, ``unnamed_egress``.

    Per name and client (the ``[[clients]]`` name, else the source address) of the flows the
    fence let through (allowed and would-block): connections, bytes out and in, first and
    last; largest upload first. ``large_uploads``: those over ``upload_warn_mb`` MB out.
    ``unnamed_egress``: flows let through to addresses dnsguard never handed out ([allow]
    cidrs, or audit), per destination.
    """
    out: dict = {"upload_warn_mb": upload_warn_mb, "egress_by_name": [], "large_uploads": [],
                 "unnamed_egress": []}
    if not _has_table(db) or "bytes_out" not in _columns(db):
        return out
    cond, params = _where(db, since, until, ConnFilters(client=filters.client, name=filters.name))
    cond.append("verdict IN ('allowed', 'would-block')")
    where = " AND ".join(cond)
    warn = upload_warn_mb * MB
    rows = _rows(db, "SELECT name, coalesce(client, source) AS who, count(*) AS n, "
                     "sum(coalesce(bytes_out, 0)) AS bytes_out, sum(coalesce(bytes_in, 0)) AS bytes_in, "
                     "group_concat(DISTINCT verdict) AS verdicts, min(ts) AS first, "
                     f"max(coalesce(end_ts, ts)) AS last FROM connections WHERE {where} AND name IS NOT NULL "
                     "GROUP BY name, who ORDER BY bytes_out DESC, n DESC, name, who", params)
    items = [{"name": r["name"], "client": r["who"], "connections": r["n"], "bytes_out": r["bytes_out"],
              "bytes_in": r["bytes_in"], "verdicts": sorted(r["verdicts"].split(",")),
              "first_seen": iso(r["first"]), "last_seen": iso(r["last"]),
              "large_upload": r["bytes_out"] > warn} for r in rows]
    out["egress_by_name"] = items[:top]
    out["large_uploads"] = [{k: i[k] for k in ("name", "client", "connections", "bytes_out", "first_seen",
                                               "last_seen")} for i in items if i["large_upload"]]
    unnamed = _rows(db, "SELECT destination, protocol, port, verdict, count(*) AS n, "
                        "sum(coalesce(bytes_out, 0)) AS bytes_out, sum(coalesce(bytes_in, 0)) AS bytes_in, "
                        "min(ts) AS first, max(coalesce(end_ts, ts)) AS last, "
                        "group_concat(DISTINCT coalesce(client, source)) AS who FROM connections "
                        f"WHERE {where} AND name IS NULL GROUP BY destination, protocol, port, verdict "
                        "ORDER BY bytes_out DESC, n DESC, destination LIMIT ?", (*params, top))
    out["unnamed_egress"] = [
        {"destination": r["destination"], "protocol": r["protocol"], "port": r["port"],
         "verdict": r["verdict"], "connections": r["n"], "bytes_out": r["bytes_out"],
         "bytes_in": r["bytes_in"],
         "clients": sorted((r["who"] or "").split(","))[:20] if r["who"] else [],
         "first_seen": iso(r["first"]), "last_seen": iso(r["last"])} for r in unnamed]
    return out
