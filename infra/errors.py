"""Errors every layer may raise or catch, so that no stage imports another to name them."""

from __future__ import annotations


class TransientError(RuntimeError):
    """A network or storage failure worth retrying (timeouts, 5xx, connection resets)."""
