"""What every report view shares: filters, time parsing, opening the log read-only, the
SQL conditions a window and filters become, and the rollup/raw-row materialisation of a
window (whole hours from ``lookup_rollup``, edge hours from ``lookup_rows``).
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import dns.rcode
from sqlite_utils import Database

from resolver.core.errors import DnsguardError
from resolver.core.logdb import MODE_CODES, VERDICT_CODES, open_readonly, window
from resolver.core.names import normalise
from resolver.log.schema import ROLLUP_COLUMNS, ROLLUP_NULL, ROLLUP_SECONDS

_FAILURE_RCODES = (2, 3)  # SERVFAIL, NXDOMAIN
_CLIENT_LIST_MAX = 20
_VERDICT_NAMES = {code: text for text, code in VERDICT_CODES.items()}
_MODE_NAMES = {code: text for text, code in MODE_CODES.items()}


class ReportError(DnsguardError):
    """A report that cannot be produced (no such database, bad filter, bad time)."""


@dataclass(frozen=True, slots=True)
class Filters:
    """Restrictions applied to every view.

    ``client`` is an address or a CIDR; ``verdict`` "allow"/"deny"; ``name`` is policy
    wildcard syntax: ``example.com`` exactly, ``*.example.com`` any depth below it (not
    the apex itself).
    """

    client: str | None = None
    verdict: str | None = None
    name: str | None = None

    def as_dict(self) -> dict:
        return {"client": self.client, "verdict": self.verdict, "name": self.name}


# ----------------------------------------------------------------------- time
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: float | None = None) -> float:
    """Turn ``30m``/``1h``/``24h``/``7d``/``2w`` (ago), ``now``, or an ISO time into epoch seconds.

    An ISO time without an offset is taken as UTC, like every time in the log.
    """
    now = time.time() if now is None else now
    value = text.strip()
    if value.lower() == "now":
        return now
    m = _DURATION.match(value.lower())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ReportError(f"cannot read time {text!r}: use 30m, 1h, 24h, 7d, 2w, now "
                          "or an ISO time such as 2024-05-01T12:00") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> ``2024-05-01T12:00:00.000Z`` (the one time format of the JSON)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ----------------------------------------------------------------------- open
def _below(name: str | None, suffix: str) -> bool:
    """``name`` is strictly below ``suffix`` (both canonical presentation text)?

    The character before the matched suffix must be a *separator* dot: in ``a\\.example.com``
    the dot is inside the label ``a.example`` and the name is not below ``example.com``.
    An odd run of backslashes before the dot means the dot is escaped.
    """
    if name is None or len(name) <= len(suffix) + 1 or not name.endswith(suffix):
        return False
    i = len(name) - len(suffix) - 1
    if name[i] != ".":
        return False
    slashes = 0
    j = i - 1
    while j >= 0 and name[j] == "\\":
        slashes += 1
        j -= 1
    return slashes % 2 == 0


def open_log(path: str) -> Database:
    """Open a lookup log read-only. Raises ReportError if it is missing or not a log."""
    conn = open_readonly(
        path, "lookup_rows", ReportError,
        missing_file=f"no lookup log at {path} (start `dnsguard serve --db {path}` or pass --db PATH)",
        missing_table=f"{path} is not a dnsguard lookup log (no lookup_rows table)")
    conn.create_function("dg_below", 2, _below, deterministic=True)
    return Database(conn, execute_plugins=False, recursive_triggers=False)


def _rows(db: Database, sql: str, params: Iterable = ()) -> list[dict]:
    # Always materialise: a half-read cursor would hold a WAL snapshot open and stop the
    # writer's checkpoints from getting past it.
    return list(db.query(sql, list(params)))


# ---------------------------------------------------------------------- where
@dataclass(frozen=True, slots=True)
class _Where:
    sql: str
    params: tuple

    def and_(self, sql: str, *params: object) -> _Where:
        return _Where(f"{self.sql} AND {sql}", self.params + params)


def _where(db: Database, since: float | None, until: float | None, filters: Filters) -> _Where:
    """SQL condition over ``lookup_rows r`` for a window and filters (integer columns only)."""
    parts, params = window(since, until, "r.ts")
    only = _filter_where(db, filters)
    return _Where(" AND ".join(["1", *parts, only.sql]), (*params, *only.params))


def _filter_where(db: Database, filters: Filters) -> _Where:
    """The filters alone, over columns ``lookup_rows`` and ``lookup_rollup`` share (alias ``r``).

    Every value compared is a real id or code, never the rollup's -1 for NULL.
    """
    parts: list[str] = ["1"]
    params: list[object] = []
    if filters.verdict is not None:
        if filters.verdict not in VERDICT_CODES:
            raise ReportError(f"verdict must be allow or deny, not {filters.verdict!r}")
        parts.append("r.verdict = ?")
        params.append(VERDICT_CODES[filters.verdict])
    if filters.client is not None:
        ids = _client_ids(db, filters.client)
        if len(ids) == 1:
            parts.append("r.client_id = ?")
            params.append(ids[0])
        else:
            # The clients table is tiny; an empty list correctly matches nothing.
            parts.append(f"r.client_id IN ({','.join(str(int(i)) for i in ids) or 'NULL'})")
    if filters.name is not None:
        wildcard, text = _parse_name_pattern(filters.name)
        if wildcard:
            parts.append("r.name_id IN (SELECT id FROM names WHERE length(name) > ? "
                         "AND substr(name, -?) = ? AND dg_below(name, ?))")
            params.extend([len(text) + 1, len(text) + 1, "." + text, text])
        else:
            parts.append("r.name_id = (SELECT id FROM names WHERE name = ?)")
            params.append(text)
    return _Where(" AND ".join(parts), tuple(params))


def _parse_name_pattern(pattern: str) -> tuple[bool, str]:
    """``*.example.com`` -> (True, "example.com"); ``Example.COM.`` -> (False, "example.com")."""
    text = pattern.strip()
    wildcard = text.startswith("*.")
    if wildcard:
        text = text[2:]
    if "*" in text.replace("\\*", ""):
        raise ReportError(f"name pattern {pattern!r}: '*' is only allowed as a whole first "
                          "label, as in *.example.com")
    try:
        canonical = normalise(text)
    except (ValueError, IndexError) as exc:
        raise ReportError(f"name pattern {pattern!r}: {exc}") from None
    if canonical == "." and wildcard:
        raise ReportError(f"name pattern {pattern!r}: a wildcard needs a parent domain")
    return wildcard, canonical


def _client_ids(db: Database, client: str) -> list[int]:
    try:
        net = ipaddress.ip_network(client.strip(), strict=False)
    except ValueError:
        raise ReportError(f"--client must be an IP address or CIDR, not {client!r}") from None
    ids = []
    for row in _rows(db, "SELECT id, addr FROM clients"):
        try:
            addr = ipaddress.ip_address(row["addr"])
        except ValueError:
            continue
        if addr.version == net.version and addr in net:
            ids.append(row["id"])
    return ids


# -------------------------------------------------------------------- helpers
def _overflow(db: Database, since: float | None, until: float | None, table: str = "log_overflow") -> dict:
    if table not in db.table_names():
        return {"total": 0, "in_window": 0, "last": None}
    row = _rows(db, f"SELECT coalesce(sum(dropped), 0) AS total, max(ts) AS last FROM {table}")[0]
    win = _rows(
        db, f"SELECT coalesce(sum(dropped), 0) AS n FROM {table} WHERE ts >= ? AND ts < ?",
        (since if since is not None else float("-inf"), until if until is not None else float("inf")),
    )[0]
    return {"total": int(row["total"]), "in_window": int(win["n"]), "last": iso(row["last"])}


def _size_dropped(db: Database, since: float | None, until: float | None) -> dict:
    """Lookups (``total``...) and finished connections deleted for ``[log] max_size_mb``."""
    out = _overflow(db, since, until, "log_size_drops")
    out["connections"] = 0
    if "log_size_drops" in db.table_names() and "connections" in db["log_size_drops"].columns_dict:
        n = _rows(db, "SELECT coalesce(sum(connections), 0) AS n FROM log_size_drops")[0]["n"]
        out["connections"] = int(n)
    return out


_KEY = ", ".join(f"r.{c}" for c in ROLLUP_COLUMNS)


def _has_rollup(db: Database) -> bool:
    # A schema-1 log (read-only here, so not migrated) has only rows: aggregate those.
    return bool(_rows(db, "SELECT 1 AS x FROM sqlite_master WHERE type = 'table' AND name = 'lookup_rollup'"))


def _whole_hours(since: float | None, until: float | None) -> tuple[int | None, int | None] | None:
    """The rollup hours lying wholly inside ``[since, until)`` as ``[first, end)`` (None: open);
    None when there is none."""
    first = None if since is None else int(-(-since // ROLLUP_SECONDS))
    end = None if until is None else int(until // ROLLUP_SECONDS)
    if first is not None and end is not None and first >= end:
        return None
    return first, end


def _materialise_window(db: Database, since: float | None, until: float | None, only: _Where) -> None:
    """Aggregate the window into a small temp table that every section then reads.

    Grouped by (name, verdict, mode, client, rule, rcode): millions of lookups shrink to
    (roughly) names x clients. Whole hours come from ``lookup_rollup``; only the partial
    hours at the window's edges are counted from raw rows (a ts-range scan). Read-only
    connections may still write TEMP tables.
    """
    hours = _whole_hours(since, until) if _has_rollup(db) else None
    parts: list[str] = []
    params: list[object] = []
    edges: list[tuple[float | None, float | None]] = [(since, until)]
    if hours is not None:
        first, end = hours
        cond, cond_params = [only.sql], list(only.params)
        if first is not None:
            cond.append("r.hour >= ?")
            cond_params.append(first)
        if end is not None:
            cond.append("r.hour < ?")
            cond_params.append(end)
        decoded = ", ".join(f"nullif(r.{c}, {ROLLUP_NULL}) AS {c}" for c in ROLLUP_COLUMNS)
        parts.append(f"SELECT {decoded}, r.n AS n, r.first AS first, r.last AS last "
                     f"FROM lookup_rollup r WHERE {' AND '.join(cond)}")
        params += cond_params
        edges = []
        if first is not None:
            edges.append((since, first * ROLLUP_SECONDS))
        if end is not None:
            edges.append((end * ROLLUP_SECONDS, until))
    for lo, hi in edges:
        cond, cond_params = window(lo, hi, "r.ts")
        parts.append(f"SELECT {_KEY}, count(*) AS n, min(r.ts) AS first, max(r.ts) AS last "
                     f"FROM lookup_rows r WHERE {' AND '.join([*cond, only.sql])} GROUP BY {_KEY}")
        params += [*cond_params, *only.params]
    columns = ", ".join(ROLLUP_COLUMNS)
    db.execute("DROP TABLE IF EXISTS temp.dg_window")
    db.execute(
        f"CREATE TEMP TABLE dg_window AS SELECT {columns}, sum(n) AS n, min(first) AS first, "
        f"max(last) AS last FROM ({' UNION ALL '.join(parts)}) GROUP BY {columns}",
        params,
    )
    db.execute("CREATE INDEX temp.ix_dg_window_name ON dg_window (name_id)")


def _clients_for(db: Database, name_ids: list[int], condition: str = "1",
                 params: tuple = ()) -> dict[int, tuple[list[str], int]]:
    """name_id -> (up to 20 clients, most lookups first; how many distinct clients)."""
    if not name_ids:
        return {}
    marks = ",".join("?" * len(name_ids))
    out: dict[int, tuple[list[str], int]] = {}
    for row in _rows(
        db,
        "SELECT w.name_id AS name_id, c.addr AS addr, sum(w.n) AS n FROM dg_window w "
        f"LEFT JOIN clients c ON c.id = w.client_id WHERE w.name_id IN ({marks}) AND {condition} "
        "GROUP BY w.name_id, w.client_id ORDER BY w.name_id, n DESC, c.addr",
        (*name_ids, *params),
    ):
        listed, count = out.get(row["name_id"], ([], 0))
        if len(listed) < _CLIENT_LIST_MAX and row["addr"] is not None:
            listed.append(row["addr"])
        out[row["name_id"]] = (listed, count + 1)
    return out


def _rules_for(db: Database, name_ids: list[int], condition: str = "1",
               params: tuple = ()) -> dict[int, list[str | None]]:
    if not name_ids:
        return {}
    marks = ",".join("?" * len(name_ids))
    out: dict[int, list[str | None]] = {}
    for row in _rows(
        db,
        "SELECT DISTINCT w.name_id AS name_id, u.rule AS rule FROM dg_window w "
        f"LEFT JOIN rules u ON u.id = w.rule_id WHERE w.name_id IN ({marks}) AND {condition} "
        "ORDER BY w.name_id, u.rule",
        (*name_ids, *params),
    ):
        out.setdefault(row["name_id"], []).append(row["rule"])
    return out


def _top_names(db: Database, verdict: int, top: int) -> list[dict]:
    rows = _rows(
        db,
        "SELECT w.name_id AS name_id, n.name AS name, sum(w.n) AS count, "
        "sum(CASE WHEN w.mode = 0 THEN w.n ELSE 0 END) AS enforce, "
        "sum(CASE WHEN w.mode = 1 THEN w.n ELSE 0 END) AS audit, "
        "min(w.first) AS first, max(w.last) AS last "
        "FROM dg_window w JOIN names n ON n.id = w.name_id WHERE w.verdict = ? "
        "GROUP BY w.name_id ORDER BY count DESC, n.name LIMIT ?",
        (verdict, top),
    )
    ids = [r["name_id"] for r in rows]
    clients = _clients_for(db, ids, "w.verdict = ?", (verdict,))
    rules = _rules_for(db, ids, "w.verdict = ?", (verdict,))
    return [
        {
            "name": r["name"], "count": r["count"], "enforce": r["enforce"], "audit": r["audit"],
            "first_seen": iso(r["first"]), "last_seen": iso(r["last"]),
            "clients": clients.get(r["name_id"], ([], 0))[0],
            "client_count": clients.get(r["name_id"], ([], 0))[1],
            "rules": rules.get(r["name_id"], []),
        }
        for r in rows
    ]


def _rcode_text(rcode: int | None) -> str:
    if rcode is None:
        return "DROPPED"
    try:
        return dns.rcode.Rcode(rcode).name
    except ValueError:
        return f"RCODE{rcode}"


def _blocked_connections(db: Database, since: float | None, until: float | None,
                         filters: Filters, top: int) -> list[dict]:
    if "connections" not in db.table_names():
        return []
    cond, params = window(since, until)
    cond.append("coalesce(verdict, '') NOT IN ('allow', 'allowed', 'accept')")
    rows = _rows(
        db,
        "SELECT destination, protocol, port, name, verdict, count(*) AS count, min(ts) AS first, "
        "max(ts) AS last, json_group_array(DISTINCT source) AS sources FROM connections "
        f"WHERE {' AND '.join(cond)} GROUP BY destination, protocol, port, name, verdict "
        "ORDER BY count DESC, destination",
        params,
    )
    out = []
    for r in rows:
        sources = [s for s in json.loads(r["sources"]) if s is not None]
        if filters.client is not None:
            net = ipaddress.ip_network(filters.client.strip(), strict=False)
            sources = [s for s in sources if _in_net(s, net)]
            if not sources:
                continue
        if filters.name is not None:
            wildcard, text = _parse_name_pattern(filters.name)
            if not (_below(r["name"], text) if wildcard else r["name"] == text):
                continue
        out.append({
            "destination": r["destination"], "protocol": r["protocol"], "port": r["port"],
            "name": r["name"], "verdict": r["verdict"], "count": r["count"],
            "first_seen": iso(r["first"]), "last_seen": iso(r["last"]),
            "sources": sources[:_CLIENT_LIST_MAX],
        })
        if len(out) >= top:
            break
    return out


def _in_net(addr: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        a = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return a.version == net.version and a in net


def client_names(db: Database, since: float | None, until: float | None) -> dict[str, str]:
    """address -> the name it had during the window (the latest label wins)."""
    if "client_labels" not in db.table_names():
        return {}
    out: dict[str, str] = {}
    for r in _rows(db, "SELECT c.addr AS addr, l.name AS name FROM client_labels l "
                       "JOIN clients c ON c.id = l.client_id WHERE (? IS NULL OR l.since <= ?) "
                       "AND (l.until IS NULL OR ? IS NULL OR l.until > ?) ORDER BY l.since",
                   (until, until, since, since)):
        out[r["addr"]] = r["name"]
    return out


def _head(db: Database, schema_id: str, since: float | None, until: float | None,
          filters: Filters, now: float) -> dict:
    path = db.execute("PRAGMA database_list").fetchone()[2]
    return {
        "schema": schema_id,
        "database": path,
        "generated": iso(now),
        "window": {"since": iso(since), "until": iso(until)},
        "filters": filters.as_dict(),
        "overflow": _overflow(db, since, until),
        "size_dropped": _size_dropped(db, since, until),
        "client_names": client_names(db, since, until),
    }


