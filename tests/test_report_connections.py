"""`dnsguard report connections` and the summary's egress sections over a real log file:
lookups written by QueryLog, connection rows in the table the fence's recorders write."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_report import validate

from resolver.cli.report import report as report_cli
from resolver.core.logdb import ensure_connections_table
from resolver.core.names import text_to_wire
from resolver.log import report as rpt
from resolver.log.querylog import QueryLog

NOW = 1_700_000_000.0
H = 3600.0
MB = 1_000_000
AGENT, OTHER = "192.0.2.2", "192.0.2.3"

# (ago, end ago | None = open, source, client, destination, port, verdict, name, rule, bytes out, bytes in)
CONNS = [
    (
        50 * 60,
        49 * 60,
        AGENT,
        "agent",
        "203.0.113.10",
        443,
        "allowed",
        "api.example.com",
        "*.example.com",
        8 * MB,
        20_000,
    ),
    (
        40 * 60,
        39 * 60,
        AGENT,
        "agent",
        "203.0.113.10",
        443,
        "allowed",
        "api.example.com",
        "*.example.com",
        5 * MB,
        10_000,
    ),
    (
        30 * 60,
        None,
        AGENT,
        "agent",
        "203.0.113.11",
        443,
        "allowed",
        "ws.example.com",
        "*.example.com",
        1_500,
        900_000,
    ),
    (20 * 60, 20 * 60, AGENT, "agent", "198.51.100.7", 443, "blocked", None, None, None, None),
    (15 * 60, 14 * 60, OTHER, None, "203.0.113.12", 80, "would-block", None, None, 4_000, 70_000),
    (
        10 * 60,
        9 * 60,
        OTHER,
        None,
        "203.0.113.10",
        443,
        "allowed",
        "api.example.com",
        "*.example.com",
        2 * MB,
        1_000,
    ),
    (
        5 * H,
        5 * H - 10,
        AGENT,
        "agent",
        "203.0.113.10",
        443,
        "allowed",
        "api.example.com",
        "*.example.com",
        50 * MB,
        1_000,
    ),  # outside a 1h window
]


@pytest.fixture(scope="module")
def log_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("connreport") / "log.db"
    log = QueryLog(str(path), retention_days=None)
    log.start()
    log.submit(
        (
            NOW - 60 * 60,
            AGENT,
            "udp",
            text_to_wire("api.example.com"),
            1,
            "allow",
            "enforce",
            "*.example.com",
            0,
            None,
            False,
            1.0,
            None,
        )
    )
    assert log.close()
    with closing(sqlite3.connect(path)) as conn:
        ensure_connections_table(conn)
        for i, (ago, end, src, client, dst, port, verdict, name, rule, out, inn) in enumerate(CONNS):
            conn.execute(
                "INSERT INTO connections (ts, end_ts, source, source_port, client, destination, protocol, "
                "port, verdict, name, rule, packets_out, bytes_out, packets_in, bytes_in) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    NOW - ago,
                    None if end is None else NOW - end,
                    src,
                    None if verdict == "blocked" else 40000 + i,
                    client,
                    dst,
                    "tcp",
                    port,
                    verdict,
                    name,
                    rule,
                    None if out is None else out // 1000,
                    out,
                    None if inn is None else inn // 1000,
                    inn,
                ),
            )
        conn.execute(
            "INSERT INTO connection_overflow (ts, dropped, overruns) VALUES (?, ?, ?)", (NOW - 30 * 60, 3, 1)
        )
        # the fence's names that did not reach the recorder, and two periods it was down
        conn.execute("INSERT INTO connection_overflow (ts, dropped, overruns, lost_names) "
                     "VALUES (?, 0, 0, 7)", (NOW - 40 * 60,))
        conn.executemany("INSERT INTO connection_gaps (since, until, reason) VALUES (?, ?, ?)", [
            (NOW - 40 * 60, NOW - 35 * 60, "connection recorder exited with status -9"),
            (NOW - 5 * 60, None, "connection recorder exited with status 1")])
        conn.commit()
    return path


@pytest.fixture
def db(log_db: Path):
    database = rpt.open_log(str(log_db))
    yield database
    database.close()


def listing(db, **filters) -> list[dict]:
    data = rpt.connections(db, since=NOW - H, until=NOW, now=NOW, filters=rpt.ConnFilters(**filters))
    validate(data, rpt.CONNECTIONS_SCHEMA)
    return data["connections"]


def test_connections_listing_and_filters(db) -> None:
    rows = listing(db)
    assert [r["destination"] for r in rows] == [
        "203.0.113.10",
        "203.0.113.10",
        "203.0.113.11",
        "198.51.100.7",
        "203.0.113.12",
        "203.0.113.10",
    ]
    first = rows[0]
    assert (first["verdict"], first["name"], first["rule"], first["client"], first["bytes_out"]) == (
        "allowed",
        "api.example.com",
        "*.example.com",
        "agent",
        8 * MB,
    )
    assert first["open"] is False and first["duration_s"] == 60.0
    assert [r["source_port"] for r in rows if r["verdict"] == "blocked"] == [None]
    assert [r["destination"] for r in listing(db, open_only=True)] == ["203.0.113.11"]
    assert listing(db, open_only=True)[0]["end"] is None
    assert {r["verdict"] for r in listing(db, verdict="blocked")} == {"blocked"}
    assert len(listing(db, client="agent")) == 4
    assert {r["source"] for r in listing(db, client="192.0.2.3")} == {OTHER}
    assert len(listing(db, client="192.0.2.0/24")) == 6
    assert {r["name"] for r in listing(db, name="*.example.com")} == {"api.example.com", "ws.example.com"}
    assert listing(db, name="example.com") == []
    with pytest.raises(rpt.ReportError):
        listing(db, verdict="deny")


def test_window_includes_connections_open_during_it(db) -> None:
    # the open one started 30 min ago: a window from 10 min ago still has it
    data = rpt.connections(db, since=NOW - 600, until=NOW, now=NOW)
    assert "203.0.113.11" in {r["destination"] for r in data["connections"]}
    assert data["overflow"] == {
        "dropped": 3,
        "dropped_in_window": 0,
        "overruns": 1,
        "lost_names": 7,
        "last": rpt.iso(NOW - 1800),
        # only the gap that overlaps the window; the other ended before it
        "gaps": [{"since": rpt.iso(NOW - 300), "until": None,
                  "reason": "connection recorder exited with status 1"}],
    }


def test_summary_egress_by_name_largest_upload_first_with_warning(db) -> None:
    s = rpt.summary(db, since=NOW - H, until=NOW, now=NOW, upload_warn_mb=10)
    from test_report import validate as check

    check(s, rpt.SUMMARY_SCHEMA)
    eg = s["egress"]
    by = [
        (r["name"], r["client"], r["connections"], r["bytes_out"], r["large_upload"])
        for r in eg["egress_by_name"]
    ]
    assert by == [
        ("api.example.com", "agent", 2, 13 * MB, True),
        ("api.example.com", OTHER, 1, 2 * MB, False),
        ("ws.example.com", "agent", 1, 1_500, False),
    ]
    assert [(u["name"], u["client"], u["bytes_out"]) for u in eg["large_uploads"]] == [
        ("api.example.com", "agent", 13 * MB)
    ]
    (unnamed,) = eg["unnamed_egress"]  # the hard-coded address let through in audit
    assert (unnamed["destination"], unnamed["verdict"], unnamed["bytes_in"]) == (
        "203.0.113.12",
        "would-block",
        70_000,
    )
    assert [c["destination"] for c in s["blocked_connections"]] == ["198.51.100.7", "203.0.113.12"]
    assert eg["overflow"]["dropped"] == 3
    assert (
        rpt.summary(db, since=NOW - H, until=NOW, now=NOW, upload_warn_mb=20)["egress"]["large_uploads"] == []
    )


def _cli(log_db: Path, *args: str) -> str:
    result = CliRunner().invoke(report_cli, [*args, "--db", str(log_db)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_connections_table_json_csv(log_db: Path) -> None:
    # the fixture's times are in the past: give the window explicitly
    window = ["--since", rpt.iso(NOW - H), "--until", rpt.iso(NOW)]
    table = _cli(log_db, "connections", *window)
    lines = table.splitlines()
    header = next(ln for ln in lines if ln.startswith("START"))
    assert header.split() == [
        "START",
        "(UTC)",
        "END",
        "CLIENT",
        "SOURCE",
        "DESTINATION",
        "PORT",
        "VERDICT",
        "NAME",
        "RULE",
        "OUT",
        "IN",
    ]
    assert "WARNING: 3 connections were not recorded" in table
    assert "WARNING: 7 addresses' names did not reach the recorder" in table
    gap = (f"WARNING: connections may be missing from {rpt.iso(NOW - 2400)[:19].replace('T', ' ')} UTC to "
           f"{rpt.iso(NOW - 2100)[:19].replace('T', ' ')} UTC: connection recorder exited with status -9")
    assert gap in table
    assert "UTC to now (not back): connection recorder exited with status 1" in table
    open_line = next(ln for ln in lines if "203.0.113.11" in ln)
    assert " open " in open_line and "1.5 KB" in open_line and "900 KB" in open_line
    assert "8 MB" in next(ln for ln in lines if "192.0.2.2:40000" in ln)
    data = json.loads(_cli(log_db, "connections", *window, "--verdict", "allowed", "--format", "json"))
    validate(data, rpt.CONNECTIONS_SCHEMA)
    assert data["filters"] == {"client": None, "name": None, "verdict": "allowed", "open": False}
    assert len(data["connections"]) == 4
    rows = list(
        csv.DictReader(
            io.StringIO(_cli(log_db, "connections", *window, "--client", "agent", "--format", "csv"))
        )
    )
    assert len(rows) == 4 and rows[0]["bytes_out"] == str(8 * MB) and rows[0]["client"] == "agent"
    assert list(rows[0]) == list(rpt.CONNECTIONS_SCHEMA["properties"]["connections"]["items"]["required"])
    assert "no connections" in _cli(
        log_db, "connections", "--since", rpt.iso(NOW + H), "--verdict", "blocked"
    )


def test_cli_summary_egress_sections(log_db: Path, tmp_path: Path) -> None:
    window = ["--since", rpt.iso(NOW - H), "--until", rpt.iso(NOW)]
    text = _cli(log_db, *window)
    assert "LARGE UPLOAD: agent sent 13 MB to api.example.com in 2 connections" in text
    assert "Egress by name" in text and "Egress to addresses never looked up" in text
    egress = text.split("Egress by name", 1)[1].splitlines()
    assert "13 MB" in egress[2] and "api.example.com" in egress[2] and "LARGE UPLOAD" in egress[2]
    policy = tmp_path / "policy.toml"
    policy.write_text("[report]\nupload_warn_mb = 20\n")
    assert "LARGE UPLOAD" not in _cli(log_db, *window, "--policy", str(policy))
    assert "LARGE UPLOAD" in _cli(log_db, *window, "--policy", str(policy), "--upload-warn-mb", "12")
    data = json.loads(_cli(log_db, *window, "--format", "json"))
    validate(data, rpt.SUMMARY_SCHEMA)
    assert data["egress"]["upload_warn_mb"] == 10
    rows = list(csv.reader(io.StringIO(_cli(log_db, *window, "--format", "csv"))))
    egress_rows = [r for r in rows if r[0] == "egress_by_name"]
    assert egress_rows[0][1] == "api.example.com" and "bytes_out=13000000" in egress_rows[0][6]
    assert "large_upload" in egress_rows[0][6]
    assert [r[1] for r in rows if r[0] == "large_uploads"] == ["api.example.com"]
    assert ["connection_overflow", "dropped", "3"] == [r for r in rows if r[0] == "connection_overflow"][0][
        :3
    ]
    assert ["connection_overflow", "lost_names", "7"] in [r[:3] for r in rows]
    assert [r[1] for r in rows if r[0] == "connection_gaps"] == ["connection recorder exited with status -9",
                                                                  "connection recorder exited with status 1"]


def test_old_log_without_connection_columns_still_reports(tmp_path: Path) -> None:
    """A log written before issue #12: the connections table has only its first columns."""
    path = tmp_path / "old.db"
    log = QueryLog(str(path), retention_days=None)
    log.start()
    assert log.close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP TABLE connections")
        conn.execute(
            "CREATE TABLE connections (ts REAL, source TEXT, destination TEXT, protocol TEXT, "
            "port INTEGER, verdict TEXT, name TEXT)"
        )
        conn.execute(
            "INSERT INTO connections VALUES (?, ?, ?, 'tcp', 443, 'blocked', NULL)",
            (NOW - 60, AGENT, "198.51.100.7"),
        )
        conn.commit()
    db = rpt.open_log(str(path))
    try:
        data = rpt.connections(db, since=NOW - H, until=NOW, now=NOW)
        validate(data, rpt.CONNECTIONS_SCHEMA)
        assert [(r["verdict"], r["bytes_out"], r["open"]) for r in data["connections"]] == [
            ("blocked", None, False)
        ]
        assert rpt.summary(db, since=NOW - H, until=NOW, now=NOW)["egress"]["egress_by_name"] == []
    finally:
        db.close()


def test_cli_summary_egress_names_a_container_by_its_label(log_db: Path, tmp_path: Path) -> None:
    """#14's client names reach the egress sections: a source with no [[clients]] entry that is a
    Docker container (a client_labels row) is shown by its container name."""
    import shutil

    path = tmp_path / "labelled.db"
    shutil.copy(log_db, path)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("INSERT OR IGNORE INTO clients (addr) VALUES (?)", (OTHER,))
        cid = conn.execute("SELECT id FROM clients WHERE addr = ?", (OTHER,)).fetchone()[0]
        conn.execute("INSERT INTO client_labels (client_id, name, since, until) "
                     "VALUES (?, 'sandbox-7', 0, NULL)", (cid,))
    text = _cli(path, "--since", rpt.iso(NOW - H), "--until", rpt.iso(NOW))
    egress = text.split("Egress by name", 1)[1].split("Egress to addresses never looked up")
    by_name = [ln for ln in egress[0].splitlines() if "api.example.com" in ln]
    assert any("sandbox-7" in ln for ln in by_name) and not any(OTHER in ln for ln in by_name)
    assert "sandbox-7" in egress[1] and "203.0.113.12" in egress[1]
    listing = json.loads(_cli(path, "connections", "--since", rpt.iso(NOW - H), "--until", rpt.iso(NOW),
                              "--format", "json"))
    validate(listing, rpt.CONNECTIONS_SCHEMA)
    assert {(c["source"], c["client"], c["client_name"]) for c in listing["connections"]} == {
        (AGENT, "agent", None), (OTHER, None, "sandbox-7")}
    table = _cli(path, "connections", "--since", rpt.iso(NOW - H), "--until", rpt.iso(NOW))
    assert any("sandbox-7" in ln and "203.0.113.12" in ln for ln in table.splitlines())
    only = json.loads(_cli(path, "connections", "--since", rpt.iso(NOW - H), "--until", rpt.iso(NOW),
                           "--client", "sandbox-7", "--format", "json"))
    assert only["connections"] and {c["source"] for c in only["connections"]} == {OTHER}


def test_a_short_window_reads_its_rows_through_the_indexes(log_db: Path) -> None:
    """The window condition is three index ranges (began in it; began before, ended in it; still
    open), not a scan of every connection before `--until`: SQLite's plan says so."""
    from resolver.log.report.connections import _where

    db = rpt.open_log(str(log_db))
    try:
        cond, params = _where(db, NOW - H, NOW, rpt.ConnFilters())
        plan = " ".join(r[3] for r in db.conn.execute(
            f"EXPLAIN QUERY PLAN SELECT count(*) FROM connections WHERE {' AND '.join(cond)}", params))
    finally:
        db.close()
    assert "MULTI-INDEX OR" in plan and "ix_connections_end" in plan, plan
