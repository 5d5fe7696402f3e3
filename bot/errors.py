"""Errors the adapters raise to the composition root, which turns them into a message and an exit code."""

from __future__ import annotations


class BotLoginFailed(Exception):
    """A platform refused the configured token: the operator must fix it; retrying cannot help."""
