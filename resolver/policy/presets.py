"""Starter policies for ``dnsguard init``: the packaged default, and one for OpenClaw.

A preset is rendered to TOML text, parsed with the same parser ``serve`` uses (so what
``init`` writes always loads) and only then written -- atomically, and never over an
existing file unless asked to.

The OpenClaw preset lists what a typical install needs, in groups: model APIs, the
skill and package registries, GitHub, and one group per chat channel. Channels not
asked for are written commented out, so turning one on is deleting a ``#``. It starts
in audit mode: the operator reads ``dnsguard report`` before anything is blocked.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from resolver.core.errors import DnsguardError
from resolver.policy.config import PACKAGED_POLICY, Config, parse_config
from resolver.policy.history import write_atomic

PRESETS = ("default", "openclaw")
MODES = ("audit", "enforce")

# The network the compose override (deploy/compose/docker-compose.dnsguard.yml) gives
# openclaw-gateway and its sandboxes; dnsguard answers on its gateway address.
DOCKER_SUBNET = "172.29.53.0/24"


@dataclass(frozen=True)
class Group:
    title: str
    names: tuple[str, ...]
    channel: str | None = None  # a chat channel: written commented out unless enabled


OPENCLAW_GROUPS = (
    Group("Model APIs (keep the providers you use)",
          ("api.anthropic.com", "api.openai.com", "generativelanguage.googleapis.com", "openrouter.ai")),
    Group("Skill registry and npm (skills and plugins install from here)",
          ("clawhub.ai", "registry.npmjs.org")),
    Group("GitHub: site, API, raw files and release downloads",
          ("github.com", "api.github.com", "raw.githubusercontent.com", "objects.githubusercontent.com")),
    Group("Channel: Telegram", ("api.telegram.org",), "telegram"),
    Group("Channel: Discord", ("discord.com", "gateway.discord.gg", "cdn.discordapp.com"), "discord"),
    Group("Channel: Slack", ("slack.com", "api.slack.com", "hooks.slack.com", "wss-primary.slack.com"),
          "slack"),
    Group("Channel: WhatsApp", ("web.whatsapp.com", "*.web.whatsapp.com", "*.whatsapp.net"), "whatsapp"),
)
CHANNELS = tuple(g.channel for g in OPENCLAW_GROUPS if g.channel)


class PresetError(DnsguardError):
    """A preset cannot be rendered or written as asked."""


def _q(items: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def _set_mode(text: str, mode: str) -> str:
    new, n = re.subn(r'(?m)^mode = "(enforce|audit)"', f'mode = "{mode}"', text, count=1)
    if n != 1:  # pragma: no cover - the packaged file always has its mode line
        raise PresetError("the packaged default policy has no top-level mode line")
    return new


def render_default(mode: str) -> str:
    return _set_mode(PACKAGED_POLICY.read_text(encoding="utf-8"), mode)


def render_openclaw(mode: str = "audit", channels: Sequence[str] = (), *, native: bool = False,
                    docker_subnet: str = DOCKER_SUBNET) -> str:
    """The OpenClaw starter policy as commented TOML text."""
    unknown = sorted(set(channels) - set(CHANNELS))
    if unknown:
        raise PresetError(f"unknown channel {unknown[0]!r} (known: {', '.join(CHANNELS)})")
    try:
        net = ipaddress.ip_network(docker_subnet, strict=True)
    except ValueError as exc:
        raise PresetError(f"--docker-subnet {docker_subnet!r}: {exc}") from None
    if net.version != 4 or net.num_addresses < 4:
        raise PresetError(f"--docker-subnet {docker_subnet!r}: give an IPv4 subnet such as {DOCKER_SUBNET}")
    gateway = str(next(net.hosts()))
    listen = ["127.0.0.1:53"] + ([] if native else [f"{gateway}:53"])
    clients = ["127.0.0.0/8", "::1/128"] + ([] if native else [str(net)])

    out = [
        "# dnsguard policy for OpenClaw, written by `dnsguard init --preset openclaw`.",
        "# Everything not allowed below is answered NXDOMAIN by dnsguard itself (in enforce mode)",
        "# and never sent upstream. Check a name with:  dnsguard check api.anthropic.com",
        "#",
        "# The way in: run a while in audit mode, read `dnsguard report`, add what the agent",
        "# really needs (`dnsguard learn --diff` lists it), then set mode = \"enforce\".",
        "",
        "# \"audit\" answers everything and records what would have been denied.",
        f'mode = "{mode}"',
        "",
        "[server]",
    ]
    if native:
        out += [
            "# Native install (OpenClaw as its own user): `dnsguard firewall apply --user openclaw`",
            "# redirects that user's DNS here, whatever /etc/resolv.conf says.",
        ]
    else:
        out += [
            f"# 127.0.0.1 for this host; {gateway} is the gateway of the openclaw-fenced Docker network",
            "# (deploy/compose/docker-compose.dnsguard.yml), where openclaw-gateway and its sandboxes ask.",
            "# That address exists once Docker has created the network: dnsguard.service starts after",
            "# docker.service.",
        ]
    out += [
        f"listen = {_q(listen)}",
        "# Who may ask; anyone else gets REFUSED (never an open resolver).",
        f"clients = {_q(clients)}",
        "# Queries a second per client address (a container, or the fenced user's own source);",
        "# past it: REFUSED, and one log row per client and second, so a flooding skill can",
        "# neither starve the others nor fill the log. 0 = off.",
        "rate_limit = 500",
        "",
        "[upstream]",
        "# Leave `servers` out to use /etc/resolv.conf (dnsguard never forwards to itself).",
        '# servers = ["192.0.2.53:53"]',
        "timeout_ms = 2000",
        "",
        "[allow]",
        "domains = [",
    ]
    for group in OPENCLAW_GROUPS:
        on = group.channel is None or group.channel in channels
        hint = "" if on else "  (not enabled: remove the # to allow)"
        out.append(f"  # {group.title}{hint}")
        out += [f'  {"" if on else "# "}"{name}",' for name in group.names]
    out += [
        "]",
        "# Static destinations the fence always lets through (any port). Empty by default.",
        "cidrs = []",
        "",
        "[deny]",
        "domains = []",
        "",
        "[log]",
        "enabled = true",
        "# The systemd unit passes --db /var/lib/dnsguard/dnsguard.db (its StateDirectory).",
        'database = "dnsguard.db"',
        "retention_days = 30",
        "",
        "[firewall]",
        "# Feed addresses from allowed answers into the kernel sets the fence matches on",
        "# (`dnsguard firewall apply`, run at boot by dnsguard-fence.service).",
        "enabled = true",
        "min_ttl = 30",
        "max_ttl = 86400",
        '# OpenClaw talks HTTPS (and WebSocket over HTTPS) to all of the above.',
        'ports = ["tcp/443", "tcp/80", "udp/443"]',
        "",
        "[docker]",
        "# Container names in the log and every report come from Docker's API on this socket",
        "# (read off the DNS path, kept current from Docker's events). \"\" = addresses only.",
        'socket = "/var/run/docker.sock"',
        "",
    ]
    return "\n".join(out)


def render(preset: str, mode: str | None = None, channels: Sequence[str] = (), *, native: bool = False,
           docker_subnet: str = DOCKER_SUBNET) -> str:
    """A preset's policy text; validated, so it always loads."""
    if preset not in PRESETS:
        raise PresetError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    if mode is not None and mode not in MODES:
        raise PresetError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    if preset == "default":
        if channels or native or docker_subnet != DOCKER_SUBNET:
            raise PresetError("--channel, --native and --docker-subnet go with --preset openclaw")
        text = render_default(mode or "enforce")
    else:
        text = render_openclaw(mode or "audit", channels, native=native, docker_subnet=docker_subnet)
    validate(text, f"<preset {preset}>")
    return text


def validate(text: str, where: str) -> Config:
    return parse_config(text, where)


def write_new(path: str | Path, text: str, *, force: bool = False, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` atomically; refuse to replace an existing file unless ``force``."""
    p = Path(path)
    if p.exists() and not force:
        raise PresetError(f"{p} exists: not overwriting it (use --force to replace it)")
    if p.is_dir():
        raise PresetError(f"{p} is a directory")
    if not p.parent.is_dir():
        raise PresetError(f"{p.parent} does not exist")
    try:
        write_atomic(os.fspath(p), text.encode(), mode=mode)
    except OSError as exc:
        raise PresetError(f"cannot write {p}: {exc}") from None


# ------------------------------------------------------------------ deployment files

# Paths the shipped files use, replaced by the real ones when written out.
UNIT_DNSGUARD = "/usr/local/bin/dnsguard"
UNIT_POLICY = "/etc/dnsguard/policy.toml"
UNIT_FENCE_ENV = "/etc/dnsguard/fence.env"
SYSTEMD_FILES = ("dnsguard.service", "dnsguard-fence.service")
DOCKER_DROPINS = ("dnsguard.service.d/docker.conf", "dnsguard-fence.service.d/docker.conf")
COMPOSE_FILES = ("docker-compose.dnsguard.yml",)


def shipped(relpath: str) -> str:
    """The text of one file under ``resolver/deploy`` (the repository's ``deploy/``): package
    data of ``resolver``, so the installed copy and the repository's are the same bytes."""
    from importlib.resources import files

    node = files("resolver").joinpath("deploy")
    for part in relpath.split("/"):
        node = node.joinpath(part)
    return node.read_text(encoding="utf-8")


def fence_args(*, native: bool, user: str = "openclaw", docker_subnet: str = DOCKER_SUBNET,
               audit: bool = True) -> str:
    who = f"--user {user}" if native else f"--source {docker_subnet}"
    return who + (" --audit" if audit else "")


def systemd_files(*, policy_path: str, fence_env_path: str, dnsguard: str | None,
                  native: bool) -> dict[str, str]:
    """relative path -> text of the units (and the Docker drop-ins unless ``native``)."""
    out = {}
    for rel in SYSTEMD_FILES + (() if native else DOCKER_DROPINS):
        text = shipped(f"systemd/{rel}")
        if dnsguard:
            text = text.replace(UNIT_DNSGUARD, dnsguard)
        out[rel] = text.replace(UNIT_POLICY, policy_path).replace(UNIT_FENCE_ENV, fence_env_path)
    return out


def compose_files(docker_subnet: str = DOCKER_SUBNET) -> dict[str, str]:
    net = ipaddress.ip_network(docker_subnet)
    gateway = str(next(net.hosts()))
    out = {}
    for rel in COMPOSE_FILES:
        text = shipped(f"compose/{rel}")
        out[rel] = text.replace("172.29.53.0/24", str(net)).replace("172.29.53.1", gateway)
    out["openclaw-sandbox-dns.json5"] = shipped("openclaw/sandbox-dns.json5").replace("172.29.53.1", gateway)
    return out


@dataclass
class InitResult:
    written: list[str]
    next_steps: list[str]


def init(*, output: str | None, preset: str = "default", mode: str | None = None,
         channels: Sequence[str] = (), native: bool = False, docker_subnet: str = DOCKER_SUBNET,
         user: str = "openclaw", systemd_dir: str | None = None, compose_dir: str | None = None,
         dnsguard: str | None = None, force: bool = False) -> tuple[str, InitResult]:
    """Render a preset and write it (and, if asked, the deployment files). Returns the policy text.

    Everything is rendered and checked before the first file is written, so a refusal
    (a file exists, a directory is missing) leaves nothing half-written.
    """
    text = render(preset, mode, channels, native=native, docker_subnet=docker_subnet)
    files: dict[Path, tuple[str, int]] = {}
    policy_abs = os.path.abspath(output) if output else UNIT_POLICY
    if output:
        files[Path(output)] = (text, 0o644)
    steps = []
    if systemd_dir is not None:
        fence_env = os.path.join(os.path.dirname(policy_abs), "fence.env")
        audit = validate(text, "<preset>").mode == "audit"
        for rel, body in systemd_files(policy_path=policy_abs, fence_env_path=fence_env, dnsguard=dnsguard,
                                       native=native).items():
            files[Path(systemd_dir) / rel] = (body, 0o644)
        env = shipped("systemd/fence.env")
        env = re.sub(r"(?m)^FENCE_ARGS=.*$", "FENCE_ARGS=" + fence_args(
            native=native, user=user, docker_subnet=docker_subnet, audit=audit), env)
        files[Path(fence_env)] = (env, 0o644)
        steps.append("systemctl daemon-reload && "
                     "systemctl enable --now dnsguard-fence.service dnsguard.service")
    if compose_dir is not None:
        for rel, body in compose_files(docker_subnet).items():
            files[Path(compose_dir) / rel] = (body, 0o644)
        steps.append("docker compose -f docker-compose.yml -f docker-compose.dnsguard.yml up -d")
    for path in files:
        if path.exists() and not force:
            raise PresetError(f"{path} exists: not overwriting it (use --force to replace it)")
        parent = path.parent
        if not parent.is_dir() and not (path.name.endswith(".conf") and parent.parent.is_dir()):
            raise PresetError(f"{parent} does not exist")
    written = []
    for path, (body, perm) in files.items():
        if path.name.endswith(".conf"):  # a drop-in: its <unit>.d directory is ours to make
            path.parent.mkdir(exist_ok=True)
        write_new(path, body, force=force, mode=perm)
        written.append(str(path))
    return text, InitResult(written, steps)
