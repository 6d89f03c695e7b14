"""Encrypted objects in the ``DVLT1`` streaming AEAD format.

Modelled on Tink's AES-GCM-HKDF streaming AEAD and age's STREAM, using only
AES-256-GCM and RFC 3394 key wrap from ``cryptography``::

    header  = b"DVLT" | version (1) | segment_size (u32 BE)
              | len(key_id) (u8) | key_id (ASCII)
              | len(wrapped) (u8) | wrapped data key (AES key wrap under the record key)
              | nonce_prefix (7 random bytes)
    segment = AES-256-GCM(data_key, nonce, plaintext[i], aad=header)
    nonce   = nonce_prefix | counter (u32 BE) | last flag (0x00 or 0x01)

Every segment but the last holds exactly ``segment_size`` plaintext bytes; the
last holds 0..segment_size bytes and is the only one with the last flag. So a
flipped byte, a truncation (at or inside a segment), appended bytes, reordered
segments or a header swapped from another object all fail authentication.
Memory is bounded by one segment whatever the object size.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from dropvault.storage.errors import TerminalError
from dropvault.storage.keystore import Keystore, UnknownKeyError
from dropvault.storage.locations import Location

MAGIC = b"DVLT"
VERSION = 1
DEFAULT_SEGMENT = 1024 * 1024
TAG = 16
PREFIX = 7
MAX_SEGMENT = 64 * 1024 * 1024
# SHA-256 (hashlib drops the GIL on large updates) and read-backs run here, beside the
# encryption and writes of the calling thread: on this format's 1 MiB segments the hash
# costs more than AES-GCM, so a large object's hash overlaps its own writes.
HELPERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dropvault-vault")


class IntegrityError(TerminalError):
    """A vault object failed authentication: tampered, truncated, reordered or wrong key."""


@dataclass(frozen=True)
class Header:
    segment_size: int
    key_id: str
    wrapped_key: bytes
    nonce_prefix: bytes
    raw: bytes

    @classmethod
    def new(cls, key_id: str, record_key: bytes, segment_size: int) -> tuple[Header, bytes]:
        data_key = AESGCM.generate_key(bit_length=256)
        wrapped = aes_key_wrap(record_key, data_key)
        kid = key_id.encode("ascii")
        prefix = secrets.token_bytes(PREFIX)
        raw = (
            MAGIC
            + bytes([VERSION])
            + struct.pack(">I", segment_size)
            + bytes([len(kid)])
            + kid
            + bytes([len(wrapped)])
            + wrapped
            + prefix
        )
        return cls(segment_size, key_id, wrapped, prefix, raw), data_key

    @classmethod
    def read(cls, src: IO[bytes]) -> Header:
        fixed = src.read(10)
        if len(fixed) < 10 or fixed[:4] != MAGIC:
            raise IntegrityError("not a DVLT object (bad magic)")
        if fixed[4] != VERSION:
            raise IntegrityError(f"unsupported DVLT version {fixed[4]}")
        (segment_size,) = struct.unpack(">I", fixed[5:9])
        if not 1 <= segment_size <= MAX_SEGMENT:
            raise IntegrityError("DVLT header has an invalid segment size")
        kid = src.read(fixed[9])
        wlen_b = src.read(1)
        if len(kid) != fixed[9] or len(wlen_b) != 1:
            raise IntegrityError("DVLT header is truncated")
        wrapped = src.read(wlen_b[0])
        prefix = src.read(PREFIX)
        if len(wrapped) != wlen_b[0] or len(prefix) != PREFIX:
            raise IntegrityError("DVLT header is truncated")
        try:
            key_id = kid.decode("ascii")
        except UnicodeDecodeError as exc:
            raise IntegrityError("DVLT header has a bad key id") from exc
        raw = fixed + kid + wlen_b + wrapped + prefix
        return cls(segment_size, key_id, wrapped, prefix, raw)

    def nonce(self, counter: int, last: bool) -> bytes:
        return self.nonce_prefix + struct.pack(">I", counter) + (b"\x01" if last else b"\x00")


def _read_full(src: IO[bytes], size: int) -> bytes:
    """Read exactly ``size`` bytes unless the stream ends (remote streams may return short)."""
    parts = []
    remaining = size
    while remaining > 0:
        chunk = src.read(remaining)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


@dataclass(frozen=True)
class Sealed:
    """What :func:`encrypt_stream` wrote."""

    plaintext_bytes: int
    stored_bytes: int
    sha256: str  # of the plaintext


def encrypt_stream(
    src: IO[bytes],
    dst: IO[bytes],
    key_id: str,
    record_key: bytes,
    segment_size: int = DEFAULT_SEGMENT,
    on_segment: Callable[[int], None] | None = None,
) -> Sealed:
    """Encrypt ``src`` into ``dst`` segment by segment, hashing the plaintext on the way."""
    header, data_key = Header.new(key_id, record_key, segment_size)
    aead = AESGCM(data_key)
    digest = hashlib.sha256()
    dst.write(header.raw)
    stored = len(header.raw)
    total = 0
    counter = 0
    hashing: Future[None] | None = None  # the previous segment's hash, on a helper
    current = _read_full(src, segment_size)
    try:
        while True:
            following = _read_full(src, segment_size) if len(current) == segment_size else b""
            last = not following
            if hashing is not None:
                hashing.result()  # one update at a time, in order
            if counter == 0 and last:
                digest.update(current)  # a one-segment object: no hand-off
            else:
                hashing = HELPERS.submit(digest.update, current)
            sealed = aead.encrypt(header.nonce(counter, last), current, header.raw)
            dst.write(sealed)
            stored += len(sealed)
            total += len(current)
            if on_segment is not None:
                on_segment(counter)
            if last:
                break
            counter += 1
            current = following
    finally:
        if hashing is not None:
            hashing.result()
    return Sealed(total, stored, digest.hexdigest())


def decrypt_segments(src: IO[bytes], keystore: Keystore) -> Iterator[bytes]:
    """Yield plaintext segments, authenticating each; raise :class:`IntegrityError` on any fault."""
    header = Header.read(src)
    try:
        record_key = keystore.unwrap(header.key_id)
    except UnknownKeyError as exc:  # a key id no one issued: the header was altered
        raise IntegrityError("DVLT header names an unknown record key") from exc
    try:
        data_key = aes_key_unwrap(record_key, header.wrapped_key)
    except (InvalidUnwrap, ValueError) as exc:
        raise IntegrityError("DVLT data key does not unwrap under its record key") from exc
    aead = AESGCM(data_key)
    full = header.segment_size + TAG
    counter = 0
    current = _read_full(src, full)
    while True:
        if len(current) < TAG:
            raise IntegrityError("DVLT object is truncated (no final segment)")
        following = _read_full(src, full) if len(current) == full else b""
        last = not following
        try:
            plain = aead.decrypt(header.nonce(counter, last), current, header.raw)
        except InvalidTag as exc:
            raise IntegrityError(
                f"DVLT segment {counter} failed authentication (tampered, truncated or reordered)"
            ) from exc
        yield plain
        if last:
            return
        counter += 1
        current = following


class DecryptingReader(io.RawIOBase):
    """A read-only, forward-only file-like view of a decrypted object (bounded memory)."""

    def __init__(self, src: IO[bytes], keystore: Keystore) -> None:
        super().__init__()
        self._src = src
        self._segments = decrypt_segments(src, keystore)
        self._buffer = b""
        self._done = False

    def read(self, size: int | None = -1) -> bytes:
        if size is None:
            size = -1
        while not self._done and (size < 0 or len(self._buffer) < size):
            try:
                self._buffer += next(self._segments)
            except StopIteration:
                self._done = True
        if size < 0:
            out, self._buffer = self._buffer, b""
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._src.close()
        super().close()


class Vault:
    """Encrypted objects stored by name in one :class:`Location`."""

    def __init__(
        self, location: Location, keystore: Keystore, segment_size: int = DEFAULT_SEGMENT
    ) -> None:
        self.location = location
        self.keystore = keystore
        self.segment_size = segment_size

    @staticmethod
    def object_name(object_id: str) -> str:
        """Where an object id lives: fanned out by its first two characters."""
        return f"{object_id[:2]}/{object_id}.dvlt"

    def put(self, name: str, src: IO[bytes], key_id: str, *, fresh: bool = False) -> Sealed:
        """Encrypt ``src`` to ``name``. ``fresh``: a new name nothing reads until cataloged
        (see :meth:`Location.writer`)."""
        record_key = self.keystore.unwrap(key_id)
        with self.location.writer(name, fresh=fresh) as dst:
            return encrypt_stream(src, dst, key_id, record_key, self.segment_size)

    def open(self, name: str) -> DecryptingReader:
        return DecryptingReader(self.location.open(name), self.keystore)

    def digest(self, name: str) -> tuple[int, str]:
        """Decrypt and hash the whole object: ``(plaintext_bytes, sha256)``."""
        digest = hashlib.sha256()
        total = 0
        with self.location.open(name) as src:
            for segment in decrypt_segments(src, self.keystore):
                digest.update(segment)
                total += len(segment)
        return total, digest.hexdigest()

    def verify(self, name: str, sealed: Sealed) -> None:
        """Read back what was written: every segment must authenticate, in order, to the
        length written. A second SHA-256 would add nothing: the tags were made by this
        write under a fresh data key, so only the bytes written can pass them."""
        total = 0
        with self.location.open(name) as src:
            for segment in decrypt_segments(src, self.keystore):
                total += len(segment)
        if total != sealed.plaintext_bytes:
            raise IntegrityError("vault object does not read back as written")

    def key_id(self, name: str) -> str:
        with self.location.open(name) as src:
            return Header.read(src).key_id
