"""doctor's pieces that need no lab: reading the agent-side tools' output, bad input.

The whole of doctor runs against a real Docker daemon and a fenced user in test_docker_lab.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resolver.doctor import classify_connect, classify_dns, diagnose

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("output", "want"), [
    # busybox nslookup (through Docker's embedded DNS)
    ("Server:\t\t127.0.0.11\nAddress:\t127.0.0.11:53\n\n** server can't find x.invalid: NXDOMAIN\n",
     "nxdomain"),
    (";; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 4242\n", "nxdomain"),  # dig
    ("ENOTFOUND\n", "nxdomain"),  # node dns.resolve4
    ("getent-rc=2\n", "nxdomain"),
    (";; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 1\n", "answered"),
    ("Name:\tx.example\nAddress: 203.0.113.10\n", "answered"),
    (";; communications error to 192.0.2.53#53: timed out\n;; no servers could be reached\n", "timeout"),
    (";; communications error to 192.0.2.53#53: connection refused\n", "refused"),
    ("NO-TOOL\n", "no-tool"),
    ("", "unknown"),
])
def test_classify_dns(output: str, want: str) -> None:
    assert classify_dns(output) == want


@pytest.mark.parametrize(("output", "want"), [
    ("nc: can't connect to remote host (192.0.2.1): Connection refused\n", "refused"),
    ("ECONNREFUSED\n", "refused"),
    ("bash: connect: Connection refused\nrc=1\n", "refused"),
    ("nc: timed out\n", "timeout"),
    ("TIMEOUT\n", "timeout"),
    ("rc=124\n", "timeout"),
    ("CONNECTED\nrc=0\n", "connected"),
    ("NO-TOOL\n", "no-tool"),
])
def test_classify_connect(output: str, want: str) -> None:
    assert classify_connect(output) == want


def test_broken_policy_and_missing_docker_fail_with_the_fix(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[allow]\ndomains = ['exa mple.com']\n")
    diag = diagnose(str(policy), container="openclaw-gateway", docker_socket=str(tmp_path / "no.sock"))
    assert not diag.ok
    by_name = {c.name: c for c in diag.checks}
    assert not by_name["policy"].ok and "exa mple.com" in by_name["policy"].detail
    assert by_name["policy"].fix == f"fix the file, then `dnsguard check --policy {policy}`"
    assert not by_name["agent"].ok and "no.sock" in by_name["agent"].detail
    # nothing that needs a valid policy ran as if it had one
    assert set(by_name) == {"policy", "agent"}


def test_cli_json_and_exit_code(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("mode = 'sometimes'\n")
    p = subprocess.run([sys.executable, "-m", "resolver", "doctor", "--policy", str(policy),
                        "--format", "json"], capture_output=True, text=True, timeout=60, check=False,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 1, p.stderr
    data = json.loads(p.stdout)
    assert data["schema"] == "dnsguard-doctor/1" and data["ok"] is False
    assert data["checks"][0]["name"] == "policy" and data["checks"][0]["fix"]
    both = subprocess.run([sys.executable, "-m", "resolver", "doctor", "--container", "a", "--user", "b"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert both.returncode == 2 and "not both" in both.stderr
