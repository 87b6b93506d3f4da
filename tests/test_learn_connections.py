"""`dnsguard learn` with connection records: comments carry connections and bytes out, and
--diff lists names resolved but never connected to and uploads over the warning."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from resolver.cli.learn import learn as learn_cli
from resolver.core.logdb import ensure_connections_table
from resolver.core.names import text_to_wire
from resolver.log.querylog import QueryLog
from resolver.policy import learn as lrn

NOW = 1_700_000_000.0
AGENT = "192.0.2.2"
MB = 1_000_000


def lookup(ago: float, name: str, client: str = AGENT) -> tuple:
    return (NOW - ago, client, "udp", text_to_wire(name), 1, "allow", "audit", None, 0,
            '["203.0.113.10"]', False, 1.0, None)


def make_log(path: Path, conns: list[tuple[str, int, int]]) -> Path:
    """Lookups for three names; ``conns``: (name, bytes out, bytes in) rows from the agent."""
    log = QueryLog(str(path), retention_days=None)
    log.start()
    for name, n in (("api.example.org", 40), ("cdn.example.org", 3), ("idle.example.net", 2)):
        for i in range(n):
            log.submit(lookup(600 - i, name))
    assert log.close()
    with closing(sqlite3.connect(path)) as conn:
        ensure_connections_table(conn)
        conn.executemany(
            "INSERT INTO connections (ts, end_ts, source, source_port, destination, protocol, port, verdict, "
            "name, packets_out, bytes_out, packets_in, bytes_in) VALUES (?,?,?,?,?,'tcp',443,'would-block',"
            "?,?,?,?,?)",
            [(NOW - 500 + i, NOW - 400 + i, AGENT, 40000 + i, "203.0.113.10", name, out // 1000 + 1, out,
              inn // 1000 + 1, inn) for i, (name, out, inn) in enumerate(conns)])
        conn.commit()
    return path


@pytest.fixture
def log_db(tmp_path: Path) -> Path:
    return make_log(tmp_path / "log.db", [
        ("api.example.org", 12_000, 50_000), ("api.example.org", 7 * MB, 1_000),
        ("api.example.org", 6 * MB, 2_000), ("cdn.example.org", 500, 90_000)])


def run(*args: str) -> str:
    result = CliRunner().invoke(learn_cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_comments_say_connections_and_bytes_out(log_db: Path) -> None:
    text = run("--db", str(log_db), "--until", "2023-11-14T22:13:20Z")
    api = next(ln for ln in text.splitlines() if '"api.example.org"' in ln)
    assert "40 lookups (A), 3 connections, 13 MB out" in api
    cdn = next(ln for ln in text.splitlines() if '"cdn.example.org"' in ln)
    assert "3 lookups (A), 1 connection, 500 B out" in cdn
    idle = next(ln for ln in text.splitlines() if '"idle.example.net"' in ln)
    assert "2 lookups (A), 0 connections, 0 B out" in idle


def test_diff_lists_never_connected_and_large_uploads(log_db: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[allow]\ndomains = ["cdn.example.org"]\n[report]\nupload_warn_mb = 10\n')
    text = run("--db", str(log_db), "--diff", str(policy))
    assert ("resolved but never connected to in the window (1; allowed for nothing?):\n"
            "  ? idle.example.net") in text
    assert "uploads above 10 MB to one name from one client (1):\n" \
           "  ! api.example.org: 13 MB out in 3 connections from 192.0.2.2" in text
    assert "uploads above" not in run("--db", str(log_db), "--diff", str(policy), "--upload-warn-mb", "20")
    data = json.loads(run("--db", str(log_db), "--diff", str(policy), "--format", "json"))
    assert data["never_connected"] == ["idle.example.net"]
    assert data["large_uploads"] == [{"name": "api.example.org", "client": AGENT, "connections": 3,
                                      "bytes_out": 13_012_000}]
    assert data["upload_warn_mb"] == 10
    add = {a["rule"]: a for a in data["add"]}
    assert (add["api.example.org"]["connections"], add["api.example.org"]["bytes_out"]) == (3, 13_012_000)


def test_a_log_without_connection_records_says_nothing_about_them(tmp_path: Path) -> None:
    db = make_log(tmp_path / "plain.db", [])
    window = lrn.read_log(str(db))
    assert window.egress is None
    text = run("--db", str(db))
    assert "connection" not in next(ln for ln in text.splitlines() if '"api.example.org"' in ln)
    policy = tmp_path / "policy.toml"
    policy.write_text('[allow]\ndomains = []\n')
    diff = run("--db", str(db), "--diff", str(policy))
    assert "no connection records in this log" in diff
    data = json.loads(run("--db", str(db), "--diff", str(policy), "--format", "json"))
    assert data["never_connected"] is None
