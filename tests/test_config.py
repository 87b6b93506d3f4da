"""policy.toml loading: typed settings, and errors that point at the line and entry."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from resolver.core.errors import PolicyError
from resolver.core.names import text_to_wire
from resolver.policy.config import PACKAGED_POLICY, load_config, parse_config, parse_hostport

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_policy_loads_and_is_the_packaged_one():
    cfg = load_config(ROOT / "policy.toml")
    assert cfg.mode == "enforce"
    assert cfg.server.listen == (("127.0.0.1", 5353),)
    assert cfg.matcher.decide(text_to_wire("pypi.org")).allowed
    assert not cfg.matcher.decide(text_to_wire("evil.example")).allowed
    assert (ROOT / "policy.toml").read_bytes() == PACKAGED_POLICY.read_bytes()


def test_settings_are_typed():
    cfg = parse_config("""
mode = "audit"
[server]
listen = ["127.0.0.1:5353", "[::1]:53"]
clients = ["10.0.0.0/8"]
tcp_idle_timeout_ms = 500
[upstream]
servers = ["192.0.2.53", "198.51.100.1:5300"]
timeout_ms = 750
[allow]
domains = ["a.example"]
cidrs = ["203.0.113.0/24"]
[firewall]
ports = "any"
connection_refresh_s = 1.5
record_connections = false
[report]
upload_warn_mb = 2.5
""")
    assert cfg.mode == "audit"
    assert cfg.server.listen == (("127.0.0.1", 5353), ("::1", 53))
    assert cfg.server.tcp_idle_timeout == 0.5
    assert cfg.upstream.servers == (("192.0.2.53", 53), ("198.51.100.1", 5300))
    assert cfg.upstream.timeout == 0.75
    assert str(cfg.allow_cidrs[0]) == "203.0.113.0/24"
    assert cfg.firewall.ports is None
    assert (cfg.firewall.connection_refresh, cfg.firewall.record_connections) == (1.5, False)
    assert cfg.report.upload_warn_mb == 2.5
    defaults = parse_config("")
    assert (defaults.firewall.connection_refresh, defaults.firewall.record_connections) == (30.0, True)
    assert defaults.report.upload_warn_mb == 10.0


def test_upstream_defaults_to_resolv_conf_without_itself(tmp_path, monkeypatch):
    cfg = parse_config("[allow]\ndomains = []\n")
    assert cfg.upstream.from_resolv_conf
    assert ("127.0.0.1", 5353) not in cfg.upstream.servers


@pytest.mark.parametrize(("text", "line", "needle"), [
    ('mode = "enforce"\n[allow]\ndomains = [\n  "ok.example",\n  "exa mple.com",\n]\n', 5, "exa mple.com"),
    ('[allow]\ndomains = ["*."]\n', 2, "*."),
    ('[allow]\ndomains = ["**.x"]\n', 2, "**.x"),
    ('[deny]\ndomains = ["*.com"]\n', 2, "*.com"),
    ('[allow]\ndomains = ["*"]\n', 2, "'*'"),
    ('[allow]\ndomainz = ["x.example"]\n', 2, "allow.domainz"),
    ('mode = "enforce"\nsurprise = 1\n', 2, "surprise"),
    ('mode = "block"\n', 1, "block"),
    ('[server]\nlisten = ["localhost:53"]\n', 2, "localhost:53"),
    ('[server]\nclients = ["10.0.0.0/33"]\n', 2, "10.0.0.0/33"),
    ('[upstream]\ntimeout_ms = "fast"\n', 2, "timeout_ms"),
    ('[allow]\ndomains = [\n"a.example",\n', 3, "invalid TOML"),
    ('[log]\nenabled = 1\n', 2, "log.enabled"),
    ('[firewall]\nconnection_refresh_s = 61\n', 2, "at most 60"),
    ('[firewall]\nconnection_refresh_s = 0\n', 2, "connection_refresh_s"),
    ('[report]\nupload_warn_mb = -1\n', 2, "upload_warn_mb"),
    ('[report]\nupload_warn = 5\n', 2, "report.upload_warn"),
    ('[[clients]]\nname = "x"\nsources = ["192.0.2.0/24"]\nallow = ["bad name"]\n', 4, "bad name"),
])
def test_errors_name_file_line_and_entry(tmp_path, text, line, needle):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}:"), msg
    assert needle in msg


def test_missing_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_config(tmp_path / "nope.toml")


def test_clients_add_to_top_level_rules():
    cfg = parse_config("""
[allow]
domains = ["pypi.org"]
[deny]
domains = ["bad.example"]
[[clients]]
name = "openclaw"
sources = ["192.0.2.5/32"]
mode = "audit"
allow = ["api.anthropic.com", "bad.example"]
""")
    (client,) = cfg.clients
    assert client.mode == "audit"
    assert client.matcher.decide(text_to_wire("api.anthropic.com")).allowed
    assert client.matcher.decide(text_to_wire("pypi.org")).allowed
    assert not client.matcher.decide(text_to_wire("bad.example")).allowed  # deny still wins
    assert not cfg.matcher.decide(text_to_wire("api.anthropic.com")).allowed


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:5353", ("127.0.0.1", 5353)), ("[::1]:53", ("::1", 53)), ("::1", ("::1", 53)),
    ("192.0.2.1", ("192.0.2.1", 53)),
])
def test_parse_hostport(text, expected):
    assert parse_hostport(text) == expected


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "resolver", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def test_check_command_exit_codes(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text('[allow]\ndomains = ["*.example.com"]\n[deny]\ndomains = ["bad.example.com"]\n')
    ok = run_cli("check", "www.example.com", "--policy", str(policy))
    assert ok.returncode == 0 and "allowed" in ok.stdout and "*.example.com" in ok.stdout
    denied = run_cli("check", "bad.example.com", "--policy", str(policy))
    assert denied.returncode == 1 and "bad.example.com" in denied.stdout and "deny rule" in denied.stdout
    default = run_cli("check", "example.com", "--policy", str(policy))
    assert default.returncode == 1 and "default" in default.stdout
    valid = run_cli("check", "--policy", str(policy))
    assert valid.returncode == 0 and "ok" in valid.stdout
    policy.write_text('[allow]\ndomains = ["exa mple.com"]\n')
    broken = run_cli("check", "--policy", str(policy))
    assert broken.returncode == 2 and f"{policy}:2" in broken.stderr and "exa mple.com" in broken.stderr


def test_every_command_has_help():
    from click.testing import CliRunner

    from resolver.cli import main

    runner = CliRunner()
    for name, cmd in main.commands.items():
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert cmd.help and "Example" in cmd.help, f"{name} has no help with an example"


# ------------------------------------------------------------ big lists: the fast TOML path
_BIG = ",\n".join(f'"h{i}.svc{i % 97}.example.com"' for i in range(6000))


@pytest.mark.parametrize("body", [
    _BIG, _BIG + ",", _BIG + "\n# a comment\n", _BIG.replace('",\n"h5.', '" "h5.'),
    _BIG.replace("h7.", "h 7."), _BIG.replace("h8.", "h]8."), _BIG.replace("h9.", "h\\\\9."),
    _BIG.replace('"h11.', "'h11.").replace('com",\n"h12', "com',\n\"h12"), _BIG + ", 5",
], ids=["plain", "trailing-comma", "comment", "missing-comma", "space", "bracket", "escape",
        "literal-string", "other-type"])
def test_fast_toml_path_gives_what_tomllib_gives(body):
    from resolver.policy import tomlfast

    text = f'mode = "audit"\n[allow]\ndomains = [\n{body}\n]\n[deny]\ndomains = ["x.test"]\n'
    try:
        expected = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        with pytest.raises(tomllib.TOMLDecodeError) as info:
            tomlfast.loads(text)
        assert str(info.value) == str(exc)  # the real text's line numbers
        return
    assert tomlfast.loads(text) == expected
