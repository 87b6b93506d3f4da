"""Deployment files shipped with the package: systemd units and drop-ins, the compose override
for OpenClaw, OpenClaw's sandbox DNS setting. Data only, it imports nothing; read through
``resolver.policy.presets`` (``dnsguard init --systemd DIR`` / ``--compose DIR``). The
repository's ``deploy/`` is a link here, so the files read on GitHub and the ones installed
are the same bytes.
"""
