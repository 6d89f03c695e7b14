"""Retries are spent on transient errors only: a terminal one fails the task at once."""

from __future__ import annotations

import pytest
from prefect import flow, task

from dropvault.storage.errors import DropvaultError, TerminalError, TransientError, retry_transient
from dropvault.storage.vault import IntegrityError
from dropvault.tasks.dicom import DicomRejected
from dropvault.tasks.reasons import QuarantineReason

CALLS: list[str] = []


@task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
def failing(kind: str) -> None:
    CALLS.append(kind)
    if kind == "terminal":
        raise IntegrityError("tampered")
    if kind == "transient":
        raise TransientError("lock held")
    raise OSError("503 from the object store")


@flow
def run(kind: str) -> None:
    failing(kind)


@pytest.mark.parametrize(("kind", "attempts"), [("terminal", 1), ("transient", 3), ("os", 3)])
def test_only_transient_errors_are_retried(kind: str, attempts: int) -> None:
    CALLS.clear()
    with pytest.raises((DropvaultError, OSError)):
        run(kind)
    assert [kind] * attempts == CALLS


def test_rejections_are_terminal_dropvault_errors() -> None:
    exc = DicomRejected(QuarantineReason.TRUNCATED, "cut")
    assert isinstance(exc, TerminalError) and exc.reason == "truncated"
