"""The egress fence: iptables rules built as data and run by one runner, ipset sets fed
over netlink from allowed answers, NFLOG recording of rejected connection attempts, and the
chain step that feeds the sets.

May import ``resolver.policy`` and ``resolver.core``. Answers arrive as wire bytes, so the
fence does not import the query path (``resolver.dns``) either.
"""
