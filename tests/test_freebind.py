"""Listening on an address the host does not have yet (a Docker bridge's gateway before
`compose up`): serve binds it anyway (IP_FREEBIND), says so, and answers once it appears.

Runs in a network namespace of its own (TEST-NET addresses), never in the root namespace.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from helpers import make_policy, to_toml, wait_until
from netns import Topology, fresh_topology

LISTEN = "198.51.100.77"  # nowhere in the topology until the test adds it


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    yield from fresh_topology()


def test_serve_binds_a_missing_address_and_answers_once_it_appears(topo: Topology, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(to_toml(make_policy(["203.0.113.53"], allow=["ok.test"],
                                          server={"clients": [f"{LISTEN}/32"]})))
    err = tmp_path / "stderr"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with err.open("w") as out:
        proc = topo.spawn(topo.router, sys.executable, "-m", "resolver", "serve", "--policy", str(policy),
                          "--listen", f"{LISTEN}:5353", "--no-log", stdout=subprocess.DEVNULL, stderr=out,
                          env=env, cwd=str(tmp_path))
    try:
        wait_until(lambda: f"listening on {LISTEN}:5353" in err.read_text() or proc.poll() is not None,
                   20.0, what="serve to listen")
        assert proc.poll() is None, err.read_text()
        assert f"{LISTEN} is not an address of this host yet" in err.read_text()

        topo.ns(topo.router, "ip", "addr", "add", f"{LISTEN}/32", "dev", "lo")
        for tcp in ([], ["+tcp"]):
            out = topo.ns(topo.router, "dig", "+tries=1", "+time=3", *tcp, f"@{LISTEN}", "-p", "5353",
                          "denied.test", check=False).stdout
            assert "status: NXDOMAIN" in out, out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_a_local_address_is_bound_as_before(topo: Topology, tmp_path: Path) -> None:
    """No freebind (and no warning) where the address exists: a typo'd address is the only
    other way to reach it, and that one is named on stderr."""
    policy = tmp_path / "policy.toml"
    policy.write_text(to_toml(make_policy(["203.0.113.53"], allow=["ok.test"])))
    err = tmp_path / "stderr"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with err.open("w") as out:
        proc = topo.spawn(topo.router, sys.executable, "-m", "resolver", "serve", "--policy", str(policy),
                          "--listen", "192.0.2.1:5353", "--no-log", stdout=subprocess.DEVNULL, stderr=out,
                          env=env, cwd=str(tmp_path))
    try:
        wait_until(lambda: "listening on 192.0.2.1:5353" in err.read_text() or proc.poll() is not None,
                   20.0, what="serve to listen")
        assert proc.poll() is None and "not an address of this host" not in err.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
