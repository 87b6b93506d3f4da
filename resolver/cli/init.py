"""`dnsguard init`: a thin wrapper over resolver.policy.presets."""

from __future__ import annotations

import shutil

import click

from resolver.cli.common import run_command
from resolver.policy import presets


@click.command("init")
@click.option("--preset", type=click.Choice(presets.PRESETS), default="default", show_default=True,
              help="default: a generic agent; openclaw: OpenClaw's model APIs, registries, GitHub, channels")
@click.option("--mode", type=click.Choice(presets.MODES),
              help="start in this mode (default: enforce for default, audit for openclaw)")
@click.option("--output", "-o", metavar="FILE", default="policy.toml", show_default=True,
              help='write the policy here ("-" = stdout); never over an existing file without --force')
@click.option("--channel", "channels", multiple=True, type=click.Choice(presets.CHANNELS),
              help="openclaw: allow this chat channel's hosts (the others stay commented out); repeatable")
@click.option("--native", is_flag=True,
              help="openclaw: OpenClaw runs natively as its own user, not in Docker")
@click.option("--user", default="openclaw", show_default=True, metavar="NAME",
              help="--native: the agent's user, for the fence (fence.env)")
@click.option("--docker-subnet", default=presets.DOCKER_SUBNET, show_default=True, metavar="CIDR",
              help="openclaw: the subnet the compose override gives OpenClaw's network")
@click.option("--systemd", "systemd_dir", metavar="DIR", type=click.Path(file_okay=False),
              help="also write dnsguard.service and dnsguard-fence.service (and Docker drop-ins) here, "
                   "and fence.env beside the policy")
@click.option("--compose", "compose_dir", metavar="DIR", type=click.Path(file_okay=False),
              help="also write the compose override for OpenClaw and its sandbox DNS setting here")
@click.option("--force", is_flag=True, help="replace files that exist")
def init(preset: str, mode: str | None, output: str, channels: tuple[str, ...], native: bool, user: str,
         docker_subnet: str, systemd_dir: str | None, compose_dir: str | None, force: bool) -> None:
    """Write a commented starter policy (checked before it is written).

    With --systemd and --compose, also the units and the compose override, pointing
    at the policy written and at this dnsguard.

    Example:

        dnsguard init --preset openclaw --channel telegram -o /etc/dnsguard/policy.toml \\
            --systemd /etc/systemd/system --compose /opt/openclaw
    """
    def body() -> None:
        to_stdout = output == "-"
        if to_stdout and systemd_dir:
            raise click.UsageError("--systemd needs the policy in a file (-o PATH), for the units to load it")
        text, result = presets.init(
            output=None if to_stdout else output, preset=preset, mode=mode, channels=channels, native=native,
            docker_subnet=docker_subnet, user=user, systemd_dir=systemd_dir, compose_dir=compose_dir,
            dnsguard=shutil.which("dnsguard"), force=force)
        if to_stdout:
            click.echo(text, nl=False)
        for path in result.written:
            click.echo(f"wrote {path}", err=True)
        for step in result.next_steps:
            click.echo(f"next: {step}", err=True)

    run_command(body)
