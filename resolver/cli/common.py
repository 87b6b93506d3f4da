"""What every command group of the CLI shares: the default database and error handling."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable

import click

from resolver.core.errors import DnsguardError

DEFAULT_DB = "dnsguard.db"


def run_command(fn: Callable[[], None]) -> None:
    """Run a command body; our errors become one clean line (exit 1), never a traceback."""
    try:
        fn()
    except DnsguardError as exc:
        raise click.ClickException(str(exc)) from None
    except sqlite3.Error as exc:
        raise click.ClickException(f"database error: {exc}") from None
    except BrokenPipeError:
        # `dnsguard report tail | head`: the reader left, which is not an error.
        sys.stderr.close()
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
