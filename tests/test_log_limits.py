"""The lookup log under floods: a size cap that deletes the oldest rows, and a full disk.

The size cap runs the real writer on a real SQLite file. The disk-full test runs the real
server with its database on a 3 MiB tmpfs mounted in a mount namespace of its own
(`unshare -m`), fills that file system up, and frees it again.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from conftest import LISTEN_RE, REPO_ROOT
from helpers import make_policy, to_toml, wait_until
from sqlite_utils import Database

from resolver.core.names import text_to_wire
from resolver.log import report as rpt
from resolver.log.querylog import SHRINK_TO, QueryLog
from resolver.log.schema import used_bytes


def record(i: int, ts: float) -> tuple:
    # A handful of names and clients: the rows are what grows, as in a flood of repeats.
    return (ts, f"192.0.2.{i % 7}", "udp", text_to_wire(f"n{i % 50}.flood.test"), 1, "deny", "enforce",
            None, 3, None, False, 0.1, None)


def test_max_size_deletes_oldest_rows_and_their_rollup(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    log = QueryLog(str(path), retention_days=None, max_size_mb=1, batch_max=5000)
    log.start()
    start = time.time() - 7200  # two hours back, so the rollup has several hours to keep right
    total = 60_000
    for i in range(0, total, 5000):
        log.submit_many([record(j, start + j * 0.1) for j in range(i, i + 5000)])
    assert log.flush(30.0)
    limit = 1024 * 1024

    def settled() -> bool:
        with closing(sqlite3.connect(path)) as conn:
            return used_bytes(conn) <= limit and not log._shrinking

    wait_until(settled, 30.0, what="the log to shrink under max_size_mb")
    assert log.close()
    with closing(sqlite3.connect(path)) as conn:
        assert used_bytes(conn) <= SHRINK_TO * limit + 64 * 1024
        rows, oldest, newest = conn.execute("SELECT count(*), min(ts), max(ts) FROM lookup_rows").fetchone()
        dropped = conn.execute("SELECT sum(dropped) FROM log_size_drops").fetchone()[0]
        counted = conn.execute("SELECT sum(n) FROM lookup_rollup").fetchone()[0]
        per_hour = conn.execute(
            "SELECT hour, sum(n) FROM lookup_rollup GROUP BY hour ORDER BY hour").fetchall()
        actual = conn.execute(
            "SELECT CAST(ts / 3600 AS INTEGER), count(*) FROM lookup_rows GROUP BY 1 ORDER BY 1").fetchall()
    assert 0 < rows < total and dropped == total - rows
    assert newest == pytest.approx(start + (total - 1) * 0.1) and oldest > start  # the oldest went
    assert counted == rows and per_hour == actual  # the rollup still agrees with the rows

    with closing(sqlite3.connect(path)) as conn:
        db = Database(conn)
        s = rpt.summary(db, since=None, until=None)
    assert s["size_dropped"]["total"] == dropped


def test_a_connection_flood_does_not_wipe_the_lookups(tmp_path: Path) -> None:
    """Over max_size_mb with far more connection rows than lookups, deletion goes oldest-first
    across both tables: the recent lookups stay, old finished connections go, an open one stays."""
    from resolver.core.logdb import ensure_connections_table

    path = tmp_path / "log.db"
    start = time.time() - 7200
    log = QueryLog(str(path), retention_days=None, batch_max=5000)
    log.start()
    # 2,000 lookups spread over the two hours; 30,000 connections, all in the second hour.
    log.submit_many([record(j, start + j * 3.6) for j in range(2000)])
    assert log.close()
    with closing(sqlite3.connect(path)) as conn:
        ensure_connections_table(conn)
        conn.executemany(
            "INSERT INTO connections (ts, end_ts, source, destination, protocol, port, verdict, name, "
            "source_port, bytes_out, bytes_in) VALUES (?, ?, '192.0.2.2', ?, 'tcp', 443, 'allowed', "
            "'api.flood.test', ?, 100, 100)",
            [(start + 3600 + j * 0.1, start + 3600 + j * 0.1 + 1, f"203.0.113.{j % 250}", 1024 + j % 60000)
             for j in range(30_000)])
        conn.execute("INSERT INTO connections (ts, end_ts, source, destination, protocol, port, verdict) "
                     "VALUES (?, NULL, '192.0.2.2', '203.0.113.1', 'tcp', 443, 'allowed')", (start,))
        conn.commit()
        over = used_bytes(conn)
    limit_mb = over / 2 / 1048576  # half of what is there now
    log = QueryLog(str(path), retention_days=None, max_size_mb=limit_mb, batch_max=5000)
    log.start()

    def settled() -> bool:
        with closing(sqlite3.connect(path)) as conn:
            return used_bytes(conn) <= limit_mb * 1048576 and not log._shrinking

    wait_until(settled, 30.0, what="the log to shrink under max_size_mb")
    assert log.close()
    with closing(sqlite3.connect(path)) as conn:
        lookups, oldest_lookup, newest_lookup = conn.execute(
            "SELECT count(*), min(ts), max(ts) FROM lookup_rows").fetchone()
        conns, oldest_conn = conn.execute(
            "SELECT count(*), min(ts) FROM connections WHERE end_ts IS NOT NULL").fetchone()
        still_open = conn.execute("SELECT count(*) FROM connections WHERE end_ts IS NULL").fetchone()[0]
        dropped, dropped_conns = conn.execute(
            "SELECT sum(dropped), sum(connections) FROM log_size_drops").fetchone()
        counted = conn.execute("SELECT sum(n) FROM lookup_rollup").fetchone()[0]
        db = Database(conn)
        s = rpt.summary(db, since=None, until=None)
    # What is kept is the most recent stretch of both tables: the lookups of that stretch stay
    # (before, the connections' bulk made the writer delete every lookup and stop).
    assert lookups > 0 and newest_lookup == pytest.approx(start + 1999 * 3.6)
    assert dropped == 2000 - lookups and dropped_conns == 30_000 - conns > 0
    assert oldest_conn > start + 3600 and still_open == 1
    # The two tables were cut at the same time, give or take one chunk of connections (500 s).
    assert abs(oldest_lookup - oldest_conn) < 5000 * 0.1 + 3.6
    assert counted == lookups
    assert s["size_dropped"]["total"] == dropped and s["size_dropped"]["connections"] == dropped_conns


# ------------------------------------------------------------------ disk full
def fill(directory: Path) -> Path:
    """Write a file until the file system says ENOSPC; return it."""
    filler = directory / "filler"
    with open(filler, "wb") as fh:
        try:
            for _ in range(10_000):  # at most ~640 MiB: far past any tmpfs used here
                fh.write(b"\0" * 65536)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return filler
    raise AssertionError("the file system never filled up")


def test_disk_full_keeps_dns_answering_and_the_writer_recovers(tmp_path: Path) -> None:
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is required")
    mnt = tmp_path / "small"
    mnt.mkdir()
    db = mnt / "dnsguard.db"
    policy = tmp_path / "policy.toml"
    policy.write_text(to_toml(make_policy(["127.0.0.1:9"], allow=["ok.test"], log={"database": str(db)})))
    err_path = tmp_path / "stderr.log"
    paths = (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), PYTHONUNBUFFERED="1")
    # The tmpfs exists only in the server's own mount namespace; we reach it via /proc/PID/root.
    script = (f"mount -t tmpfs -o size=3m dnsguard-test {mnt} && exec {sys.executable} -m resolver serve "
              f"--policy {policy} --listen 127.0.0.1:0")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                cwd=tmp_path)
    try:
        def stderr() -> str:
            return err_path.read_text(errors="replace")

        def listening() -> int | None:
            m = LISTEN_RE.search(stderr())
            if proc.poll() is not None:
                raise AssertionError(f"dnsguard exited: {stderr()}")
            return int(m.group(1)) if m else None

        port = wait_until(listening, 15.0, what="dnsguard to listen")
        inside = Path(f"/proc/{proc.pid}/root") / mnt.relative_to("/")
        assert not (mnt / "dnsguard.db").exists()  # not on the host's file system
        wait_until(lambda: (inside / "dnsguard.db").exists(), 10.0, what="the log database")

        def ask(name: str) -> int:
            q = dns.message.make_query(name, "A")
            return dns.query.udp(q, "127.0.0.1", port=port, timeout=3.0).rcode()

        filler = fill(inside)
        # Denied names: answered locally, each one a row the writer cannot store.
        for batch in range(1, 200):
            assert [ask(f"d{batch}-{i}.full.test") for i in range(50)] == [dns.rcode.NXDOMAIN] * 50
            if "and retrying" in stderr():
                break
        else:
            raise AssertionError(f"the writer never hit the full disk:\n{stderr()}")
        # DNS keeps answering while the disk stays full, and the episode is one line.
        assert [ask(f"more{i}.full.test") for i in range(200)] == [dns.rcode.NXDOMAIN] * 200
        assert stderr().count("and retrying") == 1

        filler.unlink()
        wait_until(lambda: "writing again" in stderr(), 30.0, what="the writer to recover")
        assert ask("after.full.test") == dns.rcode.NXDOMAIN

        def logged(name: str) -> bool:
            # SQLite resolves the /proc/PID/root symlink away: read from inside the namespace.
            code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(c.execute("
                    "'SELECT count(*) FROM lookups WHERE qname = ?', (sys.argv[2],)).fetchone()[0])")
            argv = ["nsenter", "-t", str(proc.pid), "-m", sys.executable, "-c", code, str(db), name]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
            return out.strip() == "1"

        # What was queued while the disk was full is written once there is room again.
        wait_until(lambda: logged("more199.full.test") and logged("after.full.test"), 30.0,
                   what="the queued rows to be written")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    assert proc.returncode == 0, stderr()
    assert "Traceback" not in stderr()
    assert stderr().count("and retrying") == 1
    assert not (mnt / "dnsguard.db").exists()
