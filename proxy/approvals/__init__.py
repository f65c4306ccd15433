"""Approvals: the pure state machine (`state`), the request fingerprint and the service."""
