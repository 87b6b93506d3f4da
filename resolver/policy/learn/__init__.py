"""`dnsguard learn`: turn what an agent looked up into a reviewed, commented policy.

Run the agent against ``dnsguard serve --mode audit --db log.db`` for a while, then
``dnsguard learn --db log.db --output policy.toml``. The steps, one module each
(``collect``, ``collapse``, ``render``; their public names are re-exported here):

1. :func:`read_log` -- one pass over the lookup log's window, grouped per name and
   client, plus the firewall's ``connections`` table (issue #5) when it exists.
2. :func:`plan` -- decide, per policy section (top-level ``[allow]`` or one
   ``[[clients]]`` entry), what to add and what to leave out, and why:

   * a name is *learned* when upstream answered it: rcode NOERROR with addresses or
     a CNAME (for A/AAAA/CNAME questions; other types cannot show their data in the
     log, so NOERROR is enough), with verdict allow or deny-in-audit-mode. Denials in
     enforce mode were answered locally and prove nothing about the name.
   * names upstream only ever answered NXDOMAIN (typos, search-domain expansions
     such as ``pypi.org.lan``), names with no usable answer (SERVFAIL, NODATA),
     names only ever denied in enforce mode, and names an explicit deny rule covers
     are left out and listed in comments;
   * exfiltration-shaped names (:mod:`resolver.policy.suspicious`, judged over *every* name
     looked up, whatever the answer -- a query leaks even when it fails) are never
     allowed: they are listed in comments with the reason and counts;
   * a wildcard ``*.parent`` replaces exact names only when at least
     ``collapse_threshold`` distinct learned names sit below ``parent``, ``parent`` is
     at or below its registrable domain (never ``*.com``, ``*.co.uk``, ``*.github.io``,
     ``*.s3.amazonaws.com``: the public-suffix list decides, private section
     included), no public suffix sits below ``parent`` (never ``*.amazonaws.com``,
     which would cover every S3 bucket), and no suspicious name sits below it.
     Deeper parents win.

3. :func:`render_new`, :func:`merge` (tomlkit: the existing file's comments and order
   are kept, new entries are appended with a comment each) or :func:`render_diff`.

Every policy produced is checked with :func:`resolver.policy.config.parse_config` before it
is returned, and the allow lists are compared with what was intended.
"""

from __future__ import annotations

from resolver.policy.learn.collapse import (
    Entry,
    LeftOut,
    Plan,
    collapse,
    human_bytes,
    large_uploads,
    never_connected,
    plan,
    unused_rules,
)
from resolver.policy.learn.collect import (
    DEFAULT_COLLAPSE_THRESHOLD,
    TOP,
    ClientStats,
    Connection,
    Egress,
    LearnError,
    LogWindow,
    NameStats,
    find_suspicious,
    open_db,
    read_log,
)
from resolver.policy.learn.render import (
    merge,
    render_diff,
    render_new,
    summary,
)

__all__ = [
    "Egress",
    "human_bytes",
    "large_uploads",
    "never_connected",
    "ClientStats",
    "Connection",
    "DEFAULT_COLLAPSE_THRESHOLD",
    "Entry",
    "LearnError",
    "LeftOut",
    "LogWindow",
    "NameStats",
    "Plan",
    "TOP",
    "collapse",
    "find_suspicious",
    "merge",
    "open_db",
    "plan",
    "read_log",
    "render_diff",
    "render_new",
    "summary",
    "unused_rules",
]
