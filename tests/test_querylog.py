"""The lookup-log writer against real SQLite files: counts, draining, overflow, lock and
unwritable-path recovery, retention. Every wait is a condition with a deadline."""

from __future__ import annotations

import math
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from helpers import wait_until

from resolver.core.model import LOG_FIELDS
from resolver.core.names import text_to_wire
from resolver.log import querylog, schema, upkeep
from resolver.log.querylog import QueryLog
from resolver.log.schema import SCHEMA_VERSION

# A submit that touched the locked database would wait out SQLite's busy timeout each time:
# 300 of them would take >= 15 s. Allowing 1 s (not microseconds) keeps a loaded CI machine,
# which may deschedule the test for a while, from failing it.
SUBMITS_WHILE_LOCKED = 300
BUSY_BOUND = min(1.0, SUBMITS_WHILE_LOCKED * schema.BUSY_TIMEOUT_S / 15)
CONTRACT_COLUMNS = ["id", "ts", "time", "client", "client_name", "transport", "qname", "qtype", "verdict",
                    "mode", "rule", "rcode", "answers", "cached", "latency_ms", "note"]


def rec(i: int = 0, *, ts: float | None = None, name: str | None = "pypi.org", client: str = "127.0.0.1",
        transport: str = "udp", qtype: int | None = 1, verdict: str | None = "allow",
        mode: str = "enforce", rule: str | None = "pypi.org", rcode: int | None = 0,
        answers: str | None = '["151.101.0.223"]', cached: bool = False, latency_ms: float = 1.5,
        note: str | None = None) -> tuple:
    record = (time.time() if ts is None else ts, client, transport,
              None if name is None else text_to_wire(name), qtype, verdict, mode, rule, rcode,
              answers, cached, latency_ms, note)
    assert len(record) == len(LOG_FIELDS)
    return record


def count(path: Path, table: str = "lookups", where: str = "1") -> int:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()[0]


def overflow_persisted(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT coalesce(sum(dropped), 0) FROM log_overflow").fetchone()[0]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "log.db"


@pytest.mark.parametrize("batch_max", [100, 5000])
def test_writes_exactly_n_rows_across_batches(db_path: Path, batch_max: int) -> None:
    """Small batches go row by row; big ones mostly through multi-row INSERT chunks plus a
    row-by-row remainder: both keep every field of every record, in order."""
    log = QueryLog(str(db_path), batch_max=batch_max, retention_days=None)
    n = schema._CHUNK_ROWS * 2 + 234
    for i in range(n):
        log.submit(rec(i, ts=1_700_000_000.0 + i, name=f"host{i % 37}.example.com", latency_ms=i / 8,
                       cached=bool(i % 2), answers=f'["192.0.2.{i % 250}"]'))
    log.start()
    assert log.flush(10)
    with closing(sqlite3.connect(db_path)) as conn:
        got = conn.execute(
            "SELECT ts, qname, latency_ms, cached, answers FROM lookups ORDER BY id").fetchall()
    assert got == [(1_700_000_000.0 + i, f"host{i % 37}.example.com", i / 8, i % 2, f'["192.0.2.{i % 250}"]')
                   for i in range(n)]
    assert log.written == n
    assert count(db_path) == n
    # Normalised: 37 distinct names stored once each, one client.
    assert count(db_path, "names") == 37
    assert count(db_path, "clients") == 1
    assert log.close()
    assert log.last_error is None


def test_close_drains_everything(db_path: Path) -> None:
    log = QueryLog(str(db_path), batch_max=500)
    log.start()
    n = 20_000
    for i in range(n):
        log.submit(rec(i))
    assert log.close(timeout=30)
    assert log.written == n
    assert count(db_path) == n


def test_records_submitted_before_start_are_written_by_close(db_path: Path) -> None:
    log = QueryLog(str(db_path))
    for i in range(10):
        log.submit(rec(i))
    assert log.close()
    assert count(db_path) == 10


def test_view_decodes_contract_columns(db_path: Path) -> None:
    log = QueryLog(str(db_path))
    log.start()
    t = 1_700_000_000.25
    log.submit(rec(ts=t, name="Files.PythonHosted.ORG.", client="::1", transport="tcp", qtype=65,
                   verdict="allow", mode="audit", rule="*.pythonhosted.org", rcode=0,
                   answers='["151.101.1.63"]', cached=True, latency_ms=0.25))
    log.submit(rec(ts=t + 1, name=None, qtype=None, verdict=None, rule=None, rcode=1, answers=None,
                   note="formerr: label > 63"))
    log.submit(rec(ts=t + 2, name="a\\.b.example", verdict="deny", rule=None, rcode=None, answers=None))
    log.submit(rec(ts=t + 3, qtype=65280, rcode=3, answers=None))
    assert log.close()
    with closing(sqlite3.connect(db_path)) as conn:
        conn.row_factory = sqlite3.Row
        cols = [r[1] for r in conn.execute("PRAGMA table_info(lookups)")]
        assert cols == CONTRACT_COLUMNS
        rows = [dict(r) for r in conn.execute("SELECT * FROM lookups ORDER BY ts")]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    first, malformed, dropped, unknown_type = rows
    assert first == {
        "id": first["id"], "ts": t, "time": "2023-11-14T22:13:20.250Z", "client": "::1",
        "client_name": None, "transport": "tcp", "qname": "files.pythonhosted.org", "qtype": "HTTPS",
        "verdict": "allow", "mode": "audit", "rule": "*.pythonhosted.org", "rcode": "NOERROR",
        "answers": '["151.101.1.63"]', "cached": 1, "latency_ms": 0.25, "note": None,
    }
    assert malformed["qname"] is None and malformed["qtype"] is None and malformed["verdict"] is None
    assert malformed["rcode"] == "FORMERR" and malformed["note"] == "formerr: label > 63"
    assert dropped["qname"] == "a\\.b.example"  # a dot inside a label stays escaped
    assert dropped["rcode"] is None and dropped["verdict"] == "deny" and dropped["rule"] is None
    assert unknown_type["qtype"] == "TYPE65280" and unknown_type["rcode"] == "NXDOMAIN"


def test_bad_record_is_skipped_and_does_not_wedge_the_queue(db_path: Path) -> None:
    log = QueryLog(str(db_path))
    log.start()
    log.submit(("not", "a", "record"))
    log.submit(rec(1))
    bad_ts = rec(2)
    for ts in (float("inf"), float("nan"), "soon"):
        log.submit((ts, *bad_ts[1:]))
    log.submit(rec(3, qtype=[1]))  # unhashable: cannot be mapped
    # In range for Python, not for the hour column or SQLite's integers: would fail every retry.
    log.submit((1e30, *bad_ts[1:]))
    log.submit(rec(4, qtype=2**63))
    log.submit(rec(5, rcode=-1))
    log.submit(rec(6))
    assert log.flush(10)
    assert count(db_path) == 2
    assert log.bad_records == 8
    assert not log.failing
    assert log.close()


def test_reopen_appends_and_reuses_ids(db_path: Path) -> None:
    for _ in range(2):
        log = QueryLog(str(db_path))
        log.start()
        for i in range(50):
            log.submit(rec(i, name=f"n{i % 5}.example.org", rule=None))
        assert log.close()
    assert count(db_path) == 100
    assert count(db_path, "names") == 5
    assert count(db_path, "rules") == 0


def test_overflow_counted_while_locked_and_submit_never_blocks(db_path: Path, capsys) -> None:
    log = QueryLog(str(db_path), queue_max=100, batch_max=50)
    log.start()
    log.submit(rec(0))
    assert log.flush(10)  # database exists with its schema

    locker = sqlite3.connect(db_path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        log.submit(rec(1))
        # The writer has taken that record and is failing to commit it.
        wait_until(lambda: log.failing, 10, what="writer to notice the lock")
        assert log.queued == 0
        t0 = time.perf_counter()
        for i in range(SUBMITS_WHILE_LOCKED):
            log.submit(rec(2 + i))
        elapsed = time.perf_counter() - t0
        assert elapsed < BUSY_BOUND, elapsed
        assert log.queued == 100
        assert log.overflow == 200
        assert count(db_path) == 1  # nothing else landed while locked (readers still work: WAL)
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    # Unlocked: the held record and every queued one land, and the overflow is persisted.
    assert log.flush(20)
    wait_until(lambda: overflow_persisted(db_path) == 200, 10, what="overflow row")
    assert count(db_path) == 1 + 1 + 100
    assert log.written == 102
    assert not log.failing
    assert log.close()
    err = capsys.readouterr().err
    failures = [line for line in err.splitlines() if "locked" in line]
    assert len(failures) == 1, err  # one line per episode, not per retry
    assert str(db_path) in failures[0]
    assert "writing again" in err


def test_unwritable_path_does_not_raise_and_recovers(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "notadir"
    blocker.write_text("a file where a directory should be\n")
    path = blocker / "log.db"
    log = QueryLog(str(path), queue_max=1000)
    log.start()  # must not raise
    for i in range(25):
        log.submit(rec(i))
    wait_until(lambda: log.failing, 10, what="writer to report the bad path")
    assert log.last_error is not None
    err = capsys.readouterr().err
    assert err.count(str(path)) == 1, err
    assert "cannot open" in err

    # Fix the path: the writer retries with backoff and writes everything it kept.
    blocker.unlink()
    blocker.mkdir()
    assert log.flush(30)
    assert not log.failing
    assert count(path) == 25
    assert log.close()
    assert "writing again" in capsys.readouterr().err


def test_close_gives_up_on_a_path_that_stays_unwritable(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    log = QueryLog(str(blocker / "log.db"))
    log.start()
    for i in range(7):
        log.submit(rec(i))
    t0 = time.monotonic()
    assert log.close(timeout=0.5) is False
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert "7 records not written" in err


def test_retention_prunes_old_rows_in_chunks(db_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(upkeep, "PRUNE_CHUNK", 1000)
    now = time.time()
    log = QueryLog(str(db_path), retention_days=2, prune_interval=0.05)
    log.start()
    for i in range(5500):
        log.submit(rec(i, ts=now - 3 * 86400 + i * 0.01))
    for i in range(40):
        log.submit(rec(i, ts=now - 86400 + i))
    assert log.flush(30)
    cutoff = now - 2 * 86400
    wait_until(lambda: count(db_path, where=f"ts < {cutoff}") == 0, 30, what="old rows to be pruned")
    assert count(db_path) == 40
    # The writer counts a chunk after its commit, which another connection may see first.
    wait_until(lambda: log.pruned == 5500, 30, what="the pruned count")
    # The hourly counts of the pruned rows go too, so reports never count rows that are gone.
    wait_until(lambda: rollup_total(db_path) == 40, 30, what="old rollup hours to be pruned")
    assert log.close()
    assert_rollup_matches_rows(db_path)


def rollup_total(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT coalesce(sum(n), 0) FROM lookup_rollup").fetchone()[0]


def assert_rollup_matches_rows(path: Path) -> None:
    """The writer's per-hour counts equal a count over the rows they count (computed here, in
    Python, with the hour rounded down)."""
    expected: dict[tuple, list] = {}
    with closing(sqlite3.connect(path)) as conn:
        kept = sorted(conn.execute(
            f"SELECT hour, {', '.join(schema.ROLLUP_COLUMNS)}, n, first, last FROM lookup_rollup"))
        for ts, *key in conn.execute(f"SELECT ts, {', '.join(schema.ROLLUP_COLUMNS)} FROM lookup_rows"):
            k = (math.floor(ts / 3600), *(-1 if v is None else v for v in key))
            agg = expected.setdefault(k, [0, ts, ts])
            agg[0] += 1
            agg[1], agg[2] = min(agg[1], ts), max(agg[2], ts)
    assert kept == sorted((*k, *v) for k, v in expected.items())


def test_rollup_counts_every_row_across_batches_hours_and_nulls(db_path: Path) -> None:
    """Batches straddling hour boundaries, repeated keys across batches (the upsert path),
    and NULL key columns (no name, no verdict, no rule, no reply) all land in the rollup."""
    base = 1_700_000_000.0 - 1_700_000_000.0 % 3600 + 3000  # 10 minutes before an hour starts
    log = QueryLog(str(db_path), batch_max=97, retention_days=None)
    log.start()
    n = 3000
    for i in range(n):
        kind = i % 5
        verdict = None if kind == 4 else ("deny" if kind == 3 else "allow")
        log.submit(rec(i, ts=base + i * 0.7 - (i % 3) * 0.2, name=None if kind == 4 else f"h{i % 7}.example",
                       client=f"127.0.0.{i % 3 + 1}", verdict=verdict,
                       rule=None if kind >= 3 else f"*.example{i % 2}",
                       rcode=None if i % 11 == 0 else kind % 4, mode="audit" if i % 13 == 0 else "enforce"))
    assert log.close()
    assert count(db_path) == n
    assert rollup_total(db_path) == n
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT count(DISTINCT hour) FROM lookup_rollup").fetchone()[0] == 2
    assert_rollup_matches_rows(db_path)


def test_schema_1_log_is_migrated_with_its_rollup(db_path: Path) -> None:
    """A log written by schema 1 (covering indexes, no rollup) gets the rollup of its old rows
    and loses the indexes the writer no longer pays for."""
    from sqlite_utils import Database

    with closing(sqlite3.connect(db_path)) as conn:
        schema.MIGRATIONS[0](Database(conn))
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO names (id, name) VALUES (1, 'old.example')")
        conn.execute("INSERT INTO clients (id, addr) VALUES (1, '127.0.0.1')")
        conn.executemany(
            "INSERT INTO lookup_rows (ts, client_id, transport, name_id, qtype, verdict, mode, rule_id,"
            " rcode, answers, cached, latency_ms, note)"
            " VALUES (?, 1, 0, 1, 1, 0, 0, NULL, 3, NULL, 0, 0.1, NULL)",
            [(time.time() - 7200 + i,) for i in range(500)] + [(-1800.0,)])  # hour -1, not 0
        conn.commit()
    log = QueryLog(str(db_path), retention_days=None)
    log.start()
    log.submit(rec(name="old.example", verdict="deny", rule=None, rcode=3))
    assert log.close()
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(lookup_rows)")}
    assert indexes == {"ix_lookup_rows_ts"}
    assert rollup_total(db_path) == 502
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT hour FROM lookup_rollup WHERE first < 0").fetchall() == [(-1,)]
    assert_rollup_matches_rows(db_path)


def test_schema_2_log_gets_the_connection_columns(db_path: Path) -> None:
    """A log from before issue #12: its NFLOG rows keep their values, gain the new columns,
    and count as over (end_ts = ts), not as connections still open."""
    from sqlite_utils import Database

    with closing(sqlite3.connect(db_path)) as conn:
        for step in schema.MIGRATIONS[:2]:
            step(Database(conn))
        conn.execute("PRAGMA user_version = 2")
        conn.execute("INSERT INTO connections (ts, source, destination, protocol, port, verdict, name) "
                     "VALUES (100.5, '192.0.2.2', '203.0.113.9', 'tcp', 443, 'blocked', NULL)")
        conn.commit()
    log = QueryLog(str(db_path), retention_days=None)
    log.start()
    assert log.close()
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        row = conn.execute("SELECT ts, end_ts, verdict, bytes_out, client, rule FROM connections").fetchone()
        assert row == (100.5, 100.5, "blocked", None, None, None)
        assert conn.execute("SELECT count(*) FROM connection_overflow").fetchone() == (0,)


def test_rows_written_without_the_rollup_are_counted_when_the_writer_reopens(db_path: Path) -> None:
    """An older dnsguard (schema 1 code) appending to this log writes rows but no rollup; the
    next writer to open the file counts them, so reports never miss them."""
    log = QueryLog(str(db_path), retention_days=None)
    log.start()
    log.submit(rec(1))
    assert log.close()
    with closing(sqlite3.connect(db_path)) as conn:
        conn.executemany(
            "INSERT INTO lookup_rows (ts, client_id, transport, name_id, qtype, verdict, mode, rule_id,"
            " rcode, answers, cached, latency_ms, note)"
            " VALUES (?, 1, 0, 1, 1, 1, 0, NULL, 0, NULL, 0, 0.1, NULL)",
            [(time.time() - 5000 + i,) for i in range(7)])
        conn.commit()
    assert rollup_total(db_path) == 1
    log = QueryLog(str(db_path), retention_days=None)
    log.start()
    log.submit(rec(2))
    assert log.close()
    assert rollup_total(db_path) == 9
    assert_rollup_matches_rows(db_path)


def test_a_lower_bound_parameter_limit_gives_smaller_insert_chunks(db_path: Path, monkeypatch) -> None:
    opened = querylog.open_for_writing

    def limited(path: str, busy_timeout: float = schema.BUSY_TIMEOUT_S) -> sqlite3.Connection:
        conn = opened(path, busy_timeout)
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 100)  # 7 rows of 13 columns
        return conn

    monkeypatch.setattr(querylog, "open_for_writing", limited)
    log = QueryLog(str(db_path), retention_days=None, batch_max=5000)
    for i in range(50):
        log.submit(rec(i, ts=1_700_000_000.0 + i))
    log.start()
    assert log.close()
    assert log._chunk[0] == 7
    with closing(sqlite3.connect(db_path)) as conn:
        assert [r[0] for r in conn.execute("SELECT ts FROM lookup_rows ORDER BY id")] == [
            1_700_000_000.0 + i for i in range(50)]


def test_no_retention_keeps_everything(db_path: Path) -> None:
    log = QueryLog(str(db_path), retention_days=0)
    log.start()
    log.submit(rec(ts=1.0))
    assert log.close()
    assert count(db_path) == 1


def test_schema_has_integer_indexes_and_future_tables(db_path: Path) -> None:
    log = QueryLog(str(db_path))
    log.start()
    log.submit(rec())
    assert log.close()
    with closing(sqlite3.connect(db_path)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"names", "clients", "rules", "rrtypes", "lookup_rows", "log_overflow",
                "connections"} <= tables
        conn_cols = [r[1] for r in conn.execute("PRAGMA table_info(connections)")]
        assert conn_cols == ["id", "ts", "source", "destination", "protocol", "port", "verdict", "name",
                             "end_ts", "source_port", "packets_out", "bytes_out", "packets_in", "bytes_in",
                             "client", "rule"]
        indexed = {r[2] for idx in conn.execute("PRAGMA index_list(lookup_rows)")
                   for r in conn.execute(f"PRAGMA index_info({idx[1]})")}
        types = {r[1]: r[2] for r in conn.execute("PRAGMA table_info(lookup_rows)")}
    # One append-only index on the rows; everything else reports need is in the rollup.
    assert indexed == {"ts"}
    assert all(types[c] in ("INTEGER", "FLOAT", "REAL") for c in indexed)
    with closing(sqlite3.connect(db_path)) as conn:
        info = sorted(conn.execute("PRAGMA table_info(lookup_rollup)"), key=lambda r: r[5])
    pk = [r[1] for r in info if r[5]]
    assert pk == ["hour", *schema.ROLLUP_COLUMNS]


def test_client_names_follow_the_address_over_time(db_path: Path) -> None:
    """Schema 3: each lookup shows the name its address had when it asked (containers come and go)."""
    names = {"172.29.53.2": "openclaw-gateway"}
    asked: list[str] = []

    def namer(addr: str) -> str | None:
        asked.append(addr)
        return names.get(addr)

    log = QueryLog(str(db_path), namer=namer)
    log.start()
    t = 1_700_000_000.0
    log.submit(rec(ts=t, client="172.29.53.2"))
    log.submit(rec(ts=t + 1, client="172.29.53.2"))
    log.submit(rec(ts=t + 1, client="127.0.0.1"))
    wait_until(lambda: log.written == 3, 5, what="the first batch")
    names["172.29.53.2"] = "sandbox-1"  # the gateway went, a sandbox got its address
    log.submit(rec(ts=t + 10, client="172.29.53.2"))
    wait_until(lambda: log.written == 4, 5, what="the second batch")
    del names["172.29.53.2"]
    log.submit(rec(ts=t + 20, client="172.29.53.2"))
    assert log.close()
    with closing(sqlite3.connect(db_path)) as conn:
        got = conn.execute("SELECT ts - ?, client, client_name FROM lookups ORDER BY ts, client",
                           (t,)).fetchall()
        labels = conn.execute("SELECT name, since - ?, until - ? FROM client_labels ORDER BY since",
                              (t, t)).fetchall()
    assert got == [(0, "172.29.53.2", "openclaw-gateway"), (1, "127.0.0.1", None),
                   (1, "172.29.53.2", "openclaw-gateway"), (10, "172.29.53.2", "sandbox-1"),
                   (20, "172.29.53.2", None)]
    assert labels == [("openclaw-gateway", 0, 10), ("sandbox-1", 10, 20)]
    # asked once per client per batch, not once per lookup
    assert asked.count("172.29.53.2") <= 3 + 1
