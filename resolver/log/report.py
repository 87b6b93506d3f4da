"""Read the lookup log: summaries, per-name listings and the recent tail.

Everything here returns plain data (dicts, lists, str, int, float, None) so the CLI
(``resolver.cli.report``) only formats it, and the JSON output is exactly these values.
The JSON shapes are fixed by the schemas below (JSON Schema 2020-12); add fields only
by bumping the ``schema`` string.

The database is opened read-only (``file:...?mode=ro``), so a report can run while
``dnsguard serve`` writes: WAL readers neither block nor are blocked by the writer.
Aggregates read the writer's per-hour counts (``lookup_rollup``) for the whole hours of
a window and the integer base table ``lookup_rows`` only for its partial edge hours (see
``resolver.querylog``), never the decoding ``lookups`` view; they join the text tables
only for the few rows they print.
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
from resolver.log.querylog import ROLLUP_COLUMNS, ROLLUP_NULL, ROLLUP_SECONDS
from resolver.policy import suspicious

SUMMARY_SCHEMA_ID = "dnsguard-report-summary/1"
NAMES_SCHEMA_ID = "dnsguard-report-names/1"
LOOKUP_SCHEMA_ID = "dnsguard-report-lookup/1"

_TIME = {"type": "string",
         "description": "ISO 8601 UTC, millisecond precision, e.g. 2024-05-01T12:00:00.000Z"}
_TIME_OR_NULL = {"type": ["string", "null"]}
_COUNT = {"type": "integer", "minimum": 0}
_STRINGS = {"type": "array", "items": {"type": "string"}}

_WINDOW = {
    "type": "object",
    "required": ["since", "until"],
    "additionalProperties": False,
    "properties": {"since": _TIME_OR_NULL, "until": _TIME_OR_NULL},
}
_FILTERS = {
    "type": "object",
    "required": ["client", "verdict", "name"],
    "additionalProperties": False,
    "properties": {
        "client": {"type": ["string", "null"]},
        "verdict": {"enum": ["allow", "deny", None]},
        "name": {"type": ["string", "null"]},
    },
}
_OVERFLOW = {
    "type": "object",
    "description": "Lookups the server could not log because its queue was full (cumulative).",
    "required": ["total", "in_window", "last"],
    "additionalProperties": False,
    "properties": {"total": _COUNT, "in_window": _COUNT, "last": _TIME_OR_NULL},
}
_NAME_STAT = {
    "type": "object",
    "required": ["name", "count", "enforce", "audit", "first_seen", "last_seen", "clients",
                 "client_count", "rules"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "count": _COUNT,
        "enforce": _COUNT,
        "audit": _COUNT,
        "first_seen": _TIME,
        "last_seen": _TIME,
        "clients": {**_STRINGS, "description": "up to 20 client addresses, most frequent first"},
        "client_count": _COUNT,
        "rules": {"type": "array", "items": {"type": ["string", "null"]},
                  "description": "policy entries that decided; null = default deny"},
    },
}
_FAILURE = {
    "type": "object",
    "required": ["name", "rcode", "count", "first_seen", "last_seen", "clients", "client_count"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "rcode": {"type": "string"},
        "count": _COUNT,
        "first_seen": _TIME,
        "last_seen": _TIME,
        "clients": _STRINGS,
        "client_count": _COUNT,
    },
}
_CONNECTION = {
    "type": "object",
    "required": ["destination", "protocol", "port", "name", "verdict", "count", "first_seen",
                 "last_seen", "sources"],
    "additionalProperties": False,
    "properties": {
        "destination": {"type": ["string", "null"]},
        "protocol": {"type": ["string", "null"]},
        "port": {"type": ["integer", "null"]},
        "name": {"type": ["string", "null"]},
        "verdict": {"type": ["string", "null"]},
        "count": _COUNT,
        "first_seen": _TIME,
        "last_seen": _TIME,
        "sources": _STRINGS,
    },
}

_FINDING_NAMES = 5
_FINDING = {
    "type": "object",
    "required": ["domain", "kind", "reason", "names", "name_count", "lookups", "first_seen", "last_seen"],
    "additionalProperties": False,
    "properties": {
        "domain": {"type": "string"},
        "kind": {"type": "string", "description": "long-label, hex, base32, base64, entropy, charset, "
                                                  "similar, burst or volume"},
        "reason": {"type": "string"},
        "names": {**_STRINGS, "description": f"up to {_FINDING_NAMES} of the names implicated"},
        "name_count": _COUNT,
        "lookups": _COUNT,
        "first_seen": _TIME,
        "last_seen": _TIME,
    },
}

def _report_schema(schema_id: str, title: str, body: dict) -> dict:
    """A report document's schema: the head every report shares (see `_head`), then ``body``."""
    head = {"schema": {"const": schema_id}, "database": {"type": "string"}, "generated": _TIME,
            "window": _WINDOW, "filters": _FILTERS, "overflow": _OVERFLOW}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": schema_id,
        "title": title,
        "type": "object",
        "required": [*head, *body],
        "additionalProperties": False,
        "properties": {**head, **body},
    }


SUMMARY_SCHEMA: dict = _report_schema(SUMMARY_SCHEMA_ID, "dnsguard report (summary)", {
    "totals": {
        "type": "object",
        "required": ["lookups", "allow", "deny", "undecided", "enforce", "audit",
                     "distinct_names", "distinct_clients", "by_verdict_mode"],
        "additionalProperties": False,
        "properties": {
            "lookups": _COUNT,
            "allow": _COUNT,
            "deny": _COUNT,
            "undecided": {**_COUNT, "description": "lookups with no policy decision: malformed or "
                          "dropped packets, and clients outside [server] clients (REFUSED)"},
            "enforce": _COUNT,
            "audit": _COUNT,
            "distinct_names": _COUNT,
            "distinct_clients": _COUNT,
            "by_verdict_mode": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["verdict", "mode", "count"],
                    "additionalProperties": False,
                    "properties": {
                        "verdict": {"enum": ["allow", "deny", None]},
                        "mode": {"enum": ["enforce", "audit", None]},
                        "count": _COUNT,
                    },
                },
            },
        },
    },
    "top_denied": {"type": "array", "items": _NAME_STAT},
    "top_allowed": {"type": "array", "items": _NAME_STAT},
    "upstream_failures": {
        "type": "array", "items": _FAILURE,
        "description": "allowed lookups answered SERVFAIL or NXDOMAIN, by name and rcode",
    },
    "blocked_connections": {"type": "array", "items": _CONNECTION},
    "suspicious": {
        "type": "array", "items": _FINDING,
        "description": "exfiltration-shaped names (the same findings `dnsguard learn` leaves out)",
    },
})

NAMES_SCHEMA: dict = _report_schema(NAMES_SCHEMA_ID, "dnsguard report names", {
    "names": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name", "count", "allow", "deny", "enforce", "audit", "rules",
                         "rcodes", "clients", "client_count", "first_seen", "last_seen"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "count": _COUNT,
                "allow": _COUNT,
                "deny": _COUNT,
                "enforce": _COUNT,
                "audit": _COUNT,
                "rules": {"type": "array", "items": {"type": ["string", "null"]}},
                "rcodes": {"type": "object", "additionalProperties": _COUNT,
                           "description": "rcode mnemonic -> count; 'DROPPED' = no reply sent"},
                "clients": _STRINGS,
                "client_count": _COUNT,
                "first_seen": _TIME,
                "last_seen": _TIME,
            },
        },
    },
})

# `report tail --format json` prints one such object per line (JSON Lines), so -f can stream.
LOOKUP_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": LOOKUP_SCHEMA_ID,
    "title": "dnsguard lookup (one line of report tail --format json)",
    "type": "object",
    "required": ["id", "ts", "time", "client", "transport", "qname", "qtype", "verdict", "mode",
                 "rule", "rcode", "answers", "cached", "latency_ms", "note"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "integer"},
        "ts": {"type": "number", "description": "seconds since the epoch, UTC"},
        "time": _TIME,
        "client": {"type": ["string", "null"]},
        "transport": {"enum": ["udp", "tcp", None]},
        "qname": {"type": ["string", "null"], "description": "null when the packet was unreadable"},
        "qtype": {"type": ["string", "null"]},
        "verdict": {"enum": ["allow", "deny", None]},
        "mode": {"enum": ["enforce", "audit", None]},
        "rule": {"type": ["string", "null"]},
        "rcode": {"type": ["string", "null"], "description": "null = no reply was sent"},
        "answers": {"type": ["array", "null"], "items": {"type": "string"}},
        "cached": {"type": "boolean"},
        "latency_ms": {"type": ["number", "null"]},
        "note": {"type": ["string", "null"]},
    },
}

LOOKUP_COLUMNS = tuple(LOOKUP_SCHEMA["required"])
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
def _overflow(db: Database, since: float | None, until: float | None) -> dict:
    if "log_overflow" not in db.table_names():
        return {"total": 0, "in_window": 0, "last": None}
    row = _rows(db, "SELECT coalesce(sum(dropped), 0) AS total, max(ts) AS last FROM log_overflow")[0]
    win = _rows(
        db, "SELECT coalesce(sum(dropped), 0) AS n FROM log_overflow WHERE ts >= ? AND ts < ?",
        (since if since is not None else float("-inf"), until if until is not None else float("inf")),
    )[0]
    return {"total": int(row["total"]), "in_window": int(win["n"]), "last": iso(row["last"])}


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
    }


# -------------------------------------------------------------------- reports
def summary(db: Database, *, since: float | None, until: float | None,
            filters: Filters = Filters(), top: int = 10, now: float | None = None) -> dict:
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
    elif filters == Filters() or not _has_rollup(db):
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
