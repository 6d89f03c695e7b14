"""Pseudonyms and encrypted PHI fields.

* ``patient_key`` is HMAC-SHA256 under a secret pepper of the issuer and the
  patient ID, so the catalog can group a patient's studies without holding
  the ID.
* The identifying header fields (name, birth date, patient ID, issuer) are
  sealed with AES-256-GCM under a sub-key derived (HKDF) from the study's
  record key, so destroying that key erases them too.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
import secrets
import unicodedata
from collections.abc import Iterable
from urllib.parse import unquote

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dropvault.storage.catalog import Catalog
from dropvault.storage.keystore import Keystore


def keyed_hash(pepper: bytes, *parts: str, length: int = 32) -> str:
    """HMAC-SHA256 of the parts (NUL-separated), hex, cut to ``length`` characters. A part
    may hold a file name that is not UTF-8: its own bytes are hashed (surrogateescape)."""
    message = "\x00".join(parts).encode("utf-8", "surrogateescape")
    return hmac.new(pepper, message, hashlib.sha256).hexdigest()[:length]


def patient_key(pepper: bytes, issuer: str, patient_id: str) -> str:
    return "pk_" + keyed_hash(pepper, "patient", issuer, patient_id)


def _field_key(record_key: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"dropvault phi v1")
    return hkdf.derive(record_key)


def seal_fields(record_key: bytes, context: str, fields: dict[str, str]) -> bytes:
    """Encrypt a small dict; ``context`` (e.g. the study UID) is bound as associated data."""
    nonce = secrets.token_bytes(12)
    plain = json.dumps(fields, sort_keys=True).encode("utf-8")
    return nonce + AESGCM(_field_key(record_key)).encrypt(nonce, plain, context.encode())


def open_fields(record_key: bytes, context: str, sealed: bytes) -> dict[str, str]:
    plain = AESGCM(_field_key(record_key)).decrypt(sealed[:12], sealed[12:], context.encode())
    data: dict[str, str] = json.loads(plain)
    return data


def study_key(pepper: bytes, study_uid: str) -> str:
    """The tombstone key of a study (a keyed hash: the catalog never keeps a deleted UID)."""
    return "st_" + keyed_hash(pepper, "study", study_uid)


DELETED_PREFIX = "deleted:"


def tombstone_ref(pepper: bytes, study_uid: str) -> str:
    """What stands for a deleted study's UID wherever history keeps a row or a file."""
    return DELETED_PREFIX + study_key(pepper, study_uid)


def redact(text: str, replacements: dict[str, str]) -> str:
    """``text`` with each whole identifier in ``replacements`` (a UID: digits and dots)
    replaced, never a part of a longer one (``1.2.3`` is left alone inside ``1.2.3.4``).
    JSON may spell a digit as ``\\u0039``: callers redact decoded text where it matters."""
    if not replacements:
        return text
    pattern = _identifiers(tuple(sorted(replacements, key=len, reverse=True)))
    return pattern.sub(lambda m: replacements[m.group(0)], text)


REDACTED = "[redacted]"
MIN_QUOTE = 4


def patient_quotes(phi: dict[str, str]) -> list[str]:
    """How free text or a name may quote a patient: the name as DICOM spells it
    (``DOE^JOHN^A``); family and given name either way round, joined by a space, a comma,
    an underscore, a hyphen or a dot (``DOE, JOHN``, ``JOHN_DOE``); every component joined
    the same ways; and the patient ID. Matched whole-word, in any case
    (:func:`redact_quotes`)."""
    name = phi.get("patient_name", "")
    parts = [p.strip() for p in name.split("^") if p.strip()]
    forms = {name, phi.get("patient_id", "")}
    orders = [parts]
    if len(parts) >= 2:
        orders += [[parts[0], parts[1]], [parts[1], parts[0]]]
    for order in orders:
        for sep in (" ", ", ", ",", "_", "-", "."):
            forms.add(sep.join(order))
    # Shorter values (an ID "12") are everywhere in other text: dates, counts, other ids.
    return sorted(f.strip() for f in forms if len(f.strip()) >= MIN_QUOTE)


def redact_quotes(text: str, quotes: list[str]) -> str:
    """``text`` with each whole-word occurrence of ``quotes`` (any case) replaced by
    :data:`REDACTED`. For text already tied to a deleted study: a patient's name or ID is
    not unique, so text about other studies is never searched for it."""
    if not quotes:
        return text
    body = "|".join(map(re.escape, sorted(set(quotes), key=len, reverse=True)))
    # Whole words, where an underscore also separates (``shares/DOE_JOHN.jsonl``).
    edge = r"[^\W_]"
    return re.sub(rf"(?<!{edge})(?:{body})(?!{edge})", REDACTED, text, flags=re.IGNORECASE)


def quotes_any(text: str, quoted: list[str]) -> bool:
    """Whether ``text`` quotes any of ``quoted`` (as :func:`redact_quotes` would find)."""
    return redact_quotes(text, quoted) != text


def squashed(text: str) -> str:
    """Text as an identifier can be dressed up, undressed: percent-decoded (three times at
    most), NFKC-normalised, every decimal digit in ASCII, case-folded, and every character
    that is not a letter or a digit dropped (``1,2,840`` and ``Doe^John`` and
    ``ＤＯＥ%2FJOHN`` become ``12840``, ``doejohn``, ``doejohn``)."""
    for _ in range(3):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    out = []
    for ch in unicodedata.normalize("NFKC", text).casefold():
        if ch.isdecimal():
            out.append(str(unicodedata.decimal(ch)))
        elif ch.isalnum():
            out.append(ch)
    return "".join(out)


def quotes_loosely(text: str, quoted: Iterable[str]) -> bool:
    """Whether ``text`` holds any of ``quoted`` however separated, spaced, cased or encoded
    (:func:`squashed`, both sides; values under 4 characters are not searched). For names
    refused at intake: a false alarm costs a rejected row, a miss keeps PHI past deletion."""
    body = squashed(text)
    return any(len(q) >= 4 and q in body for q in map(squashed, quoted))


def quoted_uids(text: str, uids: Iterable[str]) -> set[str]:
    """Those of ``uids`` that ``text`` quotes whole (as :func:`redact` would replace)."""
    wanted = tuple(sorted(set(uids), key=len, reverse=True))
    return set(_identifiers(wanted).findall(text)) if wanted else set()


@functools.lru_cache(maxsize=16)
def _identifiers(olds: tuple[str, ...]) -> re.Pattern[str]:
    # Whole UIDs: not inside a longer UID (a digit, or a dot and a digit, on either side),
    # but a UID that ends a sentence ("... on 1.2.3.") is still one.
    body = "|".join(map(re.escape, olds))
    return re.compile(r"(?<![0-9])(?<![0-9]\.)(?:" + body + r")(?![0-9])(?!\.[0-9])")


def study_quotes(catalog: Catalog, keystore: Keystore, uids: list[str]) -> dict[str, list[str]]:
    """``{study UID: its patient's quotes}`` (:func:`patient_quotes`) for the studies whose
    record key still opens their sealed PHI; others are left out."""
    if not uids:
        return {}
    rows = catalog.query(
        "SELECT study_uid, record_key_id, phi_enc FROM studies"
        " WHERE study_uid IN (SELECT unnest(?::VARCHAR[])) AND phi_enc IS NOT NULL",
        [sorted(set(uids))],
    )
    keys = keystore.unwrap_many(sorted(set(map(str, rows["record_key_id"]))))
    found: dict[str, list[str]] = {}
    for uid, key_id, sealed in rows.itertuples(index=False):
        if str(key_id) not in keys:
            continue  # shredded
        try:
            phi = open_fields(keys[str(key_id)], str(uid), bytes(sealed))
        except (InvalidTag, ValueError):
            continue  # not ours to open
        found[str(uid)] = patient_quotes(phi)
    return found
