"""Read the lookup log: summaries, per-name listings and the recent tail.

Everything here returns plain data (dicts, lists, str, int, float, None) so the CLI
(``resolver.cli.report``) only formats it, and the JSON output is exactly these values.
The JSON shapes are fixed by the schemas below (JSON Schema 2020-12); add fields only
by bumping the ``schema`` string.

The database is opened read-only (``file:...?mode=ro``), so a report can run while
``dnsguard serve`` writes: WAL readers neither block nor are blocked by the writer.
Aggregates read the writer's per-hour counts (``lookup_rollup``) for the whole hours of
a window and the integer base table ``lookup_rows`` only for its partial edge hours (see
``resolver.log.querylog``), never the decoding ``lookups`` view; they join the text tables
only for the few rows they print.

Modules: ``schema`` (the JSON Schemas), ``query`` (filters, time, the window SQL), ``views``
(summary, names), ``tail``, ``connections`` (recorded connections, egress per name). The
public names are re-exported here.
"""

from resolver.log.report.connections import (
    CONNECTION_VERDICTS,
    ConnFilters,
    connection_overflow,
    connections,
    egress,
)
from resolver.log.report.query import Filters, ReportError, iso, open_log, parse_when
from resolver.log.report.schema import (
    CONNECTIONS_SCHEMA,
    CONNECTIONS_SCHEMA_ID,
    LOOKUP_COLUMNS,
    LOOKUP_SCHEMA,
    LOOKUP_SCHEMA_ID,
    NAMES_SCHEMA,
    NAMES_SCHEMA_ID,
    SUMMARY_SCHEMA,
    SUMMARY_SCHEMA_ID,
)
from resolver.log.report.tail import last_id, tail
from resolver.log.report.views import NAME_SORTS, names, summary

__all__ = [
    "CONNECTIONS_SCHEMA", "CONNECTIONS_SCHEMA_ID", "CONNECTION_VERDICTS", "ConnFilters",
    "connection_overflow", "connections", "egress",
    "LOOKUP_COLUMNS", "LOOKUP_SCHEMA", "LOOKUP_SCHEMA_ID", "NAMES_SCHEMA", "NAMES_SCHEMA_ID", "NAME_SORTS",
    "SUMMARY_SCHEMA", "SUMMARY_SCHEMA_ID", "Filters", "ReportError", "iso", "last_id", "names", "open_log",
    "parse_when", "summary", "tail",
]
