"""Export: decrypt one cataloged image back to a file, byte-identical to what was dropped."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from dropvault.storage.errors import TerminalError
from dropvault.storage.home import Home
from dropvault.storage.keystore import KeyDestroyedError
from dropvault.storage.vault import IntegrityError
from dropvault.tasks.audit import audit


class ExportError(TerminalError, RuntimeError):
    """The image cannot be exported (unknown, deleted, or failed its integrity check)."""


def export_instance(
    home: Home, sop_instance_uid: str, out: Path, actor: str = "cli", audited: bool = True
) -> dict[str, Any]:
    """Decrypt an instance to ``out`` (via a temporary file), check its SHA-256, audit it
    (unless ``audited`` is False: :func:`dropvault.tasks.access.export_for` audits its own)."""
    rows = home.catalog.query(
        "SELECT i.sha256, i.size_bytes, o.location_url, o.name FROM instances i"
        " JOIN objects o USING (object_id) WHERE i.sop_instance_uid = ?",
        [sop_instance_uid],
    )
    if rows.empty:
        raise ExportError("no cataloged instance with that SOP Instance UID")
    row = rows.iloc[0]
    vault = home.store_for(str(row["location_url"]))  # the vault, or the archive
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.part")
    digest = hashlib.sha256()
    try:
        with vault.open(str(row["name"])) as src, tmp.open("wb") as dst:
            while chunk := src.read(1024 * 1024):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != row["sha256"]:
            raise ExportError("decrypted image does not match its catalog checksum")
        tmp.replace(out)
    except KeyDestroyedError as exc:
        raise ExportError("the image's key was destroyed (the study was deleted)") from exc
    except IntegrityError as exc:
        raise ExportError(f"vault object failed its integrity check: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    now = datetime.now(UTC)
    size = int(row["size_bytes"])
    result = {"sop_instance_uid": sop_instance_uid, "bytes": size, "out": str(out)}
    if not audited:
        return result

    def record(con: duckdb.DuckDBPyConnection) -> None:
        audit(
            con,
            actor=actor,
            action="export",
            subject=sop_instance_uid,
            detail={"bytes": int(row["size_bytes"])},
            at=now,
        )

    home.catalog.write(record)
    return result
