"""The JSON Schemas (2020-12) that fix the shape of every report's JSON output.

Add fields only by bumping the ``schema`` string; ``tests/test_report.py`` validates every
report against these.
"""

from __future__ import annotations

# /2: client names (a Docker container's, ``user:NAME`` for a fenced user): ``client_names``
# in every report's head, ``client_name`` in each lookup.
SUMMARY_SCHEMA_ID = "dnsguard-report-summary/2"
NAMES_SCHEMA_ID = "dnsguard-report-names/2"
LOOKUP_SCHEMA_ID = "dnsguard-report-lookup/2"

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
            "window": _WINDOW, "filters": _FILTERS, "overflow": _OVERFLOW,
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
