"""The OpenClaw-on-Docker deployment, end to end, with a real Docker daemon.

One dockerd per module, in a network namespace of its own (never the root namespace: it
rewrites iptables wherever it runs), with its data, exec root, socket and pidfile in the
test's temporary directory. The namespace gets an "internet" (another namespace over a veth,
TEST-NET addresses only): dnsmasq as the upstream resolver and an HTTP server. The agent
image is built locally (``docker import`` of a busybox-static root file system); nothing
is pulled. The deployment is what ``dnsguard init --preset openclaw`` and the compose
override set up: the openclaw-fenced network (172.29.53.0/24), dnsguard on its gateway,
the fence on its subnet from DOCKER-USER, a container named openclaw-gateway with
``--dns 172.29.53.1``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from netns import PREFIX, cleanup_stale, sh

REPO = Path(__file__).resolve().parent.parent
SUBNET, GATEWAY = "172.29.53.0/24", "172.29.53.1"
LAB_D, LAB_I = "198.51.100.1", "198.51.100.2"  # docker namespace <-> "internet"
WEB_ALLOWED, WEB_OTHER, UPSTREAM = "203.0.113.10", "203.0.113.11", "203.0.113.53"
AGENT = "openclaw-gateway"
IMAGE = "dnsguard-lab-agent:1"
Proc = subprocess.CompletedProcess[str]
TOOLS = ("dockerd", "docker", "busybox", "nsenter", "dnsmasq", "iptables-save")


def _need() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, dockerd)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:  # installed by scripts/install-test-deps: a missing one is a broken set-up
        pytest.fail(f"missing {', '.join(missing)}: run scripts/install-test-deps", pytrace=False)


def _busybox_rootfs(tar_path: Path) -> None:
    busybox = shutil.which("busybox")
    assert busybox is not None
    with tarfile.open(tar_path, "w") as tar:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        # busybox-static's wget resolves through glibc's getaddrinfo, which without an
        # nsswitch.conf segfaults in a static binary; nss files+dns are built into glibc.
        conf = b"hosts: files dns\n"
        info = tarfile.TarInfo("etc/nsswitch.conf")
        info.size, info.mode = len(conf), 0o644
        tar.addfile(info, io.BytesIO(conf))
        for applet in ("sh", "nslookup", "wget", "nc", "cat", "sleep", "echo", "timeout"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)


class Lab:
    def __init__(self, tmp: Path) -> None:
        base = f"{PREFIX}{os.getpid()}-lab"
        self.dns, self.inet = f"{base}-docker", f"{base}-inet"
        self.tmp = tmp
        self.sock = str(tmp / "docker.sock")
        self.procs: list[subprocess.Popen] = []
        self.dockerd: subprocess.Popen | None = None
        self.db = str(tmp / "dnsguard.db")
        self.policy = tmp / "policy.toml"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "PYTHONPATH": str(REPO)}

    # -- running things
    def ns(self, name: str, *argv: str, check: bool = True, timeout: float = 30.0
           ) -> subprocess.CompletedProcess[str]:
        assert name in (self.dns, self.inet)
        return sh(["ip", "netns", "exec", name, *argv], check=check, timeout=timeout)

    def docker(self, *argv: str, check: bool = True, timeout: float = 60.0) -> Proc:
        p = subprocess.run(["docker", *argv], capture_output=True, text=True, timeout=timeout, env=self.env,
                           check=False)
        if check and p.returncode != 0:
            raise RuntimeError(f"docker {' '.join(argv)} -> {p.returncode}: {p.stderr.strip()}")
        return p

    def dnsguard(self, *argv: str, check: bool = True, timeout: float = 120.0) -> Proc:
        """The CLI inside the docker namespace (where the bridge, the rules and the sets are)."""
        p = subprocess.run(["ip", "netns", "exec", self.dns, sys.executable, "-m", "resolver", *argv],
                           capture_output=True, text=True, timeout=timeout, env=self.env, cwd=self.tmp,
                           check=False)
        if check and p.returncode != 0:
            raise AssertionError(f"dnsguard {' '.join(argv)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def exec(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return self.docker("exec", AGENT, *argv, check=False, timeout=timeout)

    def save(self) -> str:
        """Both families' rules, counters and comments aside: what `remove` must restore.

        IPv4 (Docker's rules) byte for byte. IPv6 (Docker's are off): its rules and chains; an
        apply loads the empty ip6tables filter table, which then lists its built-in chains.
        """
        text = self.ns(self.dns, "iptables-save").stdout
        out = [re.sub(r"\[\d+:\d+\]", "", ln) for ln in text.splitlines() if not ln.startswith("#")]
        text6 = self.ns(self.dns, "ip6tables-save").stdout
        out += [ln for ln in text6.splitlines() if ln.startswith("-A ") or (
            ln.startswith(":") and ln.split()[0][1:] not in ("INPUT", "FORWARD", "OUTPUT", "PREROUTING",
                                                             "POSTROUTING"))]
        return "\n".join(out)

    # -- building it
    def start(self) -> None:
        cleanup_stale()
        for name in (self.dns, self.inet):
            sh(["ip", "netns", "add", name])
            self.ns(name, "ip", "link", "set", "lo", "up")
        self.ns(self.dns, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "i0", "netns", self.inet)
        self.ns(self.dns, "ip", "addr", "add", f"{LAB_D}/24", "dev", "d0")
        self.ns(self.inet, "ip", "addr", "add", f"{LAB_I}/24", "dev", "i0")
        for name, dev in ((self.dns, "d0"), (self.inet, "i0")):
            self.ns(name, "ip", "link", "set", dev, "up")
        for addr in (WEB_ALLOWED, WEB_OTHER, UPSTREAM):
            self.ns(self.inet, "ip", "addr", "add", f"{addr}/32", "dev", "lo")
        # Only TEST-NET is routed out of the docker namespace; 192.0.2.0/24 (doctor's probe)
        # goes to the "internet", which has nothing there, so unfenced it times out.
        for net in ("203.0.113.0/24", "192.0.2.0/24"):
            self.ns(self.dns, "ip", "route", "add", net, "via", LAB_I)
        self.ns(self.inet, "ip", "route", "add", "default", "via", LAB_D)
        self._spawn(self.inet, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                    "--bind-interfaces", f"--listen-address={UPSTREAM}", "--port=53", "--pid-file=",
                    "--conf-file=/dev/null", "--user=root", "--local-ttl=300", "--local=/test/",
                    f"--host-record=allowed.test,{WEB_ALLOWED}", f"--host-record=other.test,{WEB_OTHER}")
        web = self.tmp / "www"
        web.mkdir()
        (web / "index.html").write_text("hello from the internet\n")
        self._spawn(self.inet, sys.executable, "-m", "http.server", "80", "--bind", "0.0.0.0", "--directory",
                    str(web))
        self.write_policy()
        # Boot order, as dnsguard-fence.service (and its Docker drop-in) does it: the fence
        # goes in before Docker starts, into a DOCKER-USER chain made for it, which Docker keeps.
        self.ns(self.dns, "iptables", "-w", "-N", "DOCKER-USER")
        self.dnsguard("firewall", "apply", "--policy", str(self.policy), "--source", SUBNET)
        self._start_dockerd()
        # the agent image: busybox-static, imported, never pulled
        rootfs = self.tmp / "rootfs.tar"
        _busybox_rootfs(rootfs)
        self.docker("import", str(rootfs), IMAGE)
        # what docker-compose.dnsguard.yml creates
        self.docker("network", "create", "--subnet", SUBNET, "--gateway", GATEWAY, "openclaw-fenced")
        wait_until(lambda: self.ns(self.inet, "bash", "-c", f"exec 3<>/dev/tcp/{WEB_ALLOWED}/80", check=False)
                   .returncode == 0, 10, what="the lab's web server")

    def write_policy(self) -> None:
        """`dnsguard init --preset openclaw`, pointed at the lab's upstream, test names and socket."""
        self.dnsguard("init", "--preset", "openclaw", "--mode", "enforce", "-o", str(self.policy))
        text = self.policy.read_text()
        text = text.replace('# servers = ["192.0.2.53:53"]', f'servers = ["{UPSTREAM}:53"]')
        text = text.replace('  "api.anthropic.com",', '  "allowed.test",\n  "api.anthropic.com",')
        text = text.replace('socket = "/var/run/docker.sock"', f'socket = "{self.sock}"')
        text = text.replace('database = "dnsguard.db"', f'database = "{self.db}"')
        self.policy.write_text(text)

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen:
        log = open(self.tmp / f"{Path(argv[0]).name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(["ip", "netns", "exec", name, *argv], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(proc)
        return proc

    def _start_dockerd(self) -> None:
        # nsenter joins only the network namespace: `ip netns exec` would remount /sys, which
        # dockerd does not survive ("Devices cgroup isn't mounted").
        log = open(self.tmp / "dockerd.log", "wb")  # noqa: SIM115
        self.dockerd = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.dns}", "--", "dockerd",
             "--data-root", str(self.tmp / "data"), "--exec-root", str(self.tmp / "exec"), "-H", f"unix://{self.sock}",
             "--pidfile", str(self.tmp / "docker.pid")],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

        def up() -> bool:
            if self.dockerd is not None and self.dockerd.poll() is not None:
                raise RuntimeError(f"dockerd exited: {(self.tmp / 'dockerd.log').read_text()[-2000:]}")
            return self.docker("version", "--format", "{{.Server.Version}}", check=False).returncode == 0
        wait_until(up, 60, interval=0.2, what="dockerd to answer")

    def stop(self) -> None:
        if self.dockerd is not None and os.path.exists(self.sock):
            self.docker("rm", "-f", "-v", *self.docker("ps", "-aq", check=False).stdout.split(), check=False)
        if self.dockerd is not None and self.dockerd.poll() is None:
            self.dockerd.send_signal(signal.SIGTERM)
            try:
                self.dockerd.wait(30)
            except subprocess.TimeoutExpired:
                self.dockerd.kill()
                self.dockerd.wait(10)
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for name in (self.dns, self.inet):
            sh(["ip", "netns", "del", name], check=False)
        # dockerd leaves overlay mounts under its data root if it was killed
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):
            mnt = line.split()[1]
            if mnt.startswith(str(self.tmp) + "/"):
                subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _need()
    lab = Lab(tmp_path_factory.mktemp("dockerlab"))
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()
        assert lab.dns not in sh(["ip", "netns", "list"]).stdout


@pytest.fixture(scope="module")
def deployed(lab: Lab) -> Iterator[Lab]:
    """dnsguard serving on the fenced network's gateway, the fence applied (at "boot"), the agent running."""
    with open(lab.tmp / "serve.log", "wb") as log:
        serve = subprocess.Popen(["ip", "netns", "exec", lab.dns, sys.executable, "-m", "resolver", "serve",
                                  "--policy", str(lab.policy)], stdout=subprocess.DEVNULL, stderr=log,
                                 env=lab.env, cwd=lab.tmp)
    try:
        wait_until(lambda: f"listening on {GATEWAY}:53" in (lab.tmp / "serve.log").read_text()
                   or serve.poll() is not None, 30, what="dnsguard to listen")
        assert serve.poll() is None, (lab.tmp / "serve.log").read_text()
        lab.docker("run", "-d", "--name", AGENT, "--network", "openclaw-fenced", "--dns", GATEWAY, IMAGE,
                   "sleep", "3600")
        yield lab
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait(5)


def test_fence_applied_before_docker_survives_dockers_start(lab: Lab) -> None:
    rules = lab.ns(lab.dns, "iptables-save", "-t", "filter").stdout.splitlines()
    forward = [ln for ln in rules if ln.startswith("-A FORWARD ")]
    user = [ln for ln in rules if ln.startswith("-A DOCKER-USER ")]
    assert forward[0] == "-A FORWARD -j DOCKER-USER"  # Docker put its jump first ...
    assert "-j DNSGUARD" in user[0] and user[1:] == ["-A DOCKER-USER -j RETURN"]  # ... and kept ours


def http_get(lab: Lab, addr: str) -> Proc:
    return lab.exec("sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {addr} 80")


def test_allowed_name_resolves_and_connects(deployed: Lab) -> None:
    # busybox-static's wget crashes in this image (static glibc), so the agent resolves with
    # nslookup (through Docker's embedded DNS, which forwards to dnsguard) and speaks HTTP
    # over nc to the address it got.
    p = deployed.exec("nslookup", "allowed.test")
    found = re.findall(r"Address:\s*(203\.0\.113\.\d+)", p.stdout)
    assert found == [WEB_ALLOWED], p
    p = http_get(deployed, found[0])
    assert p.returncode == 0 and "hello from the internet" in p.stdout, p


def test_denied_name_is_nxdomain(deployed: Lab) -> None:
    p = deployed.exec("nslookup", "other.test")
    assert "NXDOMAIN" in p.stdout + p.stderr, p
    # ... and the fence keeps the agent from the address it never got from dnsguard
    p = http_get(deployed, WEB_OTHER)
    assert "hello" not in p.stdout and "refused" in (p.stdout + p.stderr).lower(), p


def test_dns_to_another_server_is_refused(deployed: Lab) -> None:
    p = deployed.exec("nslookup", "allowed.test", UPSTREAM)
    out = (p.stdout + p.stderr).lower()
    assert p.returncode != 0 and WEB_ALLOWED not in out, p


def test_report_shows_the_container_name(deployed: Lab) -> None:
    deployed.exec("nslookup", "named.other.test")

    def logged() -> list:
        with sqlite3.connect(f"file:{deployed.db}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT client, client_name, verdict FROM lookups WHERE qname = ?",
                                ("named.other.test",)).fetchall()
    rows = wait_until(logged, 10, what="the lookup in the log")
    client, name, verdict = rows[0]
    assert name == AGENT and verdict == "deny" and client.startswith("172.29.53.")
    summary = deployed.dnsguard("report", "--db", deployed.db).stdout
    assert AGENT in summary and "named.other.test" in summary
    tail = deployed.dnsguard("report", "--db", deployed.db, "tail", "-n", "50").stdout
    assert any(AGENT in ln and "named.other.test" in ln for ln in tail.splitlines()), tail
    data = json.loads(deployed.dnsguard("report", "--db", deployed.db, "--format", "json").stdout)
    assert data["client_names"][client] == AGENT


def test_doctor_passes_then_fails_without_the_fence_and_remove_restores_docker_rules(deployed: Lab) -> None:
    args = ["doctor", "--policy", str(deployed.policy), "--container", AGENT, "--db", deployed.db]
    p = deployed.dnsguard(*args, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "openclaw-gateway: fenced" in p.stdout
    data = json.loads(deployed.dnsguard(*args, "--format", "json", check=False).stdout)
    assert data["ok"] and {c["name"] for c in data["checks"]} >= {
        "policy", "dnsguard answering", "lookup log", "fence rules", "firewall sets", "agent's resolver",
        "denied name from the agent", "hard-coded address from the agent"}

    deployed.dnsguard("firewall", "remove")
    docker_only = deployed.save()
    assert "DNSGUARD" not in docker_only and "dnsguard" not in docker_only
    assert "-A DOCKER-USER -j RETURN" in docker_only.splitlines()
    p = deployed.dnsguard(*args, check=False)
    assert p.returncode == 1, p.stdout
    out = p.stdout
    assert "FAIL  fence rules: no dnsguard rules are applied" in out
    assert f"fix: `dnsguard firewall apply --policy {deployed.policy} --source {SUBNET}`" in out
    assert re.search(r"FAIL  hard-coded address from the agent: tcp 192\.0\.2\.1:443: timeout", out), out
    assert "PASS  agent's resolver" in out and "NOT fenced" in out

    # apply then remove: Docker's own rules exactly as they were
    deployed.dnsguard("firewall", "apply", "--policy", str(deployed.policy), "--source", SUBNET)
    assert deployed.save() != docker_only
    deployed.dnsguard("firewall", "remove")
    assert deployed.save() == docker_only


def test_native_user_fenced_doctor_and_report_show_the_user(deployed: Lab) -> None:
    """OpenClaw run natively as its own user: the user-mode fence, and the user's name in the log."""
    import pwd

    user = pwd.getpwuid(65534).pw_name  # nobody: an unprivileged user every system has
    deployed.dnsguard("firewall", "apply", "--policy", str(deployed.policy), "--user", user)
    try:
        args = ["doctor", "--policy", str(deployed.policy), "--user", user, "--db", deployed.db]
        p = deployed.dnsguard(*args, check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "redirected to dnsguard" in p.stdout
        assert "answered by dnsguard (logged from 127.255.255.254)" in p.stdout
        summary = deployed.dnsguard("report", "--db", deployed.db, "--client", "127.255.255.254").stdout
        assert f"user:{user}" in summary and "dnsguard-doctor.invalid" in summary
    finally:
        deployed.dnsguard("firewall", "remove")
    p = deployed.dnsguard(*args, check=False)
    assert p.returncode == 1 and "FAIL  agent's resolver" in p.stdout, p.stdout
