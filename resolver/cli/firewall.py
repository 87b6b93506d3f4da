"""`dnsguard firewall ...`: thin click wrappers over resolver.firewall."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from resolver.core.errors import DnsguardError


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _config(policy_path: str | None, listen: tuple[str, ...]) -> Any:
    from dataclasses import replace

    from resolver.policy.config import default_policy_path, load_config, parse_hostport

    cfg = load_config(policy_path or str(default_policy_path()))
    if listen:
        try:
            hps = tuple(parse_hostport(v, 53) for v in listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from None
        cfg = cfg.replace(server=replace(cfg.server, listen=hps))
    return cfg


def _spec(cfg: Any, source: tuple[str, ...], interface: tuple[str, ...], user: str | None, audit: bool,
          ports: str | None, nflog_group: int, loopback: bool) -> Any:
    from resolver.fence.firewall import parse_ports, spec_from_config

    if user and (source or interface):
        raise click.UsageError("use either --user (this host's processes) or --source/--interface "
                               "(forwarded traffic), not both")
    if not user and not source and not interface:
        raise click.UsageError("say who to fence: --source CIDR (containers/VMs) or --user NAME")
    extra: dict[str, Any] = {"nflog_group": nflog_group, "loopback": loopback}
    if ports is not None:
        extra["ports"] = parse_ports(ports.split(","))
    return spec_from_config(cfg, sources=source, interfaces=interface, user=user, audit=audit, **extra)


def _common(f: Callable) -> Callable:
    f = click.option("--netns", metavar="NAME",
                     help="Operate inside this network namespace (as listed by `ip netns`).")(f)
    return f


def _who(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--source", "-s", multiple=True, metavar="CIDR",
                     help="Fence traffic forwarded from this subnet (container mode); repeatable."),
        click.option("--interface", "-i", multiple=True, metavar="IFACE",
                     help="Fence traffic forwarded from this interface (container mode); repeatable."),
        click.option("--user", "-u", metavar="NAME",
                     help="Fence this host user's own traffic and redirect its DNS (user mode)."),
        click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
                     help="Policy file for listen address, [allow] cidrs and [firewall] ports "
                          "(default: ./policy.toml, else the packaged default)."),
        click.option("--listen", multiple=True, metavar="HOST:PORT",
                     help="dnsguard's listen address, if not the policy's [server] listen."),
        click.option("--ports", metavar="LIST", help='Override [firewall] ports, e.g. "tcp/443,udp/443" '
                     'or "any".'),
        click.option("--audit", is_flag=True, help="Log would-be blocks but let everything through."),
        click.option("--nflog-group", type=click.IntRange(0, 65535), default=53, show_default=True,
                     help="NFLOG group that `serve --firewall` records blocked attempts from."),
        click.option("--loopback/--no-loopback", default=True, show_default=True,
                     help="User mode: let the user reach services on this host's loopback."),
    ]):
        f = opt(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def firewall() -> None:
    """Fence an agent so it can only reach what dnsguard resolved for it.

    Rules go into their own chains (DNSGUARD, DNSGUARD-OUT, DNSGUARD-REJECT)
    with one jump rule, for iptables and ip6tables; destinations are allowed
    through the kernel sets dnsguard4/dnsguard6, which `dnsguard serve
    --firewall` fills from allowed answers (entries expire with the TTL).

    Examples:

        dnsguard firewall apply --source 172.17.0.0/16   # Docker containers

        dnsguard firewall apply --user agent              # one local user

        dnsguard firewall status && dnsguard firewall remove
    """


@firewall.command()
@_who
@_common
@click.option("--dry-run", is_flag=True, help="Print what would be run, change nothing.")
def apply(source: tuple[str, ...], interface: tuple[str, ...], user: str | None, policy_path: str | None,
          listen: tuple[str, ...], ports: str | None, audit: bool, nflog_group: int, loopback: bool,
          netns: str | None, dry_run: bool) -> None:
    """Install (or replace) the fence. Idempotent; atomic per address family.

    Container mode (--source/--interface) filters forwarded traffic, from
    DOCKER-USER if that chain exists, else FORWARD. User mode (--user)
    filters the user's own traffic in OUTPUT and redirects its DNS (port 53,
    any server) to dnsguard, so resolv.conf need not change.

    Example:

        dnsguard firewall apply --source 172.17.0.0/16 --policy policy.toml --dry-run
    """
    from resolver.fence import firewall as fw

    try:
        cfg = _config(policy_path, listen)
        spec = _spec(cfg, source, interface, user, audit, ports, nflog_group, loopback)
        runner = fw.Runner(netns)
        plan = fw.plan_apply(spec, fw.current(runner), cfg.server.clients)
        if dry_run:
            click.echo(plan.describe(), nl=False)
            return
        fw.execute(plan, runner, (spec.set4, spec.set6))
    except DnsguardError as exc:
        raise _fail(exc) from None
    who = f"user {user}" if user else ", ".join([*source, *interface])
    click.echo(f"dnsguard firewall: fence applied for {who}{' (AUDIT: nothing blocked)' if audit else ''}")
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)


@firewall.command()
@_common
@click.option("--keep-sets", is_flag=True, help="Leave the dnsguard4/dnsguard6 sets in place.")
@click.option("--dry-run", is_flag=True, help="Print what would be run, change nothing.")
def remove(netns: str | None, keep_sets: bool, dry_run: bool) -> None:
    """Remove every dnsguard rule and chain (and the sets), leaving the rest as it was.

    Example:

        dnsguard firewall remove
    """
    from resolver.fence import firewall as fw

    try:
        runner = fw.Runner(netns)
        if dry_run:
            click.echo(fw.plan_remove(fw.current(runner), destroy_sets=not keep_sets).describe(), nl=False)
            return
        plan = fw.remove(runner, destroy_sets=not keep_sets)
    except DnsguardError as exc:
        raise _fail(exc) from None
    click.echo("dnsguard firewall: removed" if plan.steps else "dnsguard firewall: nothing to remove")
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)


@firewall.command()
@_who
@_common
def status(source: tuple[str, ...], interface: tuple[str, ...], user: str | None, policy_path: str | None,
           listen: tuple[str, ...], ports: str | None, audit: bool, nflog_group: int, loopback: bool,
           netns: str | None) -> None:
    """Say whether rules, sets and the resolver are in place and consistent.

    Exit 0 when they are, 1 otherwise. Pass the same who-options as to
    `apply` to also check the rules match the current policy.

    Example:

        dnsguard firewall status --source 172.17.0.0/16
    """
    from resolver.fence import firewall as fw

    try:
        cfg = _config(policy_path, listen)
        spec = _spec(cfg, source, interface, user, audit, ports, nflog_group, loopback) \
            if (user or source or interface) else None
        st = fw.status(fw.Runner(netns), cfg.listen, spec,
                       record_connections=cfg.firewall.record_connections)
    except DnsguardError as exc:
        raise _fail(exc) from None
    click.echo(st.describe(), nl=False)
    sys.exit(0 if st.ok else 1)


@firewall.command()
@_who
@click.option("--family", type=click.Choice(["4", "6", "both"]), default="both", show_default=True)
@click.option("--docker-user", is_flag=True, help="Container mode: show the rules as if DOCKER-USER existed.")
def show(source: tuple[str, ...], interface: tuple[str, ...], user: str | None, policy_path: str | None,
         listen: tuple[str, ...], ports: str | None, audit: bool, nflog_group: int, loopback: bool,
         family: str, docker_user: bool) -> None:
    """Print the rules `apply` would install (iptables-restore format). Touches nothing.

    Example:

        dnsguard firewall show --user agent --family 4
    """
    from resolver.fence import firewall as fw

    try:
        cfg = _config(policy_path, listen)
        spec = _spec(cfg, source, interface, user, audit, ports, nflog_group, loopback)
    except DnsguardError as exc:
        raise _fail(exc) from None
    for fam in (4, 6):
        if family in (str(fam), "both"):
            click.echo(f"# {fw.TOOLS[fam][2]} --noflush")
            click.echo(fw.render(fw.fence_rules(spec, fam, docker_user=docker_user)), nl=False)
    for note in fw.notes(spec, cfg.server.clients):
        click.echo(f"# note: {note}")


if __name__ == "__main__":  # pragma: no cover - `python -m resolver.cli.firewall`
    firewall(prog_name="dnsguard firewall")
