"""The writer process idles (SCHED_IDLE) while it keeps up, so it never preempts the event
loop it shares a CPU with, and competes again while it is behind, so it never starves."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from helpers import wait_until
from test_logproc import rec, rows

from resolver.log import logproc
from resolver.log.logproc import ProcessLog, WriterPriority

SCHED_IDLE = 5


def _policies(pid: int) -> dict[str, tuple[int, int]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{tid}/sched").read_text()
        fields = dict(re.findall(r"^(policy|prio)\s*:\s*(-?\d+)", text, re.M))
        out[tid] = (int(fields["policy"]), int(fields["prio"]))
    return out


async def test_an_idle_writer_runs_every_thread_as_sched_idle(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    log = ProcessLog(str(path), retention_days=None)
    log.start()
    loop = asyncio.get_running_loop()
    try:
        log.submit(rec(1))
        await loop.run_in_executor(None, lambda: wait_until(lambda: rows(path) == 1, 30, what="a row"))
        pid = log.pid
        assert pid is not None
        policies = _policies(pid)
        assert len(policies) >= 2  # the pipe reader and the SQLite writer thread at least
        assert all(policy == SCHED_IDLE for policy, _prio in policies.values()), policies
    finally:
        log.stop_flushing()
        assert await loop.run_in_executor(None, log.close)


async def test_a_backlog_bigger_than_the_idle_bound_is_all_written(tmp_path: Path) -> None:
    """Far more than BEHIND_ROWS records at once: the writer switches to an ordinary task to
    catch up, and every record lands."""
    path = tmp_path / "log.db"
    log = ProcessLog(str(path), queue_max=1_000_000, retention_days=None)
    log.start()
    n = logproc.BEHIND_ROWS * 4 + 3
    for i in range(n):
        log.submit(rec(i))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: wait_until(lambda: rows(path) == n, 120, what="every row"))
    log.stop_flushing()
    assert await loop.run_in_executor(None, log.close)
    assert log.overflow == 0


def test_the_priority_follows_the_backlog() -> None:
    """In this (test) process: idle when caught up, ordinary when behind, with hysteresis."""
    before = os.sched_getscheduler(0)
    prio = WriterPriority()
    try:
        assert prio.enabled and prio.idle and os.sched_getscheduler(0) == SCHED_IDLE
        prio.update(logproc.BEHIND_PIPE, 0)
        assert not prio.idle and os.sched_getscheduler(0) == os.SCHED_OTHER
        prio.update(logproc.CAUGHT_UP_PIPE, 0)  # between the bounds: stays ordinary
        assert not prio.idle
        prio.update(0, logproc.CAUGHT_UP_ROWS - 1)
        assert prio.idle
        prio.update(0, logproc.BEHIND_ROWS)
        assert not prio.idle and os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        os.sched_setscheduler(0, before, os.sched_param(0))
        assert os.sched_getscheduler(0) == before


def test_disabled_it_never_touches_the_policy() -> None:
    before = os.sched_getscheduler(0)
    prio = WriterPriority(enabled=False)
    prio.update(0, 0)
    assert not prio.enabled and not prio.idle and os.sched_getscheduler(0) == before
