#!/usr/bin/env python3
"""Time the lookup-log reports on big logs, and the writer's throughput.

    python scripts/bench_report.py                          # 1M and 10M rows, in /tmp/dnsguard-bench
    python scripts/bench_report.py --rows 1000000 --writer-rows 500000 --reuse

For each size a log spread over 30 days is generated with scripts/gen_lookups.py (or
reused with --reuse), then each report is run --repeat times through the same library
calls the CLI makes, and the best and median wall times are printed. The default
summary is also timed end to end through the click command (formatting included).

Writer throughput: records are put through QueryLog.submit() and QueryLog.close()
into (a) a fresh database and (b) a copy of the 1M-row log, both with every index in
place, measuring submit cost per call, rows/s with everything queued up front, and
rows/s with a producer thread submitting concurrently (the GIL shared as in serve).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from click.testing import CliRunner  # noqa: E402

from resolver.cli.report import report as report_cli  # noqa: E402
from resolver.core.names import text_to_wire  # noqa: E402
from resolver.log import report as rpt  # noqa: E402
from resolver.log.querylog import QueryLog  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_lookups  # noqa: E402


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return min(runs), statistics.median(runs)


def _rows_in(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT max(id) FROM lookup_rows").fetchone()[0] or 0
    except sqlite3.Error:
        return 0


def bench_reports(path: Path, repeat: int) -> None:
    db = rpt.open_log(str(path))
    now = time.time()
    day, week, month = now - 86400, now - 7 * 86400, now - 31 * 86400
    deny = rpt.Filters(verdict="deny")
    cases: list[tuple[str, Callable[[], object]]] = [
        ("summary --since 24h (default)", lambda: rpt.summary(db, since=day, until=now)),
        ("summary --since 7d", lambda: rpt.summary(db, since=week, until=now)),
        ("summary --since 31d (whole log)", lambda: rpt.summary(db, since=month, until=now)),
        ("summary 24h --client 127.0.0.5", lambda: rpt.summary(
            db, since=day, until=now, filters=rpt.Filters(client="127.0.0.5"))),
        ("summary 7d --name '*.docker.io'", lambda: rpt.summary(
            db, since=week, until=now, filters=rpt.Filters(name="*.docker.io"))),
        ("summary 31d --name github.com", lambda: rpt.summary(
            db, since=month, until=now, filters=rpt.Filters(name="github.com"))),
        ("names --since 24h (top 100)", lambda: rpt.names(db, since=day, until=now)),
        ("names --since 31d --limit 0 (every name)",
         lambda: rpt.names(db, since=month, until=now, limit=None)),
        ("tail -n 20", lambda: rpt.tail(db, n=20)),
        ("tail -n 20 --verdict deny", lambda: rpt.tail(db, n=20, filters=deny)),
        ("tail -n 20 --name pypi.org", lambda: rpt.tail(db, n=20, filters=rpt.Filters(name="pypi.org"))),
        ("tail -n 1000 --client ::1", lambda: rpt.tail(db, n=1000, filters=rpt.Filters(client="::1"))),
        ("tail -f poll (no new rows)", lambda: rpt.tail(db, n=10_000, after_id=rpt.last_id(db))),
    ]
    for label, fn in cases:
        best, median = _time(fn, repeat)
        print(f"  {label:<44} best {best * 1000:9.1f} ms   median {median * 1000:9.1f} ms", flush=True)
    runner = CliRunner()
    best, median = _time(lambda: runner.invoke(report_cli, ["--db", str(path)]), repeat)
    print(f"  {'CLI: dnsguard report (table, 24h)':<44} best {best * 1000:9.1f} ms   "
          f"median {median * 1000:9.1f} ms", flush=True)
    db.close()


def _records(n: int, seed: int = 7) -> list[tuple]:
    rng = random.Random(seed)
    names = [text_to_wire(f"h{i}.svc{i % 400}.example.com") for i in range(20_000)]
    weights = [1.0 / (r + 1) ** 1.1 for r in range(len(names))]
    picks = rng.choices(names, weights=weights, k=n)
    clients = ["127.0.0.1", "127.0.0.2", "::1", "127.0.0.3"]
    t = time.time()
    return [(t + i * 1e-4, clients[i % 4], "udp", picks[i], 1 if i % 3 else 28,
             "allow" if i % 5 else "deny", "enforce", "*.example.com" if i % 5 else None,
             0 if i % 5 else 3, '["192.0.2.1"]' if i % 5 else None, bool(i % 2), 0.2, None)
            for i in range(n)]


def bench_writer(path: Path, n: int, label: str) -> None:
    records = _records(n)
    # (1) everything queued first: pure writer throughput, and the submit cost per call.
    log = QueryLog(str(path), queue_max=n + 1, retention_days=None)
    t0 = time.perf_counter()
    for r in records:
        log.submit(r)
    t1 = time.perf_counter()
    log.start()
    assert log.close(timeout=600)
    t2 = time.perf_counter()
    print(f"  {label}: submit {(t1 - t0) / n * 1e9:6.0f} ns/call; writer {n / (t2 - t1):9,.0f} rows/s "
          f"({n:,} rows queued up front, {t2 - t1:.1f}s)", flush=True)
    # (2) producer submitting concurrently, the way serve's event loop does.
    log = QueryLog(str(path), queue_max=n + 1, retention_days=None)
    log.start()
    t0 = time.perf_counter()

    def produce() -> None:
        for r in records:
            log.submit(r)

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join()
    t1 = time.perf_counter()
    assert log.close(timeout=600)
    t2 = time.perf_counter()
    print(f"  {label}: concurrent producer {n / (t1 - t0):11,.0f} submits/s; all {n:,} committed "
          f"after {t2 - t0:.1f}s = {n / (t2 - t0):9,.0f} rows/s; overflow {log.overflow}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1000000,10000000", help="comma-separated log sizes")
    ap.add_argument("--dir", default="/tmp/dnsguard-bench", help="where the generated logs live")
    ap.add_argument("--reuse", action="store_true", help="reuse a generated log of the right size")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--writer-rows", type=int, default=1_000_000, help="0 skips the writer benchmark")
    args = ap.parse_args(argv)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.rows.split(",") if s]
    print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs")
    for rows in sizes:
        path = out / f"lookups-{rows}.db"
        if not (args.reuse and _rows_in(path) == rows):
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            took = gen_lookups.generate(str(path), rows, 30.0, 20_000, 1)
            print(f"generated {rows:,} rows in {took:.1f}s ({rows / took:,.0f} rows/s)")
        size_mb = path.stat().st_size / 1e6
        print(f"reports on {rows:,} rows over 30 days ({size_mb:,.0f} MB):", flush=True)
        bench_reports(path, args.repeat)
    if args.writer_rows:
        print(f"writer throughput ({args.writer_rows:,} records, 20k names, all indexes in place):")
        fresh = out / "writer-fresh.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{fresh}{suffix}").unlink(missing_ok=True)
        bench_writer(fresh, args.writer_rows, "fresh db")
        base = out / f"lookups-{sizes[0]}.db"
        if base.exists():
            copy = out / "writer-big.db"
            shutil.copyfile(base, copy)
            bench_writer(copy, args.writer_rows, f"appending to {sizes[0]:,}-row db")
    return 0


if __name__ == "__main__":
    sys.exit(main())
