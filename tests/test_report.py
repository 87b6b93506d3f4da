"""Reports over a real lookup log written by QueryLog: windows, filters, JSON schema, CLI."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import write_log

from resolver.cli.report import report as report_cli
from resolver.core.names import text_to_wire
from resolver.log import report as rpt
from resolver.log.querylog import QueryLog

REPO = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z; every window below is relative to it
H = 3600.0
D = 86400.0


def R(ago: float, name: str | None, client: str, verdict: str | None, *, mode: str = "enforce",
      rule: str | None = None, rcode: int | None = 0, qtype: int | None = 1, answers: str | None = None,
      note: str | None = None) -> tuple:
    return (NOW - ago, client, "udp", None if name is None else text_to_wire(name), qtype, verdict, mode,
            rule, rcode, answers, False, 1.0, note)


A, B, C = "127.0.0.1", "127.0.0.2", "::1"

# (record, how many times). Ages: within 1h, ~2h, ~3d, ~10d.
FIXTURE: list[tuple[tuple, int]] = [
    (R(10 * 60, "pypi.org", A, "allow", rule="pypi.org", answers='["151.101.0.223"]'), 5),
    (R(2 * H, "pypi.org", B, "allow", mode="audit", rule="pypi.org"), 3),
    (R(3 * D, "pypi.org", A, "allow", rule="pypi.org"), 2),
    (R(20 * 60, "a.b.example.com", A, "allow", rule="*.example.com"), 4),
    (R(2 * H, "x.example.com", C, "allow", rule="*.example.com", rcode=2), 2),   # SERVFAIL upstream
    (R(2 * H, "gone.example.com", A, "allow", rule="*.example.com", rcode=3), 1),  # NXDOMAIN upstream
    (R(30 * 60, "example.com", A, "deny", rcode=3), 6),                  # apex, default deny
    (R(2 * H, "example.com", B, "deny", mode="audit", rcode=0), 1),      # audit: denied but answered
    (R(5 * 60, "evil\\.example.com", C, "deny", rcode=3), 2),            # label "evil.example" under com
    (R(2 * H, "tracker.net", A, "deny", rule="tracker.net", rcode=3), 7),
    (R(2 * H, "tracker.net", C, "deny", rule="tracker.net", rcode=3), 1),
    (R(10 * D, "tracker.net", A, "deny", rule="tracker.net", rcode=3), 9),
    (R(15 * 60, None, B, None, rcode=1, qtype=None, note="formerr: truncated"), 1),
]


def _expected(since_ago: float, pred=lambda rec: True) -> int:
    return sum(n for r, n in FIXTURE if r[0] >= NOW - since_ago and pred(r))


@pytest.fixture(scope="module")
def log_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "log.db"
    write_log(str(path), FIXTURE)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("INSERT INTO log_overflow (ts, dropped) VALUES (?, ?)", (NOW - H, 42))
        conn.execute("INSERT INTO log_overflow (ts, dropped) VALUES (?, ?)", (NOW - 5 * D, 8))
        conn.executemany(
            "INSERT INTO connections (ts, source, destination, protocol, port, verdict, name) "
            "VALUES (?,?,?,?,?,?,?)",
            [(NOW - H, A, "203.0.113.9", "tcp", 443, "deny", "tracker.net"),
             (NOW - H + 1, A, "203.0.113.9", "tcp", 443, "deny", "tracker.net"),
             (NOW - H, B, "198.51.100.1", "tcp", 443, "allow", "pypi.org")],
        )
    return path


@pytest.fixture
def db(log_db: Path) -> Iterator[Any]:
    database = rpt.open_log(str(log_db))
    yield database
    database.close()


def summary(db, since_ago: float | None = D, until_ago: float = 0.0, **filters: Any) -> dict:
    since = None if since_ago is None else NOW - since_ago
    return rpt.summary(db, since=since, until=NOW - until_ago + 1e-3, filters=rpt.Filters(**filters),
                       now=NOW)


# ------------------------------------------------------------- JSON schema check
def validate(value: Any, schema: dict, path: str = "$") -> None:
    """A small validator for the subset of JSON Schema the report schemas use."""
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} != {schema['const']!r}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        checks = {
            "string": lambda v: isinstance(v, str), "null": lambda v: v is None,
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            "boolean": lambda v: isinstance(v, bool), "array": lambda v: isinstance(v, list),
            "object": lambda v: isinstance(v, dict),
        }
        assert any(checks[t](value) for t in types), f"{path}: {value!r} is not {types}"
    if "minimum" in schema and isinstance(value, int | float):
        assert value >= schema["minimum"], f"{path}: {value} < {schema['minimum']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing {key!r}"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                validate(item, props[key], f"{path}.{key}")
            elif extra is False:
                raise AssertionError(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                validate(item, extra, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")


def test_validator_rejects_wrong_shapes() -> None:
    with pytest.raises(AssertionError):
        validate({"schema": rpt.SUMMARY_SCHEMA_ID}, rpt.SUMMARY_SCHEMA)
    with pytest.raises(AssertionError):
        validate({"id": "1"}, {"type": "object", "properties": {"id": {"type": "integer"}}})
    with pytest.raises(AssertionError):
        validate({"x": 1}, {"type": "object", "additionalProperties": False})


def test_schemas_are_valid_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for schema in (rpt.SUMMARY_SCHEMA, rpt.NAMES_SCHEMA, rpt.LOOKUP_SCHEMA):
        jsonschema.Draft202012Validator.check_schema(schema)


# ------------------------------------------------------------------ windows
@pytest.mark.parametrize("since_ago", [H, 2.5 * H, D, 7 * D, 30 * D])
def test_summary_window_totals(db, since_ago: float) -> None:
    s = summary(db, since_ago)
    t = s["totals"]
    assert t["lookups"] == _expected(since_ago)
    assert t["allow"] == _expected(since_ago, lambda r: r[5] == "allow")
    assert t["deny"] == _expected(since_ago, lambda r: r[5] == "deny")
    assert t["undecided"] == _expected(since_ago, lambda r: r[5] is None)
    assert t["audit"] == _expected(since_ago, lambda r: r[6] == "audit")
    assert t["enforce"] + t["audit"] == t["lookups"]
    assert t["distinct_names"] == len({r[3] for r, _ in FIXTURE if r[0] >= NOW - since_ago and r[3]})
    assert t["distinct_clients"] == len({r[1] for r, _ in FIXTURE if r[0] >= NOW - since_ago})
    validate(s, rpt.SUMMARY_SCHEMA)


def test_until_closes_the_window(db) -> None:
    # From 4 days ago until 1 day ago: only the 3-day-old rows.
    t = summary(db, since_ago=4 * D, until_ago=D)["totals"]
    assert t["lookups"] == 2
    assert t["distinct_names"] == 1


def test_parse_when() -> None:
    assert rpt.parse_when("1h", NOW) == NOW - H
    assert rpt.parse_when("7d", NOW) == NOW - 7 * D
    assert rpt.parse_when("30m", NOW) == NOW - 1800
    assert rpt.parse_when("now", NOW) == NOW
    assert rpt.parse_when("2023-11-14T22:13:20Z") == NOW
    assert rpt.parse_when("2023-11-14T22:13:20") == NOW  # no offset: UTC, like the log
    assert rpt.parse_when("2023-11-14T23:13:20+01:00") == NOW
    with pytest.raises(rpt.ReportError):
        rpt.parse_when("yesterday", NOW)


# ------------------------------------------------------------------ sections
def test_top_denied_and_allowed(db) -> None:
    s = summary(db, since_ago=D)
    denied = {r["name"]: r for r in s["top_denied"]}
    assert [r["name"] for r in s["top_denied"]] == ["tracker.net", "example.com", "evil\\.example.com"]
    assert denied["tracker.net"]["count"] == 8
    assert denied["tracker.net"]["clients"] == [A, C]  # most lookups first
    assert denied["tracker.net"]["client_count"] == 2
    assert denied["tracker.net"]["rules"] == ["tracker.net"]
    assert denied["example.com"]["rules"] == [None]  # default deny
    assert denied["example.com"]["enforce"] == 6 and denied["example.com"]["audit"] == 1
    assert denied["example.com"]["first_seen"] == rpt.iso(NOW - 2 * H)
    assert denied["example.com"]["last_seen"] == rpt.iso(NOW - 30 * 60)
    allowed = [(r["name"], r["count"]) for r in s["top_allowed"]]
    assert allowed == [("pypi.org", 8), ("a.b.example.com", 4), ("x.example.com", 2),
                       ("gone.example.com", 1)]


def test_upstream_failures_are_allowed_lookups_with_servfail_or_nxdomain(db) -> None:
    fails = summary(db, since_ago=D)["upstream_failures"]
    got = {(r["name"], r["rcode"], r["count"], tuple(r["clients"])) for r in fails}
    # example.com / tracker.net got NXDOMAIN from dnsguard itself (denied): not upstream failures.
    assert got == {("x.example.com", "SERVFAIL", 2, (C,)), ("gone.example.com", "NXDOMAIN", 1, (A,))}


def test_overflow_is_reported_in_total_and_window(db) -> None:
    s = summary(db, since_ago=D)
    assert s["overflow"] == {"total": 50, "in_window": 42, "last": rpt.iso(NOW - H)}


def test_blocked_connections(db) -> None:
    conns = summary(db, since_ago=D)["blocked_connections"]
    assert len(conns) == 1
    c = conns[0]
    assert (c["destination"], c["protocol"], c["port"], c["name"], c["count"], c["sources"]) == \
        ("203.0.113.9", "tcp", 443, "tracker.net", 2, [A])


# ------------------------------------------------------------------ filters
@pytest.mark.parametrize(("filters", "pred"), [
    ({"client": A}, lambda r: r[1] == A),
    ({"client": "127.0.0.0/8"}, lambda r: r[1] in (A, B)),
    ({"client": "::1"}, lambda r: r[1] == C),
    ({"client": "10.9.9.9"}, lambda r: False),
    ({"verdict": "deny"}, lambda r: r[5] == "deny"),
    ({"verdict": "allow", "client": A}, lambda r: r[5] == "allow" and r[1] == A),
    ({"name": "example.com"}, lambda r: r[3] == text_to_wire("example.com")),
    ({"name": "EXAMPLE.com."}, lambda r: r[3] == text_to_wire("example.com")),
    # Any depth below, never the apex, and not a name whose *label* merely contains ".example".
    ({"name": "*.example.com"}, lambda r: r[3] in {text_to_wire(n) for n in
                                                   ("a.b.example.com", "x.example.com", "gone.example.com")}),
    ({"name": "*.b.example.com"}, lambda r: r[3] == text_to_wire("a.b.example.com")),
    ({"name": "*.com"}, lambda r: r[3] is not None and r[3] != text_to_wire("tracker.net")
                                  and r[3] != text_to_wire("pypi.org")),
    ({"name": "nosuch.example"}, lambda r: False),
    ({"name": "*.example.com", "verdict": "deny"}, lambda r: False),
])
def test_filters(db, filters: dict, pred) -> None:
    s = summary(db, since_ago=30 * D, **filters)
    assert s["totals"]["lookups"] == _expected(30 * D, pred)
    assert s["filters"] == {"client": None, "verdict": None, "name": None, **filters}
    validate(s, rpt.SUMMARY_SCHEMA)


@pytest.mark.parametrize("filters", [{"client": "not-an-ip"}, {"verdict": "maybe"},
                                     {"name": "a.*.example.com"}, {"name": "*"}])
def test_bad_filters_are_report_errors(db, filters: dict) -> None:
    with pytest.raises(rpt.ReportError):
        summary(db, **filters)


# ------------------------------------------------------------------ names, tail
def test_names_report(db) -> None:
    data = rpt.names(db, since=NOW - 30 * D, until=NOW + 1, now=NOW)
    validate(data, rpt.NAMES_SCHEMA)
    by = {r["name"]: r for r in data["names"]}
    assert set(by) == {"pypi.org", "a.b.example.com", "x.example.com", "gone.example.com", "example.com",
                       "evil\\.example.com", "tracker.net"}
    t = by["tracker.net"]
    assert (t["count"], t["deny"], t["allow"], t["client_count"]) == (17, 17, 0, 2)
    assert t["rcodes"] == {"NXDOMAIN": 17}
    assert t["first_seen"] == rpt.iso(NOW - 10 * D)
    p = by["pypi.org"]
    assert (p["count"], p["allow"], p["audit"], p["rules"]) == (10, 10, 3, ["pypi.org"])
    assert by["example.com"]["rcodes"] == {"NOERROR": 1, "NXDOMAIN": 6}
    assert [r["name"] for r in data["names"]][:2] == ["tracker.net", "pypi.org"]  # by count
    by_name = rpt.names(db, since=None, until=None, sort="name", limit=3, now=NOW)["names"]
    assert [r["name"] for r in by_name] == ["a.b.example.com", "evil\\.example.com", "example.com"]


def test_tail_last_n_and_after_id(db) -> None:
    rows = rpt.tail(db, n=3)
    assert len(rows) == 3
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    for r in rows:
        validate(r, rpt.LOOKUP_SCHEMA)
    total = sum(n for _, n in FIXTURE)
    everything = rpt.tail(db, n=10_000)
    assert len(everything) == total
    assert [r["ts"] for r in everything] == sorted(r["ts"] for r in everything)  # oldest first
    assert [r["ts"] for r in rows] == [r["ts"] for r in everything[-3:]]  # the newest by time
    # after_id (what -f polls with) follows insertion order.
    ids = sorted(r["id"] for r in everything)
    assert [r["id"] for r in rpt.tail(db, n=100, after_id=ids[-5])] == ids[-4:]
    assert [r["id"] for r in rpt.tail(db, n=2, after_id=ids[-5])] == ids[-4:-2]
    denied = rpt.tail(db, n=10_000, filters=rpt.Filters(verdict="deny", client=C))
    assert {(r["qname"], r["verdict"], r["client"]) for r in denied} == {
        ("evil\\.example.com", "deny", C), ("tracker.net", "deny", C)}
    assert everything[0]["qname"] == "tracker.net"  # ten days old
    first = next(r for r in everything if r["answers"])
    assert first["qname"] == "pypi.org" and first["answers"] == ["151.101.0.223"]
    assert first["rcode"] == "NOERROR" and first["cached"] is False
    assert [r["qname"] for r in rpt.tail(db, n=2, filters=rpt.Filters(name="pypi.org"))] == ["pypi.org"] * 2
    malformed = [r for r in everything if r["qname"] is None]
    assert len(malformed) == 1 and malformed[0]["note"] == "formerr: truncated"


def test_open_log_errors(tmp_path: Path) -> None:
    with pytest.raises(rpt.ReportError, match="no lookup log"):
        rpt.open_log(str(tmp_path / "missing.db"))
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(rpt.ReportError, match="not a dnsguard lookup log"):
        rpt.open_log(str(other))


def test_report_reads_while_the_writer_writes(tmp_path: Path) -> None:
    path = tmp_path / "live.db"
    log = QueryLog(str(path), retention_days=None)  # NOW is in 2023: keep the rows
    log.start()
    try:
        log.submit(R(0, "pypi.org", A, "allow"))
        assert log.flush(10)
        db = rpt.open_log(str(path))
        seen = [1]
        for i in range(5):
            for _ in range(100):
                log.submit(R(0, f"n{i}.example.org", A, "deny"))
            # Each read sees a consistent snapshot: never fewer rows than before, never more
            # than were submitted.
            seen.append(rpt.summary(db, since=None, until=None)["totals"]["lookups"])
            assert seen[-2] <= seen[-1] <= 1 + 100 * (i + 1)
        assert log.flush(10)
        assert rpt.summary(db, since=None, until=None)["totals"]["lookups"] == 501
        db.close()
    finally:
        assert log.close()


# ---------------------------------------------------------------------- CLI
def run(args: list[str]) -> Any:
    return CliRunner().invoke(report_cli, args, catch_exceptions=False)


def test_cli_summary_table(log_db: Path) -> None:
    res = run(["--db", str(log_db), "--since", "2023-11-01T00:00:00Z", "--until", "2023-11-15"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "\x1b[" not in out  # no colour when stdout is not a terminal
    lines = out.splitlines()
    assert lines[0].startswith("WARNING: 50 lookups were not logged")
    assert "tracker.net" in out and "Top denied names" in out and "SERVFAIL" in out
    assert "Blocked connections" in out and "203.0.113.9" in out
    header = next(line for line in lines if line.startswith(" COUNT") or line.startswith("COUNT"))
    assert "NAME" in header


def test_cli_summary_json_matches_schema(log_db: Path) -> None:
    res = run(["--db", str(log_db), "--since", "2023-11-01", "--until", "2023-11-15",
               "--verdict", "deny", "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    validate(data, rpt.SUMMARY_SCHEMA)
    assert data["totals"]["lookups"] == _expected(30 * D, lambda r: r[5] == "deny")
    assert data["filters"]["verdict"] == "deny"


def test_cli_summary_csv(log_db: Path) -> None:
    res = run(["--db", str(log_db), "--since", "2023-11-01", "--until", "2023-11-15", "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.output)))
    totals = {r["key"]: int(r["count"]) for r in rows if r["section"] == "totals"}
    assert totals["lookups"] == _expected(30 * D)
    assert {r["key"] for r in rows if r["section"] == "top_denied"} >= {"tracker.net", "example.com"}


def test_cli_names_subcommand_inherits_group_filters(log_db: Path) -> None:
    res = run(["--db", str(log_db), "--name", "*.example.com", "names", "--since", "2023-11-01",
               "--until", "2023-11-15", "--format", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    validate(data, rpt.NAMES_SCHEMA)
    assert {r["name"] for r in data["names"]} == {"a.b.example.com", "x.example.com", "gone.example.com"}
    table = run(["--db", str(log_db), "names", "--since", "2023-11-01", "--until", "2023-11-15"])
    assert table.exit_code == 0 and "evil\\.example.com" in table.output
    csv_out = run(["--db", str(log_db), "names", "--since", "2023-11-01", "--until", "2023-11-15",
                   "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(csv_out.output)))
    assert {r["name"]: int(r["count"]) for r in rows}["tracker.net"] == 17


def test_cli_tail_formats(log_db: Path) -> None:
    res = run(["--db", str(log_db), "tail", "-n", "4", "--format", "json"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == 4
    for line in lines:
        validate(json.loads(line), rpt.LOOKUP_SCHEMA)
    table = run(["tail", "--db", str(log_db), "-n", "2"])
    assert table.exit_code == 0 and len(table.output.splitlines()) == 3  # header + 2
    csv_res = run(["tail", "--db", str(log_db), "-n", "3", "--format", "csv", "--verdict", "deny"])
    rows = list(csv.DictReader(io.StringIO(csv_res.output)))
    assert len(rows) == 3 and {r["verdict"] for r in rows} == {"deny"}


@pytest.mark.parametrize(("args", "message"), [
    (["--db", "/nonexistent/dnsguard.db"], "no lookup log"),
    (["--since", "yesterday"], "cannot read time"),
    (["--since", "1h", "--until", "2h"], "is not before"),
    (["--client", "bogus"], "IP address or CIDR"),
    (["--name", "a.*.b"], "only allowed as a whole first label"),
    (["tail", "-f", "--until", "1h"], "cannot be combined"),
])
def test_cli_errors_are_clean(log_db: Path, args: list[str], message: str) -> None:
    if "--db" not in args:
        args = ["--db", str(log_db), *args]
    res = CliRunner().invoke(report_cli, args)
    assert res.exit_code == 1
    assert message in res.output
    assert "Traceback" not in res.output


def test_cli_help_has_examples() -> None:
    for args in (["--help"], ["names", "--help"], ["tail", "--help"]):
        res = run(args)
        assert res.exit_code == 0 and "Examples:" in res.output and "dnsguard report" in res.output


def test_tail_follow_prints_new_rows_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    path = tmp_path / "follow.db"
    log = QueryLog(str(path))
    log.start()
    log.submit(R(0, "first.example.org", A, "allow"))
    assert log.flush(10)
    code = ("import sys; from resolver.cli.report import report; "
            "report(sys.argv[1:], prog_name='dnsguard report')")
    with subprocess.Popen(
        [sys.executable, "-c", code, "--db", str(path), "tail", "-f", "--interval", "0.05",
         "--format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ) as proc:
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True)
        reader.start()
        try:
            assert json.loads(lines.get(timeout=20))["qname"] == "first.example.org"
            log.submit(R(0, "second.example.org", A, "deny"))
            log.submit(R(0, "third.example.org", B, "allow"))
            assert log.flush(10)
            got = [json.loads(lines.get(timeout=20))["qname"] for _ in range(2)]
            assert got == ["second.example.org", "third.example.org"]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
            reader.join(10)
            assert "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()


def test_gen_lookups_script_makes_a_readable_log(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_lookups", REPO / "scripts" / "gen_lookups.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    path = tmp_path / "gen.db"
    gen.generate(str(path), rows=20_000, days=2, name_count=500, seed=3, end=NOW)
    db = rpt.open_log(str(path))
    s = rpt.summary(db, since=None, until=None, now=NOW)
    validate(s, rpt.SUMMARY_SCHEMA)
    assert s["totals"]["lookups"] == 20_000
    assert s["totals"]["allow"] > 0 and s["totals"]["deny"] > 0 and s["totals"]["audit"] > 0
    assert s["top_denied"] and s["top_allowed"] and s["upstream_failures"]
    last_day = rpt.summary(db, since=NOW - D, until=NOW + 1, now=NOW)["totals"]["lookups"]
    assert 9_000 < last_day < 11_000  # evenly spread over two days
    db.close()


@pytest.fixture(scope="module")
def spread_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 lookups at random times over three days, written by the real writer in small
    batches: random names, clients, verdicts, modes, rules and rcodes, NULLs included."""
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("spread") / "spread.db"
    log = QueryLog(str(path), retention_days=None, batch_max=64)
    log.start()
    for _ in range(3000):
        verdict = rng.choice(["allow", "deny", None])
        log.submit(R(rng.uniform(0, 3 * D), None if verdict is None else rng.choice(
                         ["pypi.org", "a.example.com", "b.example.com", "tracker.net", "rare.example.com"]
                         if rng.random() < 0.98 else ["once.example.org"]),
                     rng.choice([A, B, C]), verdict, mode=rng.choice(["enforce", "audit"]),
                     rule=rng.choice([None, "*.example.com", "pypi.org"]), rcode=rng.choice([0, 2, 3, None])))
    assert log.close()
    return path


def test_rollup_windows_equal_counting_every_row(spread_db: Path, monkeypatch) -> None:
    """Whole hours from the writer's rollup plus raw edge hours must give exactly what
    aggregating every row gives, for windows that start and end anywhere, with any filter."""
    rng = random.Random(11)
    database = rpt.open_log(str(spread_db))
    try:
        for i in range(60):
            since = None if i % 10 == 0 else NOW - rng.uniform(0, 3.2 * D)
            until = None if i % 7 == 0 else (since or NOW - 4 * D) + rng.choice([60.0, 1800.0, 5000.0, 2 * D])
            filters = rpt.Filters(**rng.choice([{}, {"client": A}, {"verdict": "deny"},
                                                 {"name": "*.example.com"}, {"name": "once.example.org"},
                                                 {"client": "127.0.0.0/8", "verdict": "allow"}]))
            n = rng.choice([1, 7, 50])
            both = []
            for rollup in (True, False):
                monkeypatch.setattr(rpt.query, "_has_rollup", lambda db, rollup=rollup: rollup)
                both.append((rpt.summary(database, since=since, until=until, filters=filters, now=NOW),
                             rpt.names(database, since=since, until=until, filters=filters, now=NOW,
                                       limit=None),
                             rpt.tail(database, n=n, since=since, until=until, filters=filters)))
            assert both[0] == both[1], (since, until, filters)
        monkeypatch.undo()
        whole = rpt.summary(database, since=None, until=None, now=NOW)
        assert whole["totals"]["lookups"] == 3000
    finally:
        database.close()


def test_tail_finds_a_rare_name_in_an_old_hour(spread_db: Path) -> None:
    database = rpt.open_log(str(spread_db))
    try:
        rows = rpt.tail(database, n=1000, filters=rpt.Filters(name="once.example.org"))
        expected = database.execute(
            "SELECT count(*) FROM lookups WHERE qname = 'once.example.org'").fetchone()[0]
    finally:
        database.close()
    assert 0 < len(rows) == expected
    assert {r["qname"] for r in rows} == {"once.example.org"}
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)


def test_summary_shows_exfiltration_shaped_names(tmp_path: Path) -> None:
    """The report flags what `learn` would refuse: base32 chunks under one domain."""
    import base64

    path = tmp_path / "exfil.db"
    log = QueryLog(str(path), retention_days=None)
    log.start()
    secret = bytes(range(256)) * 2
    for i in range(0, 400, 20):
        chunk = base64.b32encode(secret[i:i + 20]).decode().rstrip("=").lower()
        log.submit(R(60 - i / 10, f"{chunk}.{i}.drop.attacker.example", A, "deny", rcode=3))
    for _ in range(5):
        log.submit(R(30, "pypi.org", A, "allow", rule="pypi.org"))
    assert log.close()
    database = rpt.open_log(str(path))
    try:
        data = summary(database)
    finally:
        database.close()
    validate(data, rpt.SUMMARY_SCHEMA)
    assert data["suspicious"], "base32 chunks must be reported"
    assert {f["domain"] for f in data["suspicious"]} == {"attacker.example"}
    assert all("pypi.org" not in f["names"] for f in data["suspicious"])
