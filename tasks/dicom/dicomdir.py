"""A CD's ``DICOMDIR`` (Media Storage Directory) read as its drop's table of contents.

Patient image CDs hold a ``DICOMDIR`` beside a ``DICOM/`` tree of files without
extensions, plus a viewer, ``autorun.inf`` and a README. The DICOMDIR's records name every
image file (Referenced File ID, a path relative to the DICOMDIR's folder) and the SOP
Instance UID inside it. :mod:`dropvault.tasks.drops` uses that list as a completeness
manifest, and ingest checks each referenced file's UID against its record.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dropvault.tasks.dicom.budget import (
    MAX_FIELD_BYTES,
    UNDEFINED,
    read_bounded,
    read_sequence_bounded,
)
from dropvault.tasks.dicom.filemeta import may_inflate

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
NAME = "DICOMDIR"
# A larger one is an ordinary file (and quarantined). A CD of 1,000 images has a DICOMDIR
# of ~0.6 MB; each scan reads a waiting drop's again (~1 s per MiB), so its size is its
# cost every pass.
MAX_BYTES = 4 << 20
# Its records (sequence items, ~150 bytes each) as many as fit MAX_BYTES: pydicom builds
# ~1 KB for each, and 1 MiB of empty items cost 2.7 s and 140 MB every pass.
MAX_RECORDS = 30_000
RECORDS_TAG = 0x00041220  # DirectoryRecordSequence
FILE_ID_TAG = 0x00041500  # ReferencedFileID
UID_IN_FILE_TAG = 0x00041511  # ReferencedSOPInstanceUIDInFile


def is_dicomdir_name(name: str) -> bool:
    """Whether the last part of ``name`` is ``DICOMDIR`` (any case, as CDs are copied)."""
    return name.rsplit("/", 1)[-1].upper() == NAME


@dataclass(frozen=True)
class Directory:
    """What a DICOMDIR references: ``{path relative to its folder, upper case: SOP Instance
    UID or ""}``. ISO 9660 names are upper case, while copies of a CD may be lower."""

    references: dict[str, str]


def _unfit(record: Dataset, tag: int) -> bool:
    """Whether a record's path or UID is a sequence or longer than any path or UID: pydicom
    would parse or split it only when it is read, outside every bound (64 KiB values of 64
    records cost 12 s and 486 MB a pass)."""
    raw = record.get_item(tag, keep_deferred=True)
    if raw is None:
        return False
    length = getattr(raw, "length", 0)
    return raw.VR == "SQ" or length == UNDEFINED or length > MAX_FIELD_BYTES


def read_dicomdir(raw: bytes) -> Directory | None:
    """The references of a DICOMDIR, or None when ``raw`` is not a readable one (it is then
    an ordinary file of its drop, and ingest gives it its reason).

    A deflated one is not read: pydicom inflates a data set whole, and a 1 MB deflate bomb
    named DICOMDIR held every scan of the drops for over a minute and 1 GiB (PS3.10 media
    use explicit VR little endian for it anyway). Whether it is deflated is pydicom's own
    reading of its file meta (:mod:`.filemeta`), not a look for the UID's text, which a
    long meta element pushed out of reach and a DICOMDIR that merely lists deflated files
    tripped."""
    if may_inflate(raw, force=False):
        return None
    try:
        ds = read_bounded(io.BytesIO(raw), items=MAX_RECORDS, defer=False)
        if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) != MEDIA_STORAGE_DIRECTORY:
            return None
        references: dict[str, str] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bad charset warns for every record
            for record in read_sequence_bounded(ds, RECORDS_TAG, MAX_RECORDS):
                if any(_unfit(record, tag) for tag in (FILE_ID_TAG, UID_IN_FILE_TAG)):
                    continue
                file_id = record.get("ReferencedFileID")
                if file_id is None:
                    continue
                parts = [file_id] if isinstance(file_id, str) else list(file_id)
                path = "/".join(str(p).strip() for p in parts if str(p).strip())
                if not path or any(p in (".", "..") for p in path.split("/")):
                    continue  # a record that would point outside the CD: not followed
                uid = str(record.get("ReferencedSOPInstanceUIDInFile", "") or "")
                references[path.upper()] = uid
    except Exception:  # noqa: BLE001 - any failure on hostile bytes: not a table of contents
        return None  # a list of types let an unknown VR's error out of every drops scan
    return Directory(references)
