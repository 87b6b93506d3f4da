"""`dnsguard init`: starter policies that load, deployment files that systemd accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from resolver.policy import presets
from resolver.policy.config import load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def dnsguard(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "resolver", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env, check=False)


def test_openclaw_preset_groups_channels_and_audit():
    text = presets.render("openclaw", channels=["telegram", "slack"])
    cfg = parse_config(text)
    assert cfg.mode == "audit"
    for name in ("api.anthropic.com", "openrouter.ai", "clawhub.ai", "registry.npmjs.org",
                 "raw.githubusercontent.com", "api.telegram.org", "hooks.slack.com", "wss-primary.slack.com"):
        assert name in cfg.allow_domains, name
    for name in ("discord.com", "gateway.discord.gg", "web.whatsapp.com", "*.whatsapp.net"):
        assert name not in cfg.allow_domains
        assert f'# "{name}",' in text  # there, commented out: one `#` away
    for title in ("# Model APIs", "# Skill registry", "# GitHub", "# Channel: Telegram",
                  "# Channel: Discord"):
        assert title in text
    # What a container deployment needs: the fenced network's gateway and subnet.
    assert ("172.29.53.1", 53) in cfg.server.listen
    assert any(str(n) == "172.29.53.0/24" for n in cfg.server.clients)
    assert cfg.firewall.enabled and cfg.docker.socket == "/var/run/docker.sock"


def test_presets_modes_and_native():
    assert parse_config(presets.render("openclaw", "enforce")).mode == "enforce"
    native = parse_config(presets.render("openclaw", native=True))
    assert native.server.rate_limit == 500
    assert parse_config(presets.render("openclaw")).server.rate_limit == 500
    assert native.server.listen == (("127.0.0.1", 53),)
    assert parse_config(presets.render("default", "audit")).mode == "audit"
    assert parse_config(presets.render("default")).mode == "enforce"
    with pytest.raises(presets.PresetError, match="unknown channel 'irc'"):
        presets.render("openclaw", channels=["irc"])
    with pytest.raises(presets.PresetError, match="docker-subnet"):
        presets.render("openclaw", docker_subnet="2001:db8::/64")
    sub = parse_config(presets.render("openclaw", docker_subnet="10.99.0.0/16"))
    assert ("10.99.0.1", 53) in sub.server.listen


def test_init_writes_checked_policy_and_never_overwrites(tmp_path):
    out = tmp_path / "policy.toml"
    r = dnsguard("init", "--preset", "openclaw", "--channel", "discord", "-o", str(out))
    assert r.returncode == 0, r.stderr
    cfg = load_config(out)
    assert cfg.mode == "audit" and "gateway.discord.gg" in cfg.allow_domains
    out.write_text("# mine\n")
    r = dnsguard("init", "-o", str(out))
    assert r.returncode == 1 and "exists" in r.stderr and "--force" in r.stderr
    assert out.read_text() == "# mine\n"
    assert dnsguard("init", "--mode", "audit", "-o", str(out), "--force").returncode == 0
    assert load_config(out).mode == "audit"
    r = dnsguard("init", "--preset", "openclaw", "-o", "-")
    assert r.returncode == 0 and parse_config(r.stdout).mode == "audit"
    r = dnsguard("init", "--channel", "slack", "-o", str(tmp_path / "x.toml"))
    assert r.returncode == 1 and "--preset openclaw" in r.stderr and not (tmp_path / "x.toml").exists()


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: run scripts/install-test-deps"
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize("native", [False, True])
def test_init_systemd_units_verify(tmp_path, native):
    etc, unit_dir, compose = tmp_path / "etc", tmp_path / "system", tmp_path / "compose"
    for d in (etc, unit_dir, compose):
        d.mkdir()
    args = ["init", "--preset", "openclaw", "-o", str(etc / "policy.toml"), "--systemd", str(unit_dir),
            "--compose", str(compose)]
    r = dnsguard(*args, *(["--native"] if native else []))
    assert r.returncode == 0, r.stderr
    main, fence = unit_dir / "dnsguard.service", unit_dir / "dnsguard-fence.service"
    # systemd-analyze prints a warning (and still exits 0) for any key it does not know:
    # the units must produce no output at all.
    v = _verify(main, fence)
    assert v.returncode == 0 and v.stdout == "" and v.stderr == "", v.stdout + v.stderr
    text = main.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text and "DynamicUser=yes" in text
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN\n" in text
    assert f"--policy {etc / 'policy.toml'}" in text and "StateDirectory=dnsguard" in text
    ftext = fence.read_text()
    assert "Before=network-pre.target docker.service openclaw-gateway.service" in ftext
    assert "RequiredBy=docker.service openclaw-gateway.service" in ftext
    assert f"EnvironmentFile={etc / 'fence.env'}" in ftext
    # Changing the fence is a reload (apply again, with fence.env read again): a restart or a stop
    # of this unit would take docker.service and the gateway with it (RequiredBy=).
    start = next(ln for ln in ftext.splitlines() if ln.startswith("ExecStart="))
    assert f"ExecReload={start.removeprefix('ExecStart=')}\n" in ftext and " firewall apply " in start
    env = (etc / "fence.env").read_text()
    who = "--user openclaw" if native else "--source 172.29.53.0/24"
    assert f"FENCE_ARGS={who} --audit" in env
    assert (unit_dir / "dnsguard.service.d" / "docker.conf").exists() is not native
    # The compose override points openclaw-gateway at dnsguard on the fenced network's gateway.
    override = yaml.safe_load((compose / "docker-compose.dnsguard.yml").read_text())
    assert override["services"]["openclaw-gateway"]["dns"] == ["172.29.53.1"]
    net = override["networks"]["default"]
    assert net["name"] == "openclaw-fenced"
    assert net["ipam"]["config"][0] == {"subnet": "172.29.53.0/24", "gateway": "172.29.53.1"}
    assert '"172.29.53.1"' in (compose / "openclaw-sandbox-dns.json5").read_text()
    # Nothing is overwritten on a second run: the refusal comes before any write.
    before = main.read_text()
    r = dnsguard(*args, "-o", str(etc / "other.toml"))
    assert r.returncode == 1 and "exists" in r.stderr and not (etc / "other.toml").exists()
    assert main.read_text() == before


def test_verify_catches_a_broken_unit(tmp_path):
    bad = tmp_path / "bad.service"
    bad.write_text(presets.shipped("systemd/dnsguard.service").replace("Type=notify", "Type=notify\nTypo=1"))
    assert "Unknown key" in _verify(bad).stderr


def test_deploy_dir_is_the_packaged_one_and_ships_in_the_wheel(tmp_path):
    assert (REPO / "deploy").resolve() == (REPO / "resolver" / "deploy").resolve()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "resolver", src / "resolver", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "w"),
                        str(src)], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "w").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "resolver" / "deploy").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert shipped and shipped <= names, shipped - names


def test_readme_never_restarts_or_stops_the_fence_unit():
    """RequiredBy=docker.service: restarting or stopping dnsguard-fence restarts or stops Docker."""
    text = (REPO / "README.md").read_text()
    for verb in ("restart", "stop", "try-restart", "reload-or-restart"):
        assert f"systemctl {verb} dnsguard-fence" not in text, verb
    assert "systemctl reload dnsguard-fence" in text and "dnsguard firewall remove" in text
