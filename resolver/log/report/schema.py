"""The JSON Schemas (2020-12) that fix the shape of every report's JSON output.

Add fields only by bumping the ``schema`` string; ``tests/test_report.py`` validates every
report against these.
"""

from __future__ import annotations

# /2: client names (a Docker container's, ``user:NAME`` for a fenced user): ``client_names``
# in every report's head, ``client_name`` in each lookup; the summary also gains ``egress``
# (issue #12). ``size_dropped`` (issue #11) is in every head.
SUMMARY_SCHEMA_ID = "dnsguard-report-summary/2"
NAMES_SCHEMA_ID = "dnsguard-report-names/2"
LOOKUP_SCHEMA_ID = "dnsguard-report-lookup/2"
CONNECTIONS_SCHEMA_ID = "dnsguard-report-connections/1"

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
_SIZE_DROPPED = {
    **_OVERFLOW,
    "required": [*_OVERFLOW["required"], "connections"],
    "properties": {**_OVERFLOW["properties"],
                   "connections": {**_COUNT, "description": "finished connection rows deleted (cumulative)"}},
    "description": "Logged lookups deleted, oldest first, to keep the log under [log] max_size_mb "
                   "(cumulative; `in_window` counts deletions made in the window, not the rows' times), "
                   "and the finished connections deleted with them.",
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

_BYTES = {"type": "integer", "minimum": 0, "description": "bytes counted by conntrack (IP headers included)"}
_BYTES_OR_NULL = {"type": ["integer", "null"], "minimum": 0,
                  "description": "null: a blocked attempt, or not counted yet"}
_CONN_OVERFLOW = {
    "type": "object",
    "description": "Connections the recorder could not record (cumulative), and how often the "
                   "kernel's event buffer overran (each answered with a resynchronising dump).",
    "required": ["dropped", "dropped_in_window", "overruns", "lost_names", "last", "gaps"],
    "additionalProperties": False,
    "properties": {
        "dropped": _COUNT, "dropped_in_window": _COUNT, "overruns": _COUNT,
        "lost_names": {**_COUNT, "description": "Addresses whose name the fence could not hand the "
                       "recorder: their connections may be recorded without a name."},
        "last": _TIME_OR_NULL,
        "gaps": {"type": "array", "description": "Periods overlapping the window when the recorder was not "
                 "running: connections made then may be missing. until null: not back.",
                 "items": {"type": "object", "required": ["since", "until", "reason"],
                           "additionalProperties": False,
                           "properties": {"since": {"type": "string"}, "until": _TIME_OR_NULL,
                                          "reason": {"type": ["string", "null"]}}}},
    },
}
_EGRESS_NAME = {
    "type": "object",
    "required": ["name", "client", "connections", "bytes_out", "bytes_in", "verdicts", "first_seen",
                 "last_seen", "large_upload"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "client": {"type": "string", "description": "the [[clients]] name, else the source address"},
        "connections": _COUNT, "bytes_out": _BYTES, "bytes_in": _BYTES,
        "verdicts": {"type": "array", "items": {"enum": ["allowed", "would-block"]}},
        "first_seen": _TIME, "last_seen": _TIME,
        "large_upload": {"type": "boolean", "description": "bytes_out above upload_warn_mb"},
    },
}
_LARGE_UPLOAD = {
    "type": "object",
    "required": ["name", "client", "connections", "bytes_out", "first_seen", "last_seen"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "client": {"type": "string"}, "connections": _COUNT,
                   "bytes_out": _BYTES, "first_seen": _TIME, "last_seen": _TIME},
}
_UNNAMED = {
    "type": "object",
    "required": ["destination", "protocol", "port", "verdict", "connections", "bytes_out", "bytes_in",
                 "clients", "first_seen", "last_seen"],
    "additionalProperties": False,
    "properties": {
        "destination": {"type": ["string", "null"]}, "protocol": {"type": ["string", "null"]},
        "port": {"type": ["integer", "null"]}, "verdict": {"enum": ["allowed", "would-block"]},
        "connections": _COUNT, "bytes_out": _BYTES, "bytes_in": _BYTES, "clients": _STRINGS,
        "first_seen": _TIME, "last_seen": _TIME,
    },
}
_EGRESS = {
    "type": "object",
    "description": "Connections the fence let through, from conntrack (allowed and would-block).",
    "required": ["upload_warn_mb", "egress_by_name", "large_uploads", "unnamed_egress", "overflow"],
    "additionalProperties": False,
    "properties": {
        "upload_warn_mb": {"type": "number"},
        "egress_by_name": {"type": "array", "items": _EGRESS_NAME,
                           "description": "per name and client, largest upload first"},
        "large_uploads": {"type": "array", "items": _LARGE_UPLOAD,
                          "description": "a client that sent more than upload_warn_mb MB to one name"},
        "unnamed_egress": {"type": "array", "items": _UNNAMED,
                           "description": "to addresses dnsguard never handed out, per destination"},
        "overflow": _CONN_OVERFLOW,
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
            "window": _WINDOW, "filters": _FILTERS, "overflow": _OVERFLOW, "size_dropped": _SIZE_DROPPED,
            "client_names": {"type": "object", "additionalProperties": {"type": "string"},
                             "description": "client address -> the name it had in the window (the "
                                            "latest, if several): a Docker container, or user:NAME"}}
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
    "egress": _EGRESS,
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

CONNECTIONS_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": CONNECTIONS_SCHEMA_ID,
    "title": "dnsguard report connections",
    "type": "object",
    "required": ["schema", "database", "generated", "window", "filters", "overflow", "connections"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": CONNECTIONS_SCHEMA_ID},
        "database": {"type": "string"},
        "generated": _TIME,
        "window": _WINDOW,
        "filters": {
            "type": "object",
            "required": ["client", "name", "verdict", "open"],
            "additionalProperties": False,
            "properties": {"client": {"type": ["string", "null"]}, "name": {"type": ["string", "null"]},
                           "verdict": {"enum": ["allowed", "blocked", "would-block", None]},
                           "open": {"type": "boolean"}},
        },
        "overflow": _CONN_OVERFLOW,
        "connections": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "start", "end", "open", "duration_s", "source", "source_port",
                             "client", "client_name", "destination", "protocol", "port", "name", "verdict",
                             "rule", "packets_out", "bytes_out", "packets_in", "bytes_in"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "integer"},
                    "start": _TIME,
                    "end": {**_TIME_OR_NULL, "description": "null while open"},
                    "open": {"type": "boolean"},
                    "duration_s": {"type": "number", "description": "so far, if open"},
                    "source": {"type": ["string", "null"]},
                    "source_port": {"type": ["integer", "null"]},
                    "client": {"type": ["string", "null"], "description": "the [[clients]] name"},
                    "client_name": {"type": ["string", "null"],
                                    "description": "the source's name when the connection started: a Docker "
                                                   "container's, or user:NAME for a fenced user"},
                    "destination": {"type": ["string", "null"]},
                    "protocol": {"type": ["string", "null"]},
                    "port": {"type": ["integer", "null"], "description": "ICMP: the type"},
                    "name": {"type": ["string", "null"],
                             "description": "the name whose answer put the destination in the set; "
                                            "null: an address dnsguard never handed out"},
                    "verdict": {"enum": ["allowed", "blocked", "would-block"]},
                    "rule": {"type": ["string", "null"],
                             "description": "the allow rule or [allow] cidrs entry; null when blocked"},
                    "packets_out": _BYTES_OR_NULL, "bytes_out": _BYTES_OR_NULL,
                    "packets_in": _BYTES_OR_NULL, "bytes_in": _BYTES_OR_NULL,
                },
            },
        },
    },
}

# `report tail --format json` prints one such object per line (JSON Lines), so -f can stream.
LOOKUP_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": LOOKUP_SCHEMA_ID,
    "title": "dnsguard lookup (one line of report tail --format json)",
    "type": "object",
    "required": ["id", "ts", "time", "client", "client_name", "transport", "qname", "qtype", "verdict",
                 "mode", "rule", "rcode", "answers", "cached", "latency_ms", "note"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "integer"},
        "ts": {"type": "number", "description": "seconds since the epoch, UTC"},
        "time": _TIME,
        "client": {"type": ["string", "null"]},
        "client_name": {"type": ["string", "null"],
                        "description": "the client's Docker container name or user:NAME, when known"},
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
