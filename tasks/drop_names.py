"""Drop names: keyed ids in the catalog, the real names sealed, and an operator's view.

Facilities name drop folders after patients (``DOE_JANE_MRN55501234``), so a drop's
folder name is PHI, like a file name. Everything that names a drop (catalog rows,
quarantine paths and their JSON, audit rows, logs, artifacts, errors) uses its keyed id
``d_<24 hex>``: an HMAC under the pepper of the facility and the folder name, so the same
folder always gets the same id and nobody without the pepper can go back. The real name
is kept only in ``drops.name_enc``, sealed under the drop's own record key, and shown
only to an operator who asks (``dropvault drops --names``), which is audited.

Catalogs made before drop ids were keyed hold the plain names;
:func:`dropvault.tasks.drop_rekey.rekey_drops` (run by ingest before its scan) moves them
to keyed ids and seals the names.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from dropvault.storage.home import Home
from dropvault.storage.keystore import KeyDestroyedError, Keystore, UnknownKeyError
from dropvault.tasks.audit import audit_viewing
from dropvault.tasks.phi import keyed_hash, open_fields, seal_fields

if TYPE_CHECKING:  # ingest imports this module; pandas costs ~40 MB of its RSS
    import pandas as pd

DROP_ID = re.compile(r"d_[0-9a-f]{24}")


def drop_id_for(pepper: bytes, facility_id: str, name: str) -> str:
    """The keyed id of the drop folder ``name`` of ``facility_id`` (raw, as listed)."""
    return "d_" + keyed_hash(pepper, "drop", facility_id, name, length=24)


def seal_names(keystore: Keystore, drops: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """``(record_key_id, name_enc)`` for each new drop ``(drop_id, name)``: a record key of
    its own (one keystore transaction for all), so a name can be erased by destroying its
    key, with the drop id bound as associated data."""
    keys = keystore.create_many(len(drops))
    return [
        (key_id, seal_fields(record_key, drop_id, {"name": name}))
        for (key_id, record_key), (drop_id, name) in zip(keys, drops, strict=True)
    ]


def open_name(keystore: Keystore, drop_id: str, key_id: Any, sealed: Any) -> str | None:
    """The real name of a drop, or None when none was kept or its key is gone."""
    if not isinstance(key_id, str) or not isinstance(sealed, bytes | bytearray):
        return None  # a NULL (pandas may hand it over as NaN)
    try:
        record_key = keystore.unwrap(key_id)
    except (KeyDestroyedError, UnknownKeyError):
        return None  # destroyed: the name is erased
    return printable(open_fields(record_key, drop_id, bytes(sealed))["name"])


def printable(name: str) -> str:
    """A listed name for display: one that is not UTF-8 (kept with surrogates) shows its
    bytes escaped."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def drops_list(home: Home, *, names: bool = False, actor: str = "operator") -> pd.DataFrame:
    """Every drop the catalog knows, newest first, by keyed id. With ``names``, the real
    folder names are opened too, and the viewing is an audit row (who, how many)."""
    frame = home.catalog.query(
        "SELECT facility_id, drop_id, status, has_manifest, files_seen, ingested, duplicates,"
        " quarantined, bytes, first_seen_at, completed_at, record_key_id, name_enc"
        " FROM drops ORDER BY first_seen_at DESC, facility_id, drop_id"
    )
    if names:
        frame.insert(
            2,
            "name",
            [
                open_name(home.keystore, str(r.drop_id), r.record_key_id, r.name_enc)
                for r in frame.itertuples()
            ],
        )
        audit_viewing(
            home.catalog, actor=actor, action="drop_names_viewed", subject=str(len(frame))
        )
    return frame.drop(columns=["record_key_id", "name_enc"])


def drop_names(home: Home, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
    """Real names of the drops ``(facility_id, drop_id)`` (None where none is kept)."""
    if not keys:
        return {}
    frame = home.catalog.query(
        "SELECT facility_id, drop_id, record_key_id, name_enc FROM drops"
        " WHERE facility_id || '/' || drop_id IN (SELECT unnest(?::VARCHAR[]))",
        [sorted({f"{f}/{d}" for f, d in keys})],
    )
    found = {
        (str(r.facility_id), str(r.drop_id)): open_name(
            home.keystore, str(r.drop_id), r.record_key_id, r.name_enc
        )
        for r in frame.itertuples()
    }
    return {k: found.get(k) for k in keys}
