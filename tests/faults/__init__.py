"""Fault injection: killed processes, lost databases, a hostile network, expiring tokens."""
