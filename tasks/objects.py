"""Rows of ``objects``: every stored object (an image, a quarantined file), where it is
(P8: location and region) and which record key seals it. Built here only."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from dropvault.storage.locations import Location
from dropvault.storage.vault import Sealed


def object_row(
    *,
    object_id: str,
    kind: Literal["instance", "quarantine"],
    location: Location,
    region: str,
    name: str,
    record_key_id: str,
    sealed: Sealed,
    created_at: datetime,
) -> dict[str, Any]:
    return {
        "object_id": object_id,
        "kind": kind,
        "location_url": location.url,
        "region": region,
        "name": name,
        "record_key_id": record_key_id,
        "plaintext_bytes": sealed.plaintext_bytes,
        "stored_bytes": sealed.stored_bytes,
        "created_at": created_at,
    }
