"""One family of errors: what dropvault raises on purpose, and whether a retry can help.

* :class:`TerminalError`: retrying cannot help (bad input, a wrong setting or key,
  tampered bytes, a refused query). A task fails at once instead of spending its retries.
* :class:`TransientError`: may pass on a retry (a lock held past the timeout).

Anything else (``OSError``, botocore's and DuckDB's I/O errors) is treated as transient:
storage hiccups are what task retries are for. Every class here keeps its older base
(``ValueError``, ``RuntimeError``, ...) so callers that catch those still do.
"""

from __future__ import annotations

from typing import Any


class DropvaultError(Exception):
    """Base of every error dropvault raises on purpose."""


class TerminalError(DropvaultError):
    """Retrying cannot help."""


class TransientError(DropvaultError):
    """May pass on a retry."""


def is_transient(exc: BaseException | None) -> bool:
    """Whether a retry may help: everything but a :class:`TerminalError`."""
    return not isinstance(exc, TerminalError)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed task run unless its error is
    terminal. Prefect passes the run's Failed state, whose ``data`` is the exception."""
    data = getattr(state, "data", None)
    return is_transient(data if isinstance(data, BaseException) else None)
