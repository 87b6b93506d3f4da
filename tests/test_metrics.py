"""Prometheus /metrics on a real server: scraped over HTTP, checked by `promtool check metrics`.

promtool (Debian package `prometheus`) is the independent judge of the exposition format;
the figures are checked against the queries this test sent.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import urllib.request

import dns.rcode
import pytest
from helpers import make_policy, udp_exchange, wait_until
from prometheus_client.parser import text_string_to_metric_families

METRICS_RE = re.compile(r"dnsguard: metrics on http://127\.0\.0\.1:(\d+)/metrics")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (apt-get install prometheus)")
    return path


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples(text).items() if n == name and want <= ls]
    assert found, f"no sample {name}{labels} in:\n{text}"
    return sum(found)


@pytest.fixture
def upstream(dnsmasq):
    return dnsmasq()


def metrics_port(g) -> int:
    return int(wait_until(lambda: METRICS_RE.search(g.stderr_text()), 10, what="metrics line").group(1))


def test_scrape_passes_promtool_and_counts_what_was_asked(upstream, dnsguard):
    policy = make_policy([upstream.addr], allow=["allowed.test", "other.test"], deny=["bad.allowed.test"])
    g = dnsguard(policy, "--metrics", "127.0.0.1:0")
    port = metrics_port(g)
    assert g.query("allowed.test").rcode() == dns.rcode.NOERROR  # miss -> upstream
    assert g.query("allowed.test").rcode() == dns.rcode.NOERROR  # cache hit
    assert g.query("other.test", tcp=True).rcode() == dns.rcode.NOERROR
    for _ in range(3):
        assert g.query("denied.test").rcode() == dns.rcode.NXDOMAIN
    no_question = bytes.fromhex("123401000000000000000000")  # QDCOUNT 0: FORMERR, no policy decision
    assert udp_exchange(no_question, g.port)[3] & 0x0F == dns.rcode.FORMERR

    text = scrape(port)
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    assert value(text, "dnsguard_queries_total", verdict="deny", mode="enforce", transport="udp",
                 rcode="NXDOMAIN") == 3
    assert value(text, "dnsguard_queries_total", verdict="allow", transport="udp", rcode="NOERROR") == 2
    assert value(text, "dnsguard_queries_total", verdict="allow", transport="tcp", rcode="NOERROR") == 1
    assert value(text, "dnsguard_queries_total", verdict="none", rcode="FORMERR") == 1
    assert value(text, "dnsguard_cache_hits_total") >= 1
    assert value(text, "dnsguard_cache_misses_total") == 2
    assert value(text, "dnsguard_cache_entries") == 2
    server = upstream.addr
    assert value(text, "dnsguard_upstream_duration_seconds_count", server=server) == 2
    assert value(text, "dnsguard_upstream_duration_seconds_bucket", server=server, le="+Inf") == 2
    assert value(text, "dnsguard_policy_rules") == 3
    sha = hashlib.sha256(g.policy_path.read_bytes()).hexdigest()
    assert value(text, "dnsguard_policy_info", sha256=sha, mode="enforce") == 1
    assert value(text, "dnsguard_build_info") == 1
    assert value(text, "dnsguard_log_overflow_total") == 0
    # The log hands rows over on a timer: all seven arrive at the writer.
    wait_until(lambda: value(scrape(port), "dnsguard_log_rows_handed_total") == 7, 10, what="rows handed")
    assert value(text, "dnsguard_metrics_read_errors_total") == 0


def test_reloads_and_upstream_errors_are_counted(nameserver, dnsguard):
    silent = nameserver("blackhole")
    g = dnsguard(make_policy([f"127.0.0.1:{silent.port}"], allow=["allowed.test"], timeout_ms=300),
                 "--metrics", "127.0.0.1:0", "--no-log")
    port = metrics_port(g)
    assert g.query("allowed.test").rcode() == dns.rcode.SERVFAIL
    text = scrape(port)
    server = f"127.0.0.1:{silent.port}"
    assert value(text, "dnsguard_upstream_errors_total", server=server, kind="timeout") == 1
    assert value(text, "dnsguard_queries_total", verdict="allow", rcode="SERVFAIL") == 1
    assert "dnsguard_log_rows_handed_total" not in text  # log off: no log figures, not zeros

    good = g.policy_path.read_text()
    g.policy_path.write_text(good + "\n[deny]\ndomains = [\"x.test\"]\n")  # [deny] twice: invalid TOML
    g.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: value(scrape(port), "dnsguard_policy_reloads_total", result="rejected") == 1, 10,
               what="rejected reload counted")
    g.policy_path.write_text(good.replace('"allowed.test"', '"allowed.test", "other.test"'))
    g.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: value(scrape(port), "dnsguard_policy_reloads_total", result="ok") == 1, 10,
               what="good reload counted")
    text = scrape(port)
    assert value(text, "dnsguard_policy_rules") == 2
    sha = hashlib.sha256(g.policy_path.read_bytes()).hexdigest()
    assert value(text, "dnsguard_policy_info", sha256=sha) == 1
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_bad_metrics_address_is_a_clear_error(tmp_path):
    from resolver.core.errors import PolicyError
    from resolver.policy.config import parse_config

    with pytest.raises(PolicyError, match="metrics.listen"):
        parse_config('[metrics]\nlisten = "localhost:x"\n[upstream]\nservers = ["127.0.0.1"]\n')
    with pytest.raises(PolicyError, match="dnstap.address"):
        parse_config('[dnstap]\naddress = "udp:127.0.0.1:6000"\n[upstream]\nservers = ["127.0.0.1"]\n')
    cfg = parse_config('[metrics]\nlisten = "127.0.0.1:9153"\n[dnstap]\naddress = "unix:/run/dnstap.sock"\n'
                       '[upstream]\nservers = ["127.0.0.1"]\n')
    assert cfg.metrics.listen == ("127.0.0.1", 9153)
    assert cfg.dnstap.address == "unix:/run/dnstap.sock"


def test_grafana_dashboard_queries_parse_and_name_real_metrics(tmp_path):
    """deploy/grafana/dnsguard.json: every query is valid PromQL (promtool) and names a metric we export."""
    import json
    from pathlib import Path

    import resolver.observe.metrics as m

    dash = json.loads((Path(__file__).resolve().parent.parent / "deploy/grafana/dnsguard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    # Grafana's variables, as Grafana would substitute them.
    plain = [e.replace("$__rate_interval", "5m").replace("$__range", "6h").replace("$instance", ".*")
             for e in exprs]
    rules = tmp_path / "rules.yml"
    rules.write_text("groups:\n- name: dashboard\n  rules:\n" + "".join(
        f"  - record: dashboard:q{i}\n    expr: {json.dumps(e)}\n" for i, e in enumerate(plain)))
    check = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    source = Path(m.__file__).read_text()
    exported = set(re.findall(r'"(dnsguard_\w+)"', source))
    for name in {n for e in exprs for n in re.findall(r"dnsguard_\w+", e)}:
        base = re.sub(r"_(total|bucket|count|sum|info)$", "", name)
        assert name in exported or base in exported, f"dashboard uses {name}, which dnsguard does not export"


def test_rate_limited_and_stale_answers_are_counted(nameserver, dnsguard):
    """Figures from #11: queries refused by [server] rate_limit, answers served stale."""
    import time

    ns = nameserver("answer", {"www.stale.test.": {"A": "192.0.2.31", "_ttl": "1"}})
    g = dnsguard(make_policy([ns.addr], allow=["www.stale.test"], server={"rate_limit": 5}),
                 "--metrics", "127.0.0.1:0")
    port = metrics_port(g)
    first = g.query("www.stale.test", timeout=6.0)
    assert first.rcode() == dns.rcode.NOERROR
    answered_at = time.monotonic()

    # 40 queries as fast as one client can ask them: past the burst, REFUSED.
    rcodes = [g.query(f"n{i}.flood.test", source="127.0.0.2").rcode() for i in range(40)]
    refused = rcodes.count(dns.rcode.REFUSED)
    assert 0 < refused < 40
    text = scrape(port)
    assert value(text, "dnsguard_rate_limited_total") == refused
    assert value(text, "dnsguard_queries_total", verdict="none", rcode="REFUSED") == refused
    assert value(text, "dnsguard_stale_answers_total") == 0

    ns.mode = "blackhole"
    wait_until(lambda: time.monotonic() > answered_at + 1.5, 5.0, what="the TTL to run out")
    resp = g.query("www.stale.test", timeout=6.0)  # after the upstream timeout (1.5 s)
    assert [rr.ttl for rr in resp.answer] == [30]
    assert value(scrape(port), "dnsguard_stale_answers_total") == 1


def test_log_figures_count_size_drops_and_new_connections(tmp_path):
    """LogFigures reads what other processes wrote: rows deleted for max_size_mb, connections."""
    import sqlite3
    from contextlib import closing

    from resolver.core.logdb import ensure_connections_table
    from resolver.log.querylog import QueryLog
    from resolver.observe.metrics import LogFigures

    path = tmp_path / "log.db"
    figures = LogFigures(str(path), connections=True)  # before the file exists: nothing to read yet
    assert value(_exposition(figures), "dnsguard_log_size_dropped_total") == 0

    log = QueryLog(str(path), retention_days=None)
    log.start()
    assert log.close()

    def add(*rows: tuple) -> None:
        with closing(sqlite3.connect(path)) as conn:
            ensure_connections_table(conn)
            conn.executemany("INSERT INTO connections (ts, end_ts, source, destination, protocol, port, "
                             "verdict) VALUES (1000, ?, '192.0.2.2', '203.0.113.9', 'tcp', 443, ?)", rows)
            conn.commit()

    add((1001, "allowed"))
    text = _exposition(figures)  # the first read marks where counting starts
    assert 'dnsguard_connections_total{verdict="allowed"}' not in text
    add((None, "allowed"), (1002, "allowed"), (1002, "blocked"))
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("INSERT INTO log_size_drops (ts, dropped) VALUES (1000, 5000), (1001, 2500)")
        conn.execute("INSERT INTO connection_overflow (ts, dropped, overruns) VALUES (1000, 3, 2)")
        conn.commit()
    text = _exposition(figures)
    assert value(text, "dnsguard_connections_total", verdict="allowed") == 2
    assert value(text, "dnsguard_connections_total", verdict="blocked") == 1
    assert value(text, "dnsguard_connections_open") == 1
    assert value(text, "dnsguard_connections_unrecorded_total") == 3
    assert value(text, "dnsguard_conntrack_overruns_total") == 2
    assert value(text, "dnsguard_log_size_dropped_total") == 7500
    add((1003, "would-block"))
    text = _exposition(figures)  # counted once each: only rows above the mark are read
    assert value(text, "dnsguard_connections_total", verdict="allowed") == 2
    assert value(text, "dnsguard_connections_total", verdict="would-block") == 1
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def _exposition(reader) -> str:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    class Collector:
        def collect(self):
            return reader()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry).decode()
