"""The serialized form of one KV block, shared by the disk tier (one file per block) and the remote tier (one
object per block): the same bytes, the same checks.

Record = 48-byte header + key + [keyed tag] + payload::

    magic "LSQKVBLK" | u16 format version | u16 header size | 16 B fingerprint digest | u32 key length
    | u64 payload bytes | u32 crc32(payload) | u32 crc32(header fields before it + key)

With ``auth_key_file`` (``trust.py``) the format version is 2 and a 32-byte keyed tag (HMAC-SHA256 over the header,
key and payload) sits between the key and the payload; a reader with a key serves only records whose tag it
verifies, a reader without one checks both versions by their CRC (it trusts where the record came from anyway).

Checksum: ``zlib.crc32``. It is several times faster than blake2b on one core, releases the GIL on large buffers,
and is made for accidental corruption (torn or truncated records, flipped bits), not an adversary (that is the
tag's job). The header has its own crc, so a flipped header byte is caught before the payload is read, and the
payload size is checked against what the reader expects before anything is allocated for it.
No pickle anywhere: the header is ``struct``.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

from .trust import TAG_SIZE, AuthFailure, BlockAuth

MAGIC = b"LSQKVBLK"
FORMAT_VERSION = 1
TAGGED_VERSION = 2  # a keyed tag follows the key
HEADER = struct.Struct("<8sHH16sIQII")  # see module docstring
HEADER_SIZE = HEADER.size  # 48
MAX_KEY_BYTES = 1 << 16


class BlockCheckError(Exception):
    """A block record failed a check; the message names which one."""


@dataclass(frozen=True)
class BlockHeader:
    digest: bytes
    key: bytes
    payload_nbytes: int
    payload_crc: int
    tag: bytes | None = None  # format version 2 only
    signed: bytes = b""  # the header and key bytes as read: what the tag covers with the payload

    @property
    def file_size(self) -> int:
        """Bytes of the whole record (header, key, tag, payload)."""
        return HEADER_SIZE + len(self.key) + len(self.tag or b"") + self.payload_nbytes


def encode_header(digest: bytes, key: bytes, payload_nbytes: int, payload_crc: int,
                  version: int = FORMAT_VERSION) -> bytes:
    """The header and key bytes of a record (what the keyed tag signs, with the payload)."""
    head = HEADER.pack(MAGIC, version, HEADER_SIZE, digest, len(key), payload_nbytes, payload_crc, 0)
    header_crc = zlib.crc32(key, zlib.crc32(head[:-4]))
    return head[:-4] + struct.pack("<I", header_crc) + key


def encode_record(digest: bytes, key: bytes, payload: memoryview, auth: BlockAuth | None) -> list:
    """The record of one block as chunks to write in order: [header + key, (tag), payload]; the payload chunk is
    ``payload`` itself (no copy). Tagged (format version 2) when ``auth`` is given."""
    header = encode_header(digest, key, len(payload), zlib.crc32(payload),
                           FORMAT_VERSION if auth is None else TAGGED_VERSION)
    return [header, payload] if auth is None else [header, auth.tag(header, payload), payload]


def record_size(key: bytes, payload_nbytes: int, tagged: bool) -> int:
    """Bytes of the record of a ``payload_nbytes`` block under ``key``."""
    return HEADER_SIZE + len(key) + (TAG_SIZE if tagged else 0) + payload_nbytes


def read_header(f, file_size: int, payload_nbytes: int | None = None, max_payload: int | None = None) -> BlockHeader:
    """Read and check the header + key (+ tag) from a binary file object at offset 0. Raises BlockCheckError.

    payload_nbytes: the exact payload size a block must have here; max_payload: an upper bound when that is unknown.
    Both are checked before the caller allocates anything for the payload."""
    raw = f.read(HEADER_SIZE)
    if len(raw) != HEADER_SIZE:
        raise BlockCheckError(f"truncated header ({len(raw)} of {HEADER_SIZE} bytes)")
    magic, version, hsize, digest, key_len, nbytes, payload_crc, header_crc = HEADER.unpack(raw)
    if magic != MAGIC:
        raise BlockCheckError("bad magic")
    if version not in (FORMAT_VERSION, TAGGED_VERSION) or hsize != HEADER_SIZE:
        raise BlockCheckError(f"unknown format version {version} / header size {hsize}")
    if key_len > MAX_KEY_BYTES:
        raise BlockCheckError(f"key length {key_len} too large")
    key = f.read(key_len)
    if len(key) != key_len:
        raise BlockCheckError("truncated key")
    if zlib.crc32(key, zlib.crc32(raw[:-4])) != header_crc:
        raise BlockCheckError("header checksum mismatch")
    if payload_nbytes is not None and nbytes != payload_nbytes:
        raise BlockCheckError(f"payload is {nbytes} bytes, a block here has {payload_nbytes}")
    if max_payload is not None and nbytes > max_payload:
        raise BlockCheckError(f"payload of {nbytes} bytes is larger than the whole cache ({max_payload} bytes)")
    tag = None
    if version == TAGGED_VERSION:
        tag = f.read(TAG_SIZE)
        if len(tag) != TAG_SIZE:
            raise BlockCheckError("truncated tag")
    header = BlockHeader(digest, key, nbytes, payload_crc, tag, raw + key)
    if file_size != header.file_size:
        raise BlockCheckError(f"file is {file_size} bytes, header says {header.file_size}")
    return header


def check_identity(header: BlockHeader, digest: bytes, key: bytes, auth: BlockAuth | None) -> None:
    """The record is the block asked for (fingerprint and key), and tagged when the reader has a key (refused
    before its payload is read). Raises BlockCheckError or AuthFailure."""
    if header.digest != digest:
        raise BlockCheckError(f"written for another fingerprint ({header.digest.hex()}, ours {digest.hex()})")
    if header.key != key:
        raise BlockCheckError("key mismatch")
    if auth is not None and header.tag is None:
        raise AuthFailure("block has no tag (written without auth_key_file)")


def check_payload(header: BlockHeader, payload: memoryview, auth: BlockAuth | None) -> None:
    """The payload matches the header: the keyed tag with a key (it also catches what the CRC would), else the
    CRC. Raises AuthFailure or BlockCheckError."""
    if auth is not None:
        auth.check(header.signed, header.tag, payload)
    elif zlib.crc32(payload) != header.payload_crc:
        raise BlockCheckError("payload checksum mismatch")


def parse_record(record, digest: bytes, key: bytes, auth: BlockAuth | None, payload_nbytes: int | None = None,
                 max_payload: int | None = None) -> memoryview:
    """The payload of an in-memory record (bytes-like, e.g. a remote object) once every check passed: header,
    size, fingerprint, key, then the tag or CRC. A view into ``record`` (no copy).
    Raises BlockCheckError or AuthFailure; never anything else for any content of ``record``."""
    view = memoryview(record).cast("B")
    header = read_header(io.BytesIO(view[:HEADER_SIZE + MAX_KEY_BYTES + TAG_SIZE]), len(view), payload_nbytes,
                         max_payload)
    check_identity(header, digest, key, auth)
    payload = view[header.file_size - header.payload_nbytes:]
    check_payload(header, payload, auth)
    return payload
