"""The two kinds of failure every layer may raise and the CLI maps to an exit status (kept apart
so the runner, which reports them, imports no training code):

- :class:`InputError`, exit 2: the input (params, data, a model or pairs file, the workspace) is
  not what was expected; nothing was written. Each layer's own error (``ParamsError``,
  ``DataError``, ``ModelError`` …) is one; the CLI catches this base class alone.
- :class:`RunFailedError`, exit 1: the run failed while working.
"""

from __future__ import annotations

__all__ = ["InputError", "RunFailedError"]


class InputError(Exception):
    """Bad input (exit 2, one line, never retried): ``str(err)`` names the key, file or setting and
    what was expected."""


class RunFailedError(RuntimeError):
    """A run that failed while working (exit 1, one line, never retried): what it computed diverged,
    or the machine ran out of memory or disk after the stage had written something. The message
    names what and where, and what was kept."""
