"""The Prefect global concurrency limit that serialises catalog writes.

DuckDB lets one process write at a time. Flows that share a Prefect server
(every deployment does) take one slot of ``dropvault-catalog-write`` around
each catalog write, so a second writer queues on the server instead of
spinning on the file lock. The lock back-off in :mod:`dropvault.storage.catalog` stays
as the backstop for writers outside Prefect (a notebook calling ``.fn()``), and is the only
guard of runs without a Prefect server (``PREFECT_API_URL`` unset: each CLI run starts its
own embedded server, whose leases live in memory, so a killed run's slot would never be
freed; ``Settings`` then passes no write guard).

The limit is created with one slot on first use if it does not exist; an
operator may create it beforehand (``prefect gcl create
dropvault-catalog-write --limit 1``) or raise it for a multi-writer catalog.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

CATALOG_WRITE_LIMIT = "dropvault-catalog-write"
# A killed writer's slot is freed when its lease runs out; a live one renews it.
LEASE_SECONDS = 60.0

_ensured: set[str] = set()


def ensure_limit(name: str = CATALOG_WRITE_LIMIT, slots: int = 1) -> None:
    """Create the global concurrency limit if the server does not have it yet."""
    if name in _ensured:
        return
    # Imported here: flows.settings imports this module, and the CLI must be able to
    # point PREFECT_HOME somewhere before Prefect is first imported.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=slots)
                )
            except Exception:  # noqa: BLE001 - another process created it first
                client.read_global_concurrency_limit_by_name(name)
    _ensured.add(name)


@contextmanager
def catalog_write_slot(timeout_seconds: float = 120.0) -> Iterator[None]:
    """Hold one slot of the catalog write limit for the length of the ``with`` block."""
    from prefect.concurrency.sync import concurrency

    ensure_limit()
    with concurrency(
        CATALOG_WRITE_LIMIT,
        occupy=1,
        timeout_seconds=timeout_seconds,
        lease_duration=LEASE_SECONDS,
        strict=True,
    ):
        yield
