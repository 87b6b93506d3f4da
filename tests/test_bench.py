"""`scripts/bench` scenario d, quick, against its references: the C forwarders (#15) and the
do-nothing Python forwarder (`--floor`) run beside dnsguard on the same upstream, answer every
unique name by forwarding it, and get their ratio row. Figures are not asserted (speed is
measured, not tested); that the run compares like with like is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_scenario_d_compares_dnsguard_with_forwarders_on_the_same_upstream(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench"), "--quick", "--scenarios", "d",
         "--reference", "both", "--floor", "--loads", "1000", "--load-duration", "1", "--no-pin",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (result_file,) = out.glob("*.json")
    data = json.loads(result_file.read_text())
    by_server = {r["server"]: r for r in data["results"] if r["scenario"] == "d"}
    assert set(by_server) == {"dnsguard", "dnsmasq", "unbound", "dnsmasq-fwd", "unbound-fwd", "python-floor"}
    for name in ("dnsguard", "dnsmasq-fwd", "unbound-fwd", "python-floor"):
        sat = by_server[name]["saturation"]
        # Every query a unique *.miss.test name only the upstream knows: NOERROR means forwarded.
        assert sat["ok"] and sat["completed"] > 0 and set(sat["rcodes"]) == {"NOERROR"}, (name, sat)
    refs = {r["reference"] for r in data["ratios"] if r["scenario"] == "d"}
    assert {"dnsmasq-fwd", "unbound-fwd", "dnsmasq", "unbound", "python-floor"} <= refs


def test_floor_forwarder_refuses_addresses_off_loopback() -> None:
    for listen, upstream in (("192.0.2.1:5300", "127.0.0.1:5301"), ("127.0.0.1:5300", "198.51.100.1:53")):
        run = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "floor_forwarder.py"), "--listen", listen,
             "--upstream", upstream], capture_output=True, text=True, timeout=30)
        assert run.returncode == 2 and "loopback addresses only" in run.stderr, run.stderr


def test_python_only_miss_bench_answers_every_miss_through_the_shipped_path() -> None:
    # The script asserts every miss was answered NOERROR through Pending.then, and logged; a
    # broken path (nothing sent, no waiter registered, the reply not matched, no answer) fails it.
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_miss_python.py"), "--misses", "300", "--rounds", "1"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)))  # this checkout's resolver, not an installed one
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "thread CPU per miss median" in run.stdout and "query side" in run.stdout, run.stdout


def test_log_on_rows_report_the_writer_process_own_cpu(tmp_path: Path) -> None:
    # The log-on saturation figure hinges on where the writer's CPU goes (docs/performance.md,
    # "The log at saturation"): the bench reports it beside the server's total, per round.
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench"), "--quick", "--scenarios", "a+log", "--reference",
         "none", "--loads", "1000", "--load-duration", "1", "--no-pin", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (result_file,) = out.glob("*.json")
    (row,) = [r for r in json.loads(result_file.read_text())["results"] if r["scenario"] == "a+log"]
    sat = row["saturation"]
    assert sat["completed"] > 0 and row["log_check"]["verdict"] == "rows == answered", row["log_check"]
    # The writer wrote those rows, so it used CPU; it is part of (never more than) the tree's.
    assert 0 < sat["writer_cpu_us_per_q"] <= sat["cpu_us_per_q"], sat
    assert "log writer" in run.stdout
