"""Adversarial tests: one module per attack class, each against the real `countersign run`."""
