"""Property-based tests of the KV offload disk tier (issue 17, item 5): random header fields, truncations, byte flips,
random garbage, keys and payloads, with and without ``auth_key_file``.

Invariant: every lookup returns a miss or exactly the bytes that were put, never raises and never hangs.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import torch  # noqa: E402

from kv_fixtures import key_file  # noqa: E402
from longseq.kv_offload import disk  # noqa: E402
from longseq.kv_offload.store import BlockStore, KVFingerprint  # noqa: E402

FP = KVFingerprint("test-org/tiny", "test:properties", "bfloat16", 16)
SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
CAP_GIB = 0.001  # ~1 MiB: with an unknown block size, the cap bounds what a header may claim

keys = st.binary(min_size=1, max_size=80)
payloads = st.binary(min_size=1, max_size=6000)
secrets = st.binary(min_size=16, max_size=64).filter(lambda b: b.strip() == b and b.strip())
auth = st.booleans()
known_size = st.booleans()


def _store(root: str, key_path: str | None, block_nbytes: int | None, cpu_gib: float = 0) -> BlockStore:
    return BlockStore(FP, cpu_gib=cpu_gib, disk_dir=root, disk_gib=CAP_GIB, async_disk_writes=False,
                      log_interval_s=0, block_nbytes=block_nbytes, auth_key_file=key_path)


def _key_path(tmp: str, secret: bytes | None) -> str | None:
    return key_file(os.path.join(tmp, "key"), secret) if secret is not None else None


def _put(root: str, key_path: str | None, key: bytes, payload: bytes, block_nbytes: int | None) -> str:
    """Write one block through the store; returns its file's path."""
    with _store(root, key_path, block_nbytes) as store:
        store.put(key, torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        return store._disk.path_for(key)


def _assert_miss_or_exact(store: BlockStore, key: bytes, payload: bytes, size: int | None) -> bool:
    """Every lookup entry point: a miss or the exact payload, never an exception. Returns whether ``get`` hit."""
    want = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    store.contains(key)
    store.count_prefix_hits([key])
    assert store.fetch_prefix_to_dram([key]) in (0, 1)
    got = store.get(key)
    assert got is None or torch.equal(got, want)
    out = torch.empty(size or len(payload), dtype=torch.uint8)
    got_out = store.get(key, out=out)
    assert got_out is None or (got_out is out and torch.equal(out, want))
    return got is not None


def _written(tmp: str, secret: bytes | None, key: bytes, payload: bytes, known: bool):
    """A block put through a store in ``tmp``: (key file, block size or None, cache root, block file path)."""
    key_path, size, root = _key_path(tmp, secret), len(payload) if known else None, os.path.join(tmp, "kv")
    return key_path, size, root, _put(root, key_path, key, payload, size)


def _reread(root: str, key_path: str | None, key: bytes, payload: bytes, block_nbytes: int | None) -> bool:
    with _store(root, key_path, block_nbytes) as store:
        return _assert_miss_or_exact(store, key, payload, block_nbytes)


@pytest.mark.timeout(120)
@SETTINGS
@given(key=keys, payload=payloads, secret=st.none() | secrets, known=known_size)
def test_round_trip_returns_exact_bytes(key, payload, secret, known):
    with tempfile.TemporaryDirectory() as tmp:
        key_path, size = _key_path(tmp, secret), len(payload) if known else None
        root = os.path.join(tmp, "kv")
        _put(root, key_path, key, payload, size)
        assert _reread(root, key_path, key, payload, size)
        with _store(root, key_path, size, cpu_gib=0.01) as store:  # disk -> DRAM promotion, then a DRAM hit
            assert store.fetch_prefix_to_dram([key]) == 1 and store.in_dram(key)
            assert torch.equal(store.get(key), torch.frombuffer(bytearray(payload), dtype=torch.uint8))


@pytest.mark.timeout(120)
@SETTINGS
@given(key=keys, payload=payloads, writer=st.none() | secrets, reader=st.none() | secrets, same=st.booleans(),
       known=known_size)
def test_other_keys_never_serve_a_block(key, payload, writer, reader, same, known):
    """Written with one key (or none) and read with another (or none): a hit only if the reader has no key (it
    trusts the directory) or the same key; either way never other bytes."""
    reader = writer if same else reader
    with tempfile.TemporaryDirectory() as tmp:
        size, root = len(payload) if known else None, os.path.join(tmp, "kv")
        _put(root, key_file(os.path.join(tmp, "w"), writer) if writer else None, key, payload, size)
        reader_path = key_file(os.path.join(tmp, "r"), reader) if reader else None
        hit = _reread(root, reader_path, key, payload, size)
        assert hit == (reader is None or reader == writer)


@pytest.mark.timeout(120)
@SETTINGS
@given(key=keys, payload=payloads, secret=st.none() | secrets, known=known_size, data=st.data())
def test_truncated_block_is_a_miss(key, payload, secret, known, data):
    with tempfile.TemporaryDirectory() as tmp:
        key_path, size, root, path = _written(tmp, secret, key, payload, known)
        length = data.draw(st.integers(0, os.path.getsize(path) - 1), label="length")
        os.truncate(path, length)
        assert not _reread(root, key_path, key, payload, size)


@pytest.mark.timeout(120)
@SETTINGS
@given(key=keys, payload=payloads, secret=st.none() | secrets, known=known_size, data=st.data())
def test_flipped_bytes_are_a_miss_or_exact(key, payload, secret, known, data):
    """Any changed byte (header, key, tag or payload) is a miss; flips that cancel out leave the exact block."""
    with tempfile.TemporaryDirectory() as tmp:
        key_path, size, root, path = _written(tmp, secret, key, payload, known)
        original = open(path, "rb").read()
        raw = bytearray(original)
        flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1,
                                   max_size=4), label="flips")
        for pos, xor in flips:
            raw[pos] ^= xor
        with open(path, "wb") as f:
            f.write(raw)
        assert _reread(root, key_path, key, payload, size) == (bytes(raw) == original)


def _header_fields():
    u16, u32, u64 = st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
    return st.fixed_dictionaries({
        "magic": st.sampled_from([disk.MAGIC]) | st.binary(min_size=8, max_size=8),
        "version": st.sampled_from([disk.FORMAT_VERSION, disk.TAGGED_VERSION]) | u16,
        "hsize": st.sampled_from([disk.HEADER_SIZE]) | u16,
        "digest": st.sampled_from([FP.digest()]) | st.binary(min_size=16, max_size=16),
        "key_len": st.integers(0, 200) | u32, "nbytes": st.integers(0, 10000) | st.sampled_from([1 << 40]) | u64,
        "payload_crc": u32, "fix_header_crc": st.booleans(), "header_crc": u32})


@pytest.mark.timeout(120)
@SETTINGS
@given(key=keys, payload=payloads, secret=st.none() | secrets, known=known_size, fields=_header_fields(),
       tail=st.binary(max_size=256))
def test_random_header_fields_are_a_miss_or_exact(key, payload, secret, known, fields, tail):
    """The valid block's header replaced by random fields (its header CRC made valid half of the time, so the later
    checks are reached), optionally with random bytes appended: never other bytes, never an exception."""
    with tempfile.TemporaryDirectory() as tmp:
        key_path, size, root, path = _written(tmp, secret, key, payload, known)
        raw = open(path, "rb").read()
        head = disk.HEADER.pack(fields["magic"], fields["version"], fields["hsize"], fields["digest"],
                                fields["key_len"], fields["nbytes"], fields["payload_crc"], 0)[:-4]
        rest = raw[disk.HEADER_SIZE:]
        crc = zlib.crc32(rest[:fields["key_len"]], zlib.crc32(head)) if fields["fix_header_crc"] \
            else fields["header_crc"]
        with open(path, "wb") as f:
            f.write(head + struct.pack("<I", crc) + rest + tail)
        _reread(root, key_path, key, payload, size)


@pytest.mark.timeout(120)
@SETTINGS
@given(key=keys, payload=payloads, secret=st.none() | secrets, known=known_size, garbage=st.binary(max_size=4096))
def test_random_garbage_at_the_block_path_is_a_miss(key, payload, secret, known, garbage):
    with tempfile.TemporaryDirectory() as tmp:
        key_path, size, root, path = _written(tmp, secret, key, payload, known)
        with open(path, "wb") as f:
            f.write(garbage)
        assert not _reread(root, key_path, key, payload, size)
