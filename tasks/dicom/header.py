"""What a DICOM header gives the catalog, and the one error both parse paths raise."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.uid import (
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

    def phi(self) -> dict[str, str]:
        """The identifying fields, to be stored only encrypted."""
        return {
            "patient_id": self.patient_id,
            "issuer": self.issuer,
            "patient_name": self.patient_name,
            "birth_date": self.birth_date,
        }
