"""Windows onto a running dnsguard: Prometheus metrics and dnstap output.

May import ``resolver.policy`` and ``resolver.core``. Never imports the query path, the log
or the fence: the figures it exposes are plain integers those components own, read through
reader functions that ``resolver.app`` registers; dnstap events arrive through a sink callable
``resolver.app`` hands to the query path.
"""
