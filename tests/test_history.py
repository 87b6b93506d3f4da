"""Policy history in the lookup-log database: recording, listing, showing, rolling back."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from resolver.cli.learn import policy as policy_group
from resolver.core.names import text_to_wire
from resolver.log.querylog import QueryLog
from resolver.log.schema import open_for_writing
from resolver.policy import history

T0 = 1_700_000_000.0
V1 = '# v1\nmode = "enforce"\n[allow]\ndomains = ["pypi.org"]\n'
V2 = '# v2\nmode = "enforce"\n[allow]\ndomains = ["pypi.org", "files.pythonhosted.org"]  # more\n'
V3 = "# v3 — ünïcode comment\r\nmode = \"audit\"\r\n"  # CRLF and non-ASCII survive byte for byte


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def rows(db: Path) -> list[tuple]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT id, ts, sha256, path, content FROM policies ORDER BY id").fetchall()


def record(db: Path, text: str, path: str = "/etc/dnsguard/policy.toml", **kw) -> int:
    return history.record_policy(str(db), text, sha(text), path, **kw)


def policy_files(directory: Path) -> list[str]:
    """Everything in ``directory`` but the database (and its -wal/-shm companions)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("dnsguard.db"))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "dnsguard.db"


# ------------------------------------------------------------------------ record
def test_record_creates_the_table_and_skips_consecutive_duplicates(db: Path) -> None:
    a = record(db, V1, now=T0)
    assert a == 1
    assert record(db, V1, now=T0 + 1) == a          # same content loaded again: no new row
    b = record(db, V2, now=T0 + 2)
    c = record(db, V1, now=T0 + 3)                  # back to V1 after V2: a new version
    assert (b, c) == (2, 3)
    got = rows(db)
    assert [(r[0], r[1], r[2], r[4]) for r in got] == [(1, T0, sha(V1), V1), (2, T0 + 2, sha(V2), V2),
                                                       (3, T0 + 3, sha(V1), V1)]
    with closing(sqlite3.connect(db)) as conn:
        cols = [(r[1], r[2]) for r in conn.execute("PRAGMA table_info(policies)")]
    assert cols == [("id", "INTEGER"), ("ts", "REAL"), ("sha256", "TEXT"), ("path", "TEXT"),
                    ("content", "TEXT")]


def test_record_shares_the_database_with_the_lookup_log(db: Path) -> None:
    log = QueryLog(str(db), retention_days=None)
    log.start()
    stop = threading.Event()
    submitted = []

    def produce() -> None:
        i = 0
        while not stop.is_set() and i < 20000:
            log.submit((time.time(), "127.0.0.1", "udp", text_to_wire(f"h{i % 50}.example.org"), 1, "allow",
                        "enforce", None, 0, None, False, 1.0, None))
            i += 1
            if i % 500 == 0:
                time.sleep(0.001)
        submitted.append(i)

    t = threading.Thread(target=produce)
    t.start()
    try:
        ids = [record(db, f"# version {i}\n", busy_timeout=2.0) for i in range(20)]
    finally:
        stop.set()
        t.join(10)
    assert log.flush(10) and log.close()
    assert ids == list(range(1, 21))
    # The writer may have met the history's write lock and retried (its busy timeout is
    # short on purpose); what matters is that every lookup landed.
    assert log.overflow == 0 and log.written == submitted[0]
    conn = open_for_writing(str(db))  # the log's own schema code still accepts the file
    conn.close()


def test_record_first_then_the_lookup_log_creates_its_schema(db: Path) -> None:
    assert record(db, V1) == 1
    log = QueryLog(str(db), retention_days=None)
    log.start()
    log.submit((T0, "127.0.0.1", "udp", text_to_wire("a.example.org"), 1, "allow", "enforce", None, 0, None,
                False, 1.0, None))
    assert log.flush(10) and log.close()
    assert log.written == 1 and log.last_error is None
    assert [v.lookups for v in history.versions(str(db))] == [0]  # T0 is before the version's ts


def test_record_never_raises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert record(tmp_path / "no" / "such" / "dir.db", V1) == -1
    err = capsys.readouterr().err
    assert "dnsguard: policy history" in err and "could not record /etc/dnsguard/policy.toml" in err


def test_record_gives_up_quickly_when_the_database_is_locked(db: Path, capsys) -> None:
    record(db, V1)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        assert record(db, V2, busy_timeout=0.1) == -1
        assert time.monotonic() - started < 2.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "could not record" in capsys.readouterr().err
    assert record(db, V2) == 2  # and works again once the lock is gone


# ----------------------------------------------------------------------- versions
def test_versions_count_lookups_and_denials_between_loads(db: Path) -> None:
    log = QueryLog(str(db), retention_days=None)
    log.start()

    def lookup(ts: float, verdict: str) -> None:
        log.submit((ts, "127.0.0.1", "udp", text_to_wire("x.example.org"), 1, verdict, "enforce", None,
                    0 if verdict == "allow" else 3, None, False, 1.0, None))

    for ts, verdict in [(T0 - 5, "deny"),                                          # before any version
                        (T0 + 1, "deny"), (T0 + 2, "deny"), (T0 + 3, "allow"),     # v1
                        (T0 + 10, "allow"),                                        # v2 (at its ts)
                        (T0 + 21, "deny"), (T0 + 5000, "deny")]:                   # v3, open-ended
        lookup(ts, verdict)
    assert log.flush(10) and log.close()
    record(db, V1, now=T0)
    record(db, V2, now=T0 + 10)
    record(db, V1, now=T0 + 20)
    vs = history.versions(str(db))
    assert [(v.id, v.lookups, v.denied) for v in vs] == [(1, 3, 2), (2, 1, 0), (3, 2, 2)]
    assert vs[0].size == len(V1.encode()) and vs[0].sha256 == sha(V1)
    assert vs[0].as_dict()["time"] == "2023-11-14T22:13:20Z"


def test_versions_without_a_lookup_log(db: Path) -> None:
    record(db, V1)
    assert [(v.lookups, v.denied) for v in history.versions(str(db))] == [(None, None)]


def test_errors_name_the_problem(db: Path, tmp_path: Path) -> None:
    with pytest.raises(history.HistoryError, match="no database at"):
        history.versions(str(tmp_path / "missing.db"))
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE other (x)")
    with pytest.raises(history.HistoryError, match="no policy history yet"):
        history.versions(str(db))
    record(db, V1)
    with pytest.raises(history.HistoryError, match="no policy version 7"):
        history.content(str(db), 7)


# ----------------------------------------------------------------------- rollback
def test_rollback_restores_bytes_keeps_a_backup_and_leaves_no_temp(db: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_bytes(V3.encode())
    os.chmod(policy, 0o640)
    record(db, V3, str(policy), now=T0)
    policy.write_bytes(V2.encode())
    record(db, V2, str(policy), now=T0 + 10)
    r = history.rollback(str(db), 1, now=T0 + 3600)  # path: where the newest version came from
    assert r.path == str(policy) and not r.unchanged
    assert policy.read_bytes() == V3.encode()        # CRLF, non-ASCII: byte for byte
    assert r.backup == f"{policy}.bak-20231114T231320Z"
    assert Path(r.backup).read_bytes() == V2.encode()
    assert stat.S_IMODE(policy.stat().st_mode) == 0o640
    assert policy_files(tmp_path) == ["policy.toml", "policy.toml.bak-20231114T231320Z"]
    # Same content already there: nothing written, no second backup.
    again = history.rollback(str(db), 1, now=T0 + 3600)
    assert again.unchanged and again.backup is None
    # A second rollback in the same second never overwrites the first backup.
    r2 = history.rollback(str(db), 2, now=T0 + 3600)
    assert r2.backup == f"{policy}.bak-20231114T231320Z-1"
    assert Path(r2.backup).read_bytes() == V3.encode()
    assert policy.read_bytes() == V2.encode()


def test_rollback_follows_a_symlinked_policy(db: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text(V2)
    link = tmp_path / "policy.toml"
    link.symlink_to(real)
    record(db, V1, str(link))
    record(db, V2, str(link))
    history.rollback(str(db), 1)
    assert link.is_symlink() and real.read_text() == V1


def test_rollback_refuses_content_that_no_longer_loads(db: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(V1)
    record(db, 'mode = "sometimes"\n', str(policy))
    record(db, V1, str(policy))
    with pytest.raises(history.HistoryError, match="does not load any more"):
        history.rollback(str(db), 1)
    assert policy.read_text() == V1 and policy_files(tmp_path) == ["policy.toml"]
    history.rollback(str(db), 1, check=False)
    assert policy.read_text() == 'mode = "sometimes"\n'


def test_rollback_to_a_missing_file_creates_it(db: Path, tmp_path: Path) -> None:
    policy = tmp_path / "new.toml"
    record(db, V1, str(policy))
    r = history.rollback(str(db), 1)
    assert r.backup is None and policy.read_text() == V1


# ---------------------------------------------------------------------------- CLI
def run(args: list[str]):
    return CliRunner().invoke(policy_group, args, catch_exceptions=False)


def test_cli_history_show_rollback(db: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(V2)
    record(db, V1, str(policy), now=T0)
    record(db, V2, str(policy), now=T0 + 60)
    r = run(["history", "--db", str(db)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "LOADED", "(UTC)", "SHA256", "BYTES", "LOOKUPS", "DENIED", "PATH"]
    assert lines[1].split()[:3] == ["1", "2023-11-14T22:13:20Z", sha(V1)[:12]]
    assert lines[2].split()[:2] == ["2", "*"]
    data = json.loads(run(["history", "--db", str(db), "--format", "json"]).stdout)
    assert [(v["id"], v["sha256"], v["path"]) for v in data] == [(1, sha(V1), str(policy)),
                                                                  (2, sha(V2), str(policy))]
    r = run(["show", "1", "--db", str(db)])
    assert r.exit_code == 0 and r.stdout == V1
    r = run(["rollback", "1", "--db", str(db), "--policy", str(policy)])
    assert r.exit_code == 0, r.output
    assert "wrote version 1" in r.stdout and "previous file kept as" in r.stdout
    assert policy.read_bytes() == V1.encode()


@pytest.mark.parametrize(("args", "message"), [
    (["history", "--db", "{tmp}/none.db"], "no database at"),
    (["show", "9", "--db", "{db}"], "no policy version 9"),
    (["rollback", "9", "--db", "{db}"], "no policy version 9"),
])
def test_cli_errors_are_clean(db: Path, tmp_path: Path, args: list[str], message: str) -> None:
    record(db, V1)
    r = run([a.format(tmp=tmp_path, db=db) for a in args])
    assert r.exit_code == 1
    assert message in r.output and "Traceback" not in r.output
