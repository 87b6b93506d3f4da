"""End-to-end tests of the lookup log through a real `python -m resolver serve`.

A real dnsmasq is the upstream, queries go over real loopback sockets, and the log is
read back from the SQLite file (the documented ``lookups`` view and ``log_overflow``
table, README "The lookup log") after SIGTERM, which must drain the queue first.

What is checked: every kind of outcome becomes exactly one row with the documented
columns; shutdown loses nothing; a locked or unwritable database never slows or stops
DNS; the queue bound counts what it drops (and `dnsguard report` shows it); and
`dnsguard report` can read the log while serve is writing it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from helpers import addresses, make_policy, tcp_exchange, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent

# Columns compared as a multiset (README: "Query the lookups view").
KEY_COLUMNS = ("client", "transport", "qname", "qtype", "verdict", "mode", "rule", "rcode", "cached")
ISO_MS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PROMPT_S = 1.0  # "answered promptly": each reply within this, whatever the database does


@pytest.fixture
def upstream(dnsmasq):
    # --local: names dnsmasq has no record for get NXDOMAIN instead of REFUSED (no upstream).
    return dnsmasq(extra_args=["--local=/test/"])


# ------------------------------------------------------------------ the database
def db_of(g) -> Path:
    """The database a dict policy gets from the `dnsguard` fixture (no --db given)."""
    return g.workdir / "dnsguard.db"


@contextmanager
def read_only(db: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def lookups(db: Path) -> list[dict[str, Any]]:
    with read_only(db) as conn:
        return [dict(r) for r in conn.execute("SELECT * FROM lookups ORDER BY id")]


def count_rows(db: Path) -> int:
    """Rows in the `lookups` view right now; 0 while the file or its schema does not exist yet."""
    if not db.exists():
        return 0
    try:
        with read_only(db) as conn:
            return conn.execute("SELECT count(*) FROM lookups").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def overflow_total(db: Path) -> int:
    with read_only(db) as conn:
        return conn.execute("SELECT coalesce(sum(dropped), 0) FROM log_overflow").fetchone()[0]


def wait_rows(db: Path, n: int, timeout: float = 10.0) -> None:
    wait_until(lambda: count_rows(db) >= n, timeout, what=f"{n} rows in {db}")


def keys(rows: Sequence[dict[str, Any]]) -> Counter:
    return Counter(tuple(r[c] for c in KEY_COLUMNS) for r in rows)


@contextmanager
def write_lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock on `db` (BEGIN EXCLUSIVE) from this process until the block ends."""
    conn = sqlite3.connect(str(db), timeout=5.0, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield conn
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


def stop(g, timeout: float = 20.0) -> None:
    """SIGTERM (which drains the log) and require a clean exit."""
    rc = g.stop(timeout=timeout)
    assert rc == 0, f"dnsguard exited with {rc}:\n{g.stderr_text()[-3000:]}"


def stderr_lines(g, *needles: str) -> list[str]:
    return [line for line in g.stderr_text().splitlines() if all(n in line for n in needles)]


# ----------------------------------------------------------------------- traffic
def query_wire(name: str, rdtype: str = "A", qid: int | None = None) -> bytes:
    q = dns.message.make_query(name, rdtype)
    if qid is not None:
        q.id = qid
    return q.to_wire()


def udp_burst(port: int, wires: Sequence[bytes], window: int = 64, idle: float = 3.0) -> set[int]:
    """Send `wires` (distinct IDs) over one UDP socket, at most `window` unanswered at a time.

    Returns the IDs that were answered; stops early if no reply comes for `idle` seconds.
    """
    ids = [struct.unpack("!H", w[:2])[0] for w in wires]
    assert len(set(ids)) == len(ids), "burst queries need distinct IDs"
    wanted = set(ids)
    answered: set[int] = set()
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.connect(("127.0.0.1", port))
        s.settimeout(idle)
        for _ in range(len(wires) * 4 + 16):  # every turn sends or receives; bounded anyway
            while sent < len(wires) and sent - len(answered) < window:
                s.send(wires[sent])
                sent += 1
            if len(answered) == len(wires):
                break
            try:
                data = s.recv(65535)
            except TimeoutError:
                break
            if len(data) >= 12 and data[2] & 0x80:
                qid = struct.unpack("!H", data[:2])[0]
                if qid in wanted:
                    answered.add(qid)
    return answered


def burst_wires(n: int, allowed: Sequence[str], start_id: int = 1) -> tuple[list[bytes], Counter]:
    """n queries: every 4th for an allowed name (cache hits after the first), the rest denied
    unique names. Returns the wires and the expected (qname, verdict) counts."""
    wires, expect = [], Counter()
    for i in range(n):
        if i % 4 == 0:
            name = allowed[(i // 4) % len(allowed)]
            expect[(name, "allow")] += 1
        else:
            name = f"q{i}.nowhere.test"
            expect[(name, "deny")] += 1
        wires.append(query_wire(name, "A", start_id + i))
    return wires, expect


# ------------------------------------------------------------- 1. one row each
def test_every_outcome_is_logged_exactly_once(upstream, dnsguard, tmp_path: Path):
    db = tmp_path / "log.db"
    policy = make_policy([upstream.addr], allow=["allowed.test", "other.test", "cache.test"],
                         deny=["denied.test"], server={"clients": ["127.0.0.1/32"]})
    t_start = time.time()
    g = dnsguard(policy, "--db", str(db))
    L = "127.0.0.1"
    expected: list[tuple] = []

    # allowed, UDP and TCP
    r = g.query("allowed.test")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"192.0.2.1"}
    expected.append((L, "udp", "allowed.test", "A", "allow", "enforce", "allowed.test", "NOERROR", 0))
    r = g.query("other.test", tcp=True)
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"192.0.2.2"}
    expected.append((L, "tcp", "other.test", "A", "allow", "enforce", "other.test", "NOERROR", 0))

    # cached: the second identical query is answered from dnsguard's cache
    for cached in (0, 1):
        r = g.query("cache.test")
        assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"192.0.2.5"}
        expected.append((L, "udp", "cache.test", "A", "allow", "enforce", "cache.test", "NOERROR", cached))

    # denied by an explicit rule, and by default (not on the allow list; over TCP)
    r = g.query("denied.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer
    expected.append((L, "udp", "denied.test", "A", "deny", "enforce", "denied.test", "NXDOMAIN", 0))
    r = g.query("nowhere.test", "AAAA", tcp=True)
    assert r.rcode() == dns.rcode.NXDOMAIN
    expected.append((L, "tcp", "nowhere.test", "AAAA", "deny", "enforce", None, "NXDOMAIN", 0))

    # malformed with a readable header: FORMERR (header only); unreadable question -> qname NULL
    garbage = struct.pack("!6H", 0x4242, 0x0100, 1, 0, 0, 0) + b"\xff\xfe garbage \x00\x01"
    bogus = dns.message.make_query("allowed.test", "A")
    bogus.id = 0x0BAD
    bogus.flags |= dns.flags.QR
    good = query_wire("cache.test", "A", 0x600D)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3.0)
        s.connect(("127.0.0.1", g.port))
        s.send(garbage)
        reply = s.recv(65535)
        assert struct.unpack("!H", reply[:2])[0] == 0x4242 and reply[3] & 0x0F == dns.rcode.FORMERR
        # QR=1: dropped. The same socket's next reply must be the one for the query sent after it.
        s.send(bogus.to_wire())
        s.send(good)
        reply = s.recv(65535)
        assert struct.unpack("!H", reply[:2])[0] == 0x600D, "a QR=1 packet was answered"
    expected.append((L, "udp", None, None, None, "enforce", None, "FORMERR", 0))
    expected.append((L, "udp", None, None, None, "enforce", None, None, 0))
    expected.append((L, "udp", "cache.test", "A", "allow", "enforce", "cache.test", "NOERROR", 1))

    # a client outside [server] clients: REFUSED, no policy decision taken
    r = g.query("allowed.test", source="127.0.0.2")
    assert r.rcode() == dns.rcode.REFUSED and not r.answer
    expected.append(("127.0.0.2", "udp", "allowed.test", "A", None, "enforce", None, "REFUSED", 0))

    # ANY: a minimal HINFO answer, not forwarded (over TCP too)
    r = g.query("allowed.test", "ANY")
    assert r.rcode() == dns.rcode.NOERROR
    assert [rrset.rdtype for rrset in r.answer] == [dns.rdatatype.HINFO]
    expected.append((L, "udp", "allowed.test", "ANY", "allow", "enforce", "allowed.test", "NOERROR", 0))
    reply = tcp_exchange(query_wire("other.test", "ANY", 0x7777), g.port)
    assert struct.unpack("!H", reply[:2])[0] == 0x7777 and reply[3] & 0x0F == dns.rcode.NOERROR
    expected.append((L, "tcp", "other.test", "ANY", "allow", "enforce", "other.test", "NOERROR", 0))

    t_end = time.time()
    stop(g)

    rows = lookups(db)
    assert keys(rows) == Counter(expected), "\n".join(
        ["rows differ from the expected multiset", "got:"] + [repr(k) for k in keys(rows).elements()])
    assert len(rows) == len(expected)

    (allowed_row,) = [r for r in rows if r["qname"] == "allowed.test" and r["qtype"] == "A"
                      and r["rcode"] == "NOERROR"]
    answers = json.loads(allowed_row["answers"])
    assert isinstance(answers, list) and "192.0.2.1" in answers
    for row in rows:
        if row["cached"] == 1:
            assert "192.0.2.5" in json.loads(row["answers"])
    for row in rows:
        assert isinstance(row["ts"], float)
        assert t_start - 1.0 <= row["ts"] <= t_end + 1.0, row
        assert ISO_MS_RE.match(row["time"]), row["time"]
        # `time` is `ts` as UTC with milliseconds
        iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(row["ts"]))
        assert row["time"].startswith(iso), (row["time"], row["ts"])
        assert row["latency_ms"] is not None and row["latency_ms"] >= 0, row
    # sub-second: arrival times are not rounded to whole seconds
    assert any(row["ts"] != int(row["ts"]) for row in rows)
    assert len({row["ts"] for row in rows}) > 1
    # malformed and dropped packets say why
    for row in rows:
        if row["qname"] is None:
            assert row["note"], row


def test_audit_mode_logs_the_would_be_denial(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"], deny=["denied.test"], mode="audit"))
    r = g.query("denied.test")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"192.0.2.66"}
    r = g.query("example.test")  # default deny, answered too
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"198.51.100.1"}
    r = g.query("allowed.test")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"192.0.2.1"}
    stop(g)
    rows = lookups(db_of(g))
    L = "127.0.0.1"
    assert keys(rows) == Counter([
        (L, "udp", "denied.test", "A", "deny", "audit", "denied.test", "NOERROR", 0),
        (L, "udp", "example.test", "A", "deny", "audit", None, "NOERROR", 0),
        (L, "udp", "allowed.test", "A", "allow", "audit", "allowed.test", "NOERROR", 0),
    ])
    (denied,) = [row for row in rows if row["qname"] == "denied.test"]
    assert "192.0.2.66" in json.loads(denied["answers"])


# ------------------------------------------------------------------ 2. drain
def test_sigterm_drains_every_queued_lookup(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test", "cache.test"]))
    n = 2000
    wires, expect = burst_wires(n, ["allowed.test", "cache.test"])
    answered = udp_burst(g.port, wires)
    assert len(answered) == n, f"only {len(answered)} of {n} queries were answered"
    stop(g)  # at once: the last batches are still queued
    db = db_of(g)
    rows = lookups(db)
    assert len(rows) == n
    assert Counter((r["qname"], r["verdict"]) for r in rows) == expect
    assert overflow_total(db) == 0
    assert not stderr_lines(g, "records not written")


# ---------------------------------------------------- 3. locked / unwritable
def test_locked_database_does_not_slow_answers_and_loses_nothing(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test", "cache.test"],
                             deny=["denied.test"]))
    db = db_of(g)
    assert g.query("allowed.test").rcode() == dns.rcode.NOERROR
    sent = 1
    wait_rows(db, 1)  # the schema exists and the file is in WAL mode
    names = ["allowed.test", "cache.test", "denied.test", "other.test"]
    slowest = 0.0
    with write_lock(db):
        held_since = time.monotonic()
        # Keep asking while the lock is held long enough for several failed attempts
        # (backoff 0.1 s doubling), with a hard cap on the number of queries.
        i = 0
        while i < 5000 and (time.monotonic() - held_since < 1.5 or
                            not stderr_lines(g, f"lookup log {db}", "locked")):
            name = names[i % len(names)]
            t0 = time.monotonic()
            r = g.query(name, timeout=PROMPT_S)
            slowest = max(slowest, time.monotonic() - t0)
            assert r.rcode() == (dns.rcode.NXDOMAIN if name in ("denied.test", "other.test")
                                 else dns.rcode.NOERROR)
            sent += 1
            i += 1
        assert count_rows(db) == 1, "rows were committed while another connection held the write lock"
        lines = stderr_lines(g, f"lookup log {db}")
        assert len(lines) == 1, f"expected one line for the episode, got:\n{g.stderr_text()}"
        assert "database is locked" in lines[0]
    assert slowest < PROMPT_S
    wait_until(lambda: stderr_lines(g, f"lookup log {db}", "writing again"), 10.0,
               what="the writer to say it is writing again")
    stop(g)
    assert count_rows(db) == sent
    assert overflow_total(db) == 0
    # One line for the episode, one for the recovery; none repeated per retry.
    assert len(stderr_lines(g, f"lookup log {db}")) == 2, g.stderr_text()


def test_unwritable_database_path_still_answers_and_says_so_once(upstream, dnsguard, tmp_path: Path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the database's directory should be\n")
    bad = blocker / "x.db"
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test"]), "--db", str(bad))
    t0 = time.monotonic()
    r = g.query("allowed.test", timeout=PROMPT_S)
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == {"192.0.2.1"}
    r = g.query("denied.test", timeout=PROMPT_S)
    assert r.rcode() == dns.rcode.NXDOMAIN
    sent = 2
    wait_until(lambda: stderr_lines(g, f"lookup log {bad}"), 10.0,
               what=f"an error line about {bad} on stderr")
    # Let the writer retry a few times (backoff 0.1 s doubling) while DNS keeps answering.
    for _ in range(1000):
        if time.monotonic() - t0 >= 1.5:
            break
        assert g.query("allowed.test", timeout=PROMPT_S).rcode() == dns.rcode.NOERROR
        sent += 1
    assert g.alive()
    lines = stderr_lines(g, f"lookup log {bad}")
    assert len(lines) == 1, f"expected one line for the episode, got:\n{g.stderr_text()}"
    assert "cannot" in lines[0]
    # Nothing else about the path is repeated per retry either.
    about_path = [line for line in g.stderr_text().splitlines() if str(bad) in line]
    assert len(about_path) == len(set(about_path)), g.stderr_text()
    assert not bad.exists()
    # SIGTERM: the writer tries to drain for up to 10 s, then says what was lost, and exits 0.
    stop(g, timeout=25.0)
    gave_up = stderr_lines(g, f"lookup log {bad}", "not written")
    assert len(gave_up) == 1 and f"{sent} records not written" in gave_up[0], g.stderr_text()


# ---------------------------------------------------------------- 4. overflow
def report_json(db: Path, *args: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("DNSGUARD_DB", None)
    proc = subprocess.run([sys.executable, "-m", "resolver", "report", "--db", str(db), "--format", "json",
                           *args], capture_output=True, text=True, timeout=60, env=env, cwd=db.parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def report_table(db: Path) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "resolver", "report", "--db", str(db)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=db.parent)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_queue_overflow_is_counted_and_reported(upstream, dnsguard):
    queue_max = 50
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test", "cache.test"],
                             log={"queue_max": queue_max}))
    db = db_of(g)
    assert g.query("allowed.test").rcode() == dns.rcode.NOERROR
    sent = 1
    wait_rows(db, 1)
    n = 500
    wires, _ = burst_wires(n, ["allowed.test", "cache.test"], start_id=100)
    with write_lock(db):
        t0 = time.monotonic()
        answered = udp_burst(g.port, wires, window=16)
        elapsed = time.monotonic() - t0
        sent += n
        assert len(answered) == n, f"only {len(answered)} of {n} queries were answered"
        # Hold the lock until the writer has run into it, so the episode really happened.
        wait_until(lambda: stderr_lines(g, f"lookup log {db}", "locked"), 10.0,
                   what="the writer to report the locked database")
        assert count_rows(db) == 1
    assert elapsed < n * PROMPT_S / 10, f"{n} queries took {elapsed:.1f}s with the database locked"
    wait_until(lambda: stderr_lines(g, f"lookup log {db}", "writing again"), 10.0,
               what="the writer to say it is writing again")
    stop(g)
    rows = count_rows(db)
    dropped = overflow_total(db)
    assert dropped > 0, "nothing overflowed: the queue bound was not reached"
    assert rows >= queue_max
    assert rows + dropped == sent, (rows, dropped, sent)

    data = report_json(db)
    assert data["overflow"]["total"] == dropped
    assert data["overflow"]["in_window"] == dropped
    assert data["overflow"]["last"]
    assert data["totals"]["lookups"] == rows
    assert f"WARNING: {dropped:,} lookups were not logged" in report_table(db)


# ------------------------------------------- 5. report while serve is writing
def test_report_reads_the_log_while_serve_writes(upstream, dnsguard):
    g = dnsguard(make_policy([upstream.addr], allow=["allowed.test", "cache.test"]))
    db = db_of(g)
    stop_flag = threading.Event()
    lock = threading.Lock()
    progress = {"sent": 0, "allow": 0, "deny": 0, "slow": 0, "lost": 0}

    def ask() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2.0)
            s.connect(("127.0.0.1", g.port))
            for i in range(200_000):
                if stop_flag.is_set():
                    return
                allowed = i % 3 == 0
                name = ("allowed.test" if i % 2 else "cache.test") if allowed else f"r{i}.nowhere.test"
                with lock:  # counted before it is sent: a row can never exist for an uncounted query
                    progress["sent"] += 1
                    progress["allow" if allowed else "deny"] += 1
                t0 = time.monotonic()
                s.send(query_wire(name, "A", i & 0xFFFF))
                try:
                    s.recv(65535)
                except TimeoutError:
                    with lock:
                        progress["lost"] += 1
                    continue
                if time.monotonic() - t0 > PROMPT_S:
                    with lock:
                        progress["slow"] += 1

    worker = threading.Thread(target=ask, name="query-loop", daemon=True)
    worker.start()
    try:
        wait_rows(db, 200)
        previous = 0
        for _ in range(3):
            before = count_rows(db)
            data = report_json(db)
            with lock:
                sent_after = progress["sent"]
            t = data["totals"]
            assert data["schema"] == "dnsguard-report-summary/2"
            assert t["lookups"] == t["allow"] + t["deny"] + t["undecided"]
            assert t["lookups"] == t["enforce"] + t["audit"]
            assert t["lookups"] == sum(x["count"] for x in t["by_verdict_mode"])
            assert t["undecided"] == 0 and t["audit"] == 0
            assert before <= t["lookups"] <= sent_after, (before, t["lookups"], sent_after)
            assert t["lookups"] >= previous
            previous = t["lookups"]
            assert data["overflow"]["total"] == 0
        assert worker.is_alive(), "the query loop ended before the reports did"
    finally:
        stop_flag.set()
        worker.join(30)
    assert not worker.is_alive()
    assert progress["lost"] == 0 and progress["slow"] == 0, progress
    stop(g)
    t = report_json(db)["totals"]
    assert t["lookups"] == progress["sent"] == count_rows(db)
    assert t["allow"] == progress["allow"] and t["deny"] == progress["deny"]
