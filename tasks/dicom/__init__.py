"""Header-only DICOM parsing and validation.

- ``header.py``: :class:`DicomHeader` (what the catalog keeps) and :class:`DicomRejected`.
- ``guards.py``: checks before any parser runs (polyglot preamble, cut meta, deflate bomb).
- ``filemeta.py``: the file meta group as pydicom reads it (is the data set deflated?).
- ``budget.py``: pydicom's parse of untrusted bytes within bounds on what it walks and reads.
- ``walk.py``: the lean byte walk for well-formed files in memory (accepts or declines).
- ``validation.py``: the pydicom path, which names the reason for every refusal.
- ``elements.py``: the element structure both paths check.
- ``uid_scan.py``: the UIDs a file's bytes name, found without a parse (for deletion).
"""

from __future__ import annotations

import io

from dropvault.tasks.dicom.guards import check_preamble
from dropvault.tasks.dicom.header import DicomHeader, DicomRejected
from dropvault.tasks.dicom.uid_scan import uids_named
from dropvault.tasks.dicom.validation import read_header, study_uid_hint
from dropvault.tasks.dicom.walk import lean_header

__all__ = [
    "DicomHeader",
    "DicomRejected",
    "header_from_bytes",
    "lean_header",
    "read_header",
    "study_uid_hint",
    "uids_named",
]


def header_from_bytes(data: bytes) -> DicomHeader:
    """Parse and validate a file held in memory: the lean walk, else the pydicom path."""
    check_preamble(data[:8])
    return lean_header(data) or read_header(io.BytesIO(data), len(data))
