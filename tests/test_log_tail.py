"""The writer process yields its CPU to the event loop: every one of its threads runs at
nice 10 with the longest scheduler slice, so a waking server preempts it at once (EEVDF's
shorter-slice-wins rule) instead of waiting out the writer's slice (the log-on p99 tail)."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from helpers import wait_until
from test_logproc import rec, rows

from resolver.log import logproc
from resolver.log.logproc import ProcessLog


def _sched(pid: int, tid: str) -> dict[str, int]:
    text = Path(f"/proc/{pid}/task/{tid}/sched").read_text()
    return {k: int(v) for k, v in re.findall(r"^(se\.slice|prio)\s*:\s*(\d+)", text, re.M)}


async def test_every_writer_thread_has_the_long_slice_and_a_low_priority(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    log = ProcessLog(str(path), retention_days=None)
    log.start()
    loop = asyncio.get_running_loop()
    try:
        log.submit(rec(1))
        # A committed row: the writer thread is running, so the slice was set after it started.
        await loop.run_in_executor(None, lambda: wait_until(lambda: rows(path) == 1, 30, what="a row"))
        pid = log.pid
        assert pid is not None
        tids = os.listdir(f"/proc/{pid}/task")
        assert len(tids) >= 2  # the reader of the pipe and the SQLite writer thread at least
        for tid in tids:
            s = _sched(pid, tid)
            assert s["prio"] == 130, (tid, s)  # nice 10
            assert s.get("se.slice") == logproc._SLICE_NS, (tid, s)
        # The server itself keeps the default slice (it is the one that must preempt).
        assert _sched(os.getpid(), str(os.getpid())).get("se.slice") != logproc._SLICE_NS
    finally:
        log.stop_flushing()
        assert await loop.run_in_executor(None, log.close)
