"""Every error recserve raises on purpose, grouped by what the caller can do about it.

The serving front ends map these to HTTP / gRPC status codes in one place; library users catch them directly.
Messages name the bad value and the limit, e.g. "table 'user': keys must be 1-D, got shape (2, 3)".
"""

from __future__ import annotations


class RecserveError(Exception):
    """Base class of all recserve errors."""


class InvalidInputError(RecserveError, ValueError):
    """The caller sent something malformed (dtype, shape, value, file). Fix the input; retrying won't help."""


class ConfigError(InvalidInputError):
    """A configuration file or value is invalid: unknown key, wrong type, value out of range."""


class MalformedFileError(InvalidInputError):
    """An import file is unreadable or inconsistent. The existing store was left untouched."""


class NotFoundError(RecserveError, LookupError):
    """A named thing (table, model, file) does not exist."""


class CapacityError(RecserveError):
    """A bounded structure is full and its policy is to refuse, not evict."""


class OverloadedError(RecserveError):
    """Too much work right now; retry later (HTTP 503 / gRPC RESOURCE_EXHAUSTED)."""


class TierUnavailableError(RecserveError):
    """A storage tier cannot be reached or opened (locked, dead server, full disk). Retryable; names the tier."""

    def __init__(self, tier: str, message: str) -> None:
        super().__init__(f"{tier}: {message}")
        self.tier = tier
