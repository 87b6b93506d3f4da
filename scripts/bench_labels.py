#!/usr/bin/env python3
"""What naming clients (schema 3's client_labels) costs the log writer.

Writes the same records through QueryLog with and without a namer (a dict lookup, as
ClientNames does with Docker's names in memory) and prints rows/s for each, median of N rounds.

    python scripts/bench_labels.py [--rows 300000] [--clients 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from resolver.core.names import text_to_wire
from resolver.log.querylog import QueryLog


def records(n: int, clients: int) -> list[tuple]:
    t0 = time.time() - 3600
    names = [text_to_wire(f"host{i}.example.com") for i in range(500)]
    return [(t0 + i * 0.001, f"172.29.53.{2 + i % clients}", "udp", names[i % 500], 1, "allow", "enforce",
             "*.example.com", 0, '["203.0.113.10"]', False, 0.3, None) for i in range(n)]


def run(recs: list[tuple], namer: object) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        log = QueryLog(str(Path(tmp) / "bench.db"), queue_max=len(recs) + 1, batch_max=20_000,
                       namer=namer)  # type: ignore[arg-type]
        log.submit_many(recs)
        start = time.perf_counter()
        log.start()
        deadline = time.monotonic() + 300
        while log.written < len(recs) and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        assert log.close() and log.written == len(recs)
        return len(recs) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    recs = records(args.rows, args.clients)
    names = {f"172.29.53.{2 + i}": f"container-{i}" for i in range(args.clients)}
    # Interleaved rounds, so a noisy neighbour on a shared machine hits both alike.
    results: dict[str, list[float]] = {"no namer": [], "namer": []}
    for _ in range(args.rounds):
        for label, namer in (("no namer", None), ("namer", names.get)):
            results[label].append(run(recs, namer))
    for label, rates in results.items():
        print(f"{label:9s} {statistics.median(rates):>10,.0f} rows/s  (rounds: "
              f"{', '.join(f'{r:,.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
