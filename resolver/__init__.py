"""dnsguard: a policy-filtering DNS resolver and egress fence for AI agents."""

__version__ = "0.1.0"
