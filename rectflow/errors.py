"""The failure every layer may raise and the CLI maps to exit 1 (kept apart so the runner, which
reports it, imports no training code)."""

from __future__ import annotations

__all__ = ["RunFailedError"]


class RunFailedError(RuntimeError):
    """A run that failed while working (exit 1, one line, never retried): what it computed diverged,
    or the machine ran out of memory or disk after the stage had written something. The message
    names what and where, and what was kept."""
