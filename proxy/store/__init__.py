"""Where approvals live: the `Store` protocol and its implementations."""

from .base import Store, StoreUnavailable

__all__ = ["Store", "StoreUnavailable"]
