"""A KEK kept only as a ciphertext blob made by AWS KMS (envelope encryption).

``dropvault init`` asks KMS for a data key (``GenerateDataKey``, AES_256) under the
KMS key named by the settings, and keeps only the ``CiphertextBlob`` in
``{keys}/kek.kms`` (0600). Every start sends the blob to KMS ``Decrypt`` with the
expected key id, and uses the plaintext in memory only; it is never written.
Rotating to a new KMS key is ``ReEncrypt``: the blob changes, the KEK inside does
not, so record keys and objects are untouched. The client is passed in (the
settings build it with their endpoint and region), so tests run this against
moto's KMS on loopback.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from dropvault.storage.errors import DropvaultError
from dropvault.storage.keystore import KEY_BYTES, check_private, private_dir, write_secret_file

MAX_BLOB = 4096  # a KMS ciphertext blob of a 32-byte key is ~184 bytes

BLOB_FILE = "kek.kms"


class KmsKekError(DropvaultError, RuntimeError):
    """KMS refused or could not be reached; the message names no key material."""


def _error(action: str, exc: Exception) -> KmsKekError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") or type(exc).__name__
    return KmsKekError(f"KMS {action} failed ({code})")


def blob_path(directory: Path) -> Path:
    return Path(directory) / BLOB_FILE


def create_kek(client: Any, key_id: str, directory: Path) -> bytes:
    """A new KEK from KMS; only its ciphertext blob is stored. Refuses to replace a blob."""
    path = blob_path(directory)
    if path.exists():
        raise FileExistsError(f"{path.name} already exists")
    try:
        made = client.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    except Exception as exc:  # noqa: BLE001 - botocore's errors, reported by code only
        raise _error("GenerateDataKey", exc) from None
    kek = bytes(made["Plaintext"])
    if len(kek) != KEY_BYTES:
        raise KmsKekError("KMS returned a data key that is not 32 bytes")
    private_dir(path.parent)
    write_secret_file(path, bytes(made["CiphertextBlob"]))
    return kek


def _read_blob(path: Path) -> bytes:
    """The blob: a private regular file of a plausible size, never a symlink."""
    try:
        check_private(path)
    except FileNotFoundError:
        raise KmsKekError(f"{path.parent.name}/{path.name} is missing") from None
    except ValueError as exc:
        raise KmsKekError(str(exc)) from None
    if not path.is_file() or path.stat().st_size > MAX_BLOB:
        raise KmsKekError(f"{path.name} is not a KMS ciphertext blob")
    return path.read_bytes()


def open_kek(client: Any, key_id: str, directory: Path) -> bytes:
    """The KEK, decrypted by KMS under ``key_id`` (a blob under another key is refused)."""
    blob = _read_blob(blob_path(directory))
    try:
        plain = client.decrypt(CiphertextBlob=blob, KeyId=key_id)
    except Exception as exc:  # noqa: BLE001
        raise _error("Decrypt", exc) from None
    kek = bytes(plain["Plaintext"])
    if len(kek) != KEY_BYTES:
        raise KmsKekError("the KMS blob does not hold a 32-byte KEK")
    return kek


def rotate_kek(client: Any, old_key_id: str, new_key_id: str, directory: Path) -> None:
    """Re-encrypt the blob under ``new_key_id``; the KEK inside stays the same.

    The new blob is checked to decrypt before it replaces the old one, and the swap
    is a rename, so a failure at any point leaves a blob that opens."""
    path = blob_path(directory)
    blob = _read_blob(path)
    try:
        made = client.re_encrypt(
            CiphertextBlob=blob, SourceKeyId=old_key_id, DestinationKeyId=new_key_id
        )
        new_blob = bytes(made["CiphertextBlob"])
        before = client.decrypt(CiphertextBlob=blob, KeyId=old_key_id)["Plaintext"]
        after = client.decrypt(CiphertextBlob=new_blob, KeyId=new_key_id)["Plaintext"]
    except Exception as exc:  # noqa: BLE001
        raise _error("ReEncrypt", exc) from None
    if before != after:
        raise KmsKekError("KMS re-encryption changed the KEK; the old blob is kept")
    fresh = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    write_secret_file(fresh, new_blob)
    fresh.replace(path)
