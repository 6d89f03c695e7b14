"""The one vocabulary of outcomes: why a file was quarantined, why a manifest row was refused.

Both are ``StrEnum``\\ s, so a typo is an ``AttributeError`` at import instead of a stray
string found at run time, and a member is stored, compared and printed as its plain value.
To add a reason: add a member here, then raise it where it is decided (README: "Where to
change what").
"""

from __future__ import annotations

from enum import StrEnum


class QuarantineReason(StrEnum):
    """Why a dropped file went to quarantine (the ``quarantine.reason`` column)."""

    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    MISSING_UID = "missing_uid"
    UID_CONFLICT = "uid_conflict"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    INCOMPLETE_DROP = "incomplete_drop"
    UNSAFE_NAME = "unsafe_name"
    TOO_LARGE = "too_large"
    DELETED_BY_OWNER = "deleted_by_owner"
    UNREADABLE = "unreadable"  # listed but cannot be read: reported, left in place
    # Archives (tasks/archives.py): refused whole, or a member not written.
    ARCHIVE_TOO_LARGE = "archive_too_large"
    ARCHIVE_ENCRYPTED = "archive_encrypted"
    ARCHIVE_CORRUPT = "archive_corrupt"
    ARCHIVE_TOO_DEEP = "archive_too_deep"
    ARCHIVE_MEMBER_REFUSED = "archive_member_refused"  # a link or special file in a tar
    # CDs (tasks/dicom/dicomdir.py): a file whose UID is not its record's; a non-image.
    DICOMDIR_MISMATCH = "dicomdir_mismatch"
    CD_EXTRA = "cd_extra"


class RejectReason(StrEnum):
    """Why a share, revoke, disclose or deletion row was refused (``rejected:<reason>``)."""

    MALFORMED = "malformed"
    UNREADABLE = "unreadable"  # the manifest file itself cannot be read (e.g. a symlink)
    TOO_LARGE = "too_large"  # the manifest file is over MAX_MANIFEST_BYTES: not read
    MISSING_FIELD = "missing_field"
    BAD_TIMESTAMP = "bad_timestamp"
    UNKNOWN_ACTION = "unknown_action"
    GRANTEE_IS_OWNER = "grantee_is_owner"
    BAD_KEEP_ARCHIVE = "bad_keep_archive"
    BAD_DELIVER = "bad_deliver"  # deliver is not true or false
    BAD_PUBLIC_KEY = "bad_public_key"  # not an age X25519 recipient (age1...)
    SUPERSEDED = "superseded"  # older than the account's last key change: it arrived late
    DUPLICATE_REQUEST_ID = "duplicate_request_id"
    UNKNOWN_STUDY = "unknown_study"
    UID_IN_NAME = "uid_in_name"  # a request id or owner account quotes a UID
    PHI_IN_NAME = "phi_in_name"  # a request id or owner quotes the study's patient
    STUDY_DELETED = "study_deleted"  # the study was deleted; the row keeps its tombstone key
    UNKNOWN_OWNER = "unknown_owner"
    NOT_OWNER = "not_owner"
