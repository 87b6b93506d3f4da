"""The hand-over to the writer process (`resolver.log.logproc.ProcessLog`): a real child process,
a real pipe (64 KiB unless it can be grown) and a real SQLite file."""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import dns.rcode
import pytest
from helpers import wait_until

from resolver.core.names import text_to_wire
from resolver.log import logproc
from resolver.log.logproc import ProcessLog


def rec(i: int, client: object = "127.0.0.1") -> tuple:
    return (time.time(), client, "udp", text_to_wire(f"h{i % 50}.example.com"), 1, "allow", "enforce",
            "*.example.com", 0, '["192.0.2.1"]', bool(i % 2), 0.01, None)


def rows(path: Path) -> int:
    try:
        with closing(sqlite3.connect(path)) as conn:
            return conn.execute("SELECT count(*) FROM lookup_rows").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.asyncio
async def test_a_backlog_is_handed_over_while_the_loop_runs(tmp_path: Path) -> None:
    """Several slices queued at once leave through the pipe-writable callback, not one slice
    per tick, and every record lands."""
    path = tmp_path / "log.db"
    log = ProcessLog(str(path), queue_max=1_000_000, retention_days=None)
    log.start()
    n = logproc.MAX_BATCH * 8 + 17
    for i in range(n):
        log.submit(rec(i))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while (log._pending or log._out) and loop.time() < deadline:
        await asyncio.sleep(0.005)
    assert not log._pending and not log._out, "the backlog was not handed over"
    assert not log._watching  # nothing left to hand over: the loop is not polling the pipe
    log.stop_flushing()
    assert await loop.run_in_executor(None, log.close)
    assert rows(path) == n


@pytest.mark.asyncio
async def test_a_record_with_a_non_plain_field_is_still_written(tmp_path: Path) -> None:
    """marshal takes only plain values; a stray object in a record must not cost the batch."""
    path = tmp_path / "log.db"
    log = ProcessLog(str(path), retention_days=None)
    log.start()
    log.submit(rec(1))
    log.submit(rec(2, client=ipaddress.ip_address("192.0.2.5")))
    weird = list(rec(3))
    weird[8] = dns.rcode.Rcode.NXDOMAIN  # an IntEnum: marshal refuses int subclasses too
    log.submit(tuple(weird))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: wait_until(lambda: rows(path) == 3, 30, what="three rows"))
    log.stop_flushing()
    assert await loop.run_in_executor(None, log.close)
    with closing(sqlite3.connect(path)) as conn:
        clients = sorted(r[0] for r in conn.execute("SELECT client FROM lookups"))
        rcodes = sorted(r[0] for r in conn.execute("SELECT rcode FROM lookups"))
    assert clients == ["127.0.0.1", "127.0.0.1", "192.0.2.5"]
    assert rcodes == ["NOERROR", "NOERROR", "NXDOMAIN"]
    assert log.overflow == 0


@pytest.mark.asyncio
async def test_a_pinned_servers_writer_runs_on_the_other_cpus(tmp_path: Path) -> None:
    """A child inherits its parent's CPU affinity; the writer leaves a pinned server's CPUs to it
    (its bursts on the server's CPU were the log-on latency tail), and stays put otherwise."""
    import os

    before = os.sched_getaffinity(0)
    every = set(range(os.cpu_count() or 1))
    pinned = {max(before)}
    os.sched_setaffinity(0, pinned)  # as `taskset` would pin the server; the child inherits it
    try:
        log = ProcessLog(str(tmp_path / "log.db"))
        log.start()
    finally:
        os.sched_setaffinity(0, before)
    want = (every - pinned) or pinned  # one CPU in all: nothing else to go to
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, lambda: wait_until(
            lambda: os.sched_getaffinity(log._proc.pid) == want, 10.0, what=f"the writer on CPUs {want}"))
    finally:
        log.stop_flushing()
        assert await loop.run_in_executor(None, log.close)
