"""What a DICOM header gives the catalog, and the one error both parse paths raise."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dropvault.storage.errors import TerminalError
from dropvault.tasks.reasons import QuarantineReason

# Plain strings: these are compared and hashed on the per-file path.
IMPLICIT_LE = str(ImplicitVRLittleEndian)
EXPLICIT_LE = str(ExplicitVRLittleEndian)
EXPLICIT_BE = str(ExplicitVRBigEndian)
DEFLATED = str(DeflatedExplicitVRLittleEndian)
NATIVE = {IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED}

MAX_INT32 = 2**31 - 1
CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")  # DICOM's CS value representation

REQUIRED_UIDS = {
    "SOPInstanceUID": 0x00080018,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
}


class DicomRejected(TerminalError):
    """A file that must go to quarantine. ``reason`` is a code, ``detail`` is PHI-free."""

    def __init__(self, reason: QuarantineReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DicomHeader:
    """What the catalog needs from a header. PHI fields are excluded from ``repr``."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str | None
    modality: str | None
    transfer_syntax: str | None
    rows: int | None
    columns: int | None
    frames: int | None
    patient_id: str = field(default="", repr=False)
    issuer: str = field(default="", repr=False)
    patient_name: str = field(default="", repr=False)
    birth_date: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        # What the catalog keeps must fit its columns and carry no free text: a size that
        # overflows INTEGER fails the file, not the batch's commit; a Modality that is not a
        # code string, or a SOP Class UID that is not a UID, is dropped (it could hold PHI).
        for name in ("rows", "columns", "frames"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_INT32:
                raise DicomRejected(QuarantineReason.NOT_DICOM, f"{name} is out of range")
        if self.modality is not None and not CODE_STRING.fullmatch(self.modality):
            object.__setattr__(self, "modality", None)
        if self.sop_class_uid is not None and not UID(self.sop_class_uid).is_valid:
            object.__setattr__(self, "sop_class_uid", None)

    def phi(self) -> dict[str, str]:
        """The identifying fields, to be stored only encrypted."""
        return {
            "patient_id": self.patient_id,
            "issuer": self.issuer,
            "patient_name": self.patient_name,
            "birth_date": self.birth_date,
        }
