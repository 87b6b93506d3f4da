"""`dnsguard doctor`: a thin wrapper over resolver.doctor."""

from __future__ import annotations

import json
import sys

import click

from resolver.cli.common import run_command


@click.command("doctor")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
              help="Policy file serve runs with (default: ./policy.toml, else the packaged default).")
@click.option("--container", metavar="NAME", help="The agent's Docker container (checks run inside it).")
@click.option("--user", metavar="NAME", help="The agent's local user (checks run as that user).")
@click.option("--db", metavar="PATH", help="Lookup log serve writes (default: the policy's [log] database).")
@click.option("--docker-socket", metavar="PATH",
              help="Docker API socket (default: the policy's [docker] socket).")
@click.option("--netns", metavar="NAME",
              help="Check inside this network namespace (as listed by `ip netns`).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def doctor(policy_path: str | None, container: str | None, user: str | None, db: str | None,
           docker_socket: str | None, netns: str | None, fmt: str) -> None:
    """Say whether the agent is really fenced: each check passes or fails, with the fix.

    dnsguard answering, policy valid, log writable, fence rules applied and matching,
    sets fed, the agent's resolver is dnsguard, and from the agent's side: a denied
    name gets NXDOMAIN and a connection to 192.0.2.1 is refused. Exit 0 = all pass.

    Example:

        sudo dnsguard doctor --policy /etc/dnsguard/policy.toml --container openclaw-gateway \\
            --db /var/lib/dnsguard/dnsguard.db
    """
    from resolver.doctor import diagnose
    from resolver.policy.config import default_policy_path

    result: list = []

    def body() -> None:
        if container and user:
            raise click.UsageError("give --container or --user, not both")
        result.append(diagnose(policy_path or str(default_policy_path()), container=container, user=user,
                               db=db, docker_socket=docker_socket, netns=netns))

    run_command(body)
    diag = result[0]
    if fmt == "json":
        click.echo(json.dumps(diag.as_json(), indent=2))
    else:
        click.echo(diag.describe(), nl=False)
    sys.exit(0 if diag.ok else 1)
