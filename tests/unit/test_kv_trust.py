"""The KV offload disk tier's trust model (issue 17, item 3): modes of what the store creates whatever the umask,
the start-up warning for a directory others can write, and ``auth_key_file`` (keyed block tags: a block written
without our key is a miss, counted and deleted)."""

from __future__ import annotations

import grp
import logging
import os
import re
import stat
import zlib

import pytest
import torch

from kv_fixtures import key_file
from longseq.kv_offload import disk, trust
from longseq.kv_offload.settings import KVConfigError
from longseq.kv_offload.stats import StatsRecorder
from longseq.kv_offload.store import BlockStore, KVFingerprint

FP = KVFingerprint("test-org/tiny", "test:trust", "bfloat16", 16)
BLOCK_BYTES = 4096
KEY = b"trusted-block-0001"


def _block(i: int) -> torch.Tensor:
    return torch.randint(0, 256, (BLOCK_BYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))


def _store(disk_dir, **kw) -> BlockStore:
    kw = {"cpu_gib": 0, "disk_gib": 0.01, "async_disk_writes": False, "log_interval_s": 0} | kw
    return BlockStore(FP, disk_dir=str(disk_dir), block_nbytes=BLOCK_BYTES, **kw)


@pytest.fixture
def umask_000():
    old = os.umask(0)
    yield
    os.umask(old)


def _modes_under(root: str) -> tuple[set[int], set[int]]:
    """(modes of root and every directory below it, modes of every file below it), permission bits only."""
    dirs, files = {stat.S_IMODE(os.stat(root).st_mode)}, set()
    for d, subdirs, names in os.walk(root):
        dirs.update(stat.S_IMODE(os.stat(os.path.join(d, s)).st_mode) for s in subdirs)
        files.update(stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode) for n in names)
    return dirs, files


# ---- modes -------------------------------------------------------------------------------------------------------
def test_private_modes_under_umask_000(tmp_path, umask_000):
    root = tmp_path / "made" / "kv"  # the parent is created by the store too
    with _store(root) as store:
        store.put(KEY, _block(0))
        assert torch.equal(store.get(KEY), _block(0))
    dirs, files = _modes_under(str(root))
    assert dirs == {0o700} and stat.S_IMODE(os.stat(tmp_path / "made").st_mode) == 0o700
    assert files == {0o600} and len(os.listdir(root / "fingerprints")) == 1  # block files and the sidecar


def test_shared_group_modes_under_umask_000(tmp_path, umask_000):
    root = tmp_path / "kv"
    with _store(root, shared_group=True) as store:
        store.put(KEY, _block(0))
    dirs, files = _modes_under(str(root))
    assert dirs == {0o2770} and files == {0o660}  # setgid: new entries keep the directory's group


def test_shared_group_by_name_chowns_to_that_group(tmp_path):
    group = grp.getgrgid(os.getegid()).gr_name
    root = tmp_path / "kv"
    with _store(root, shared_group=group) as store:
        store.put(KEY, _block(0))
    gids = {os.stat(os.path.join(d, n)).st_gid for d, subdirs, names in os.walk(root) for n in names + subdirs}
    assert gids == {os.getegid()}
    with pytest.raises(KVConfigError, match="shared_group='no-such-group-longseq': no such group"):
        _store(tmp_path / "kv2", shared_group="no-such-group-longseq")
    with pytest.raises(KVConfigError, match="shared_group must be true, false or a group name"):
        _store(tmp_path / "kv2", shared_group=1)


def test_existing_planted_file_is_replaced_by_a_keyed_write(tmp_path):
    """A keyed ``put`` over a block file without our tag rewrites it (an untagged file is never just touched)."""
    keyfile = key_file(tmp_path / "key")
    with _store(tmp_path / "kv") as planter:
        planter.put(KEY, _block(66))
    with _store(tmp_path / "kv", auth_key_file=keyfile) as store:
        store.put(KEY, _block(1))
    with _store(tmp_path / "kv", auth_key_file=keyfile) as fresh:
        assert torch.equal(fresh.get(KEY), _block(1)) and fresh.stats().auth_failures == 0


# ---- the start-up warning ------------------------------------------------------------------------------------------
def test_world_writable_dir_warns_once_naming_the_fix(tmp_path, caplog):
    root = tmp_path / "open"
    root.mkdir()
    os.chmod(root, 0o777)
    with caplog.at_level(logging.WARNING, logger="longseq.kv_offload"):
        _store(root).close()
        _store(root).close()  # a second store on the same directory does not repeat it
    warnings = [r.getMessage() for r in caplog.records if "whoever can write it" in r.getMessage()]
    assert len(warnings) == 1
    assert str(root) in warnings[0] and "writable by every user" in warnings[0] and "chmod 700" in warnings[0]


def test_private_or_group_shared_dir_does_not_warn(tmp_path, caplog):
    private, shared = tmp_path / "private", tmp_path / "shared"
    private.mkdir(mode=0o700)
    shared.mkdir()
    os.chmod(shared, 0o770)
    with caplog.at_level(logging.WARNING, logger="longseq.kv_offload"):
        _store(private).close()
        _store(shared, shared_group=True).close()
        _store(tmp_path / "new").close()  # created by the store: 0700
    assert not [r for r in caplog.records if "whoever can write it" in r.getMessage()]
    os.chmod(shared, 0o777)  # group sharing still warns when every user can write
    with caplog.at_level(logging.WARNING, logger="longseq.kv_offload"):
        _store(shared, shared_group=True).close()
    assert [r for r in caplog.records if "whoever can write it" in r.getMessage() and "chmod o-w" in r.getMessage()]


# ---- the key file ----------------------------------------------------------------------------------------------
def _bad_key_files(tmp_path) -> dict:
    good = key_file(tmp_path / "good")
    os.symlink(good, tmp_path / "link")
    os.mkfifo(tmp_path / "fifo", 0o600)
    (tmp_path / "dir").mkdir(mode=0o700)
    return {"does not exist": str(tmp_path / "missing"), "is a symlink": str(tmp_path / "link"),
            "is not a regular file": str(tmp_path / "fifo"), "is not a regular file (mode d": str(tmp_path / "dir"),
            "is empty": key_file(tmp_path / "empty", b""), "is empty: ": key_file(tmp_path / "blank", b" \n"),
            "holds 5 bytes": key_file(tmp_path / "short", b"short"),
            "a key file holds at most 4096": key_file(tmp_path / "big", b"k" * 4097),
            "accessible by group or others": key_file(tmp_path / "group", mode=0o640),
            "accessible by group or others (mode -rw----r--)": key_file(tmp_path / "other", mode=0o604)}


@pytest.mark.timeout(30)
def test_bad_key_files_stop_the_store_naming_auth_key_file(tmp_path):
    for why, path in _bad_key_files(tmp_path).items():
        with pytest.raises(KVConfigError, match=re.escape(f"auth_key_file='{path}' ") + ".*" + re.escape(why)):
            _store(tmp_path / "kv", auth_key_file=path)
    with pytest.raises(KVConfigError, match="auth_key_file must be a non-empty path"):
        _store(tmp_path / "kv", auth_key_file="")


def test_group_readable_key_is_allowed_with_shared_group_only(tmp_path):
    path = key_file(tmp_path / "key", mode=0o640)
    with pytest.raises(KVConfigError, match="auth_key_file.*chmod 600"):
        _store(tmp_path / "kv", auth_key_file=path)
    _store(tmp_path / "kv", auth_key_file=path, shared_group=True).close()
    os.chmod(path, 0o660)  # group-writable: a group member could swap the key
    with pytest.raises(KVConfigError, match="auth_key_file.*accessible by others.*chmod 640"):
        _store(tmp_path / "kv", auth_key_file=path, shared_group=True)


def test_key_file_whitespace_does_not_change_the_key(tmp_path):
    assert trust.load_key(key_file(tmp_path / "a", b"0123456789abcdef0123\n")) == \
        trust.load_key(key_file(tmp_path / "b", b"0123456789abcdef0123"))


# ---- keyed tags ------------------------------------------------------------------------------------------------
def test_planted_block_without_tag_is_a_miss_and_deleted(tmp_path):
    """A block with valid fingerprint and CRCs, as anyone who can write the directory can make, is not served."""
    with _store(tmp_path / "kv") as planter:  # no key: today's format, every public check passes
        planter.put(KEY, _block(66))
        path = planter._disk.path_for(KEY)
    with _store(tmp_path / "kv", auth_key_file=key_file(tmp_path / "key")) as store:
        assert store.contains(KEY) is False  # refused by the header alone, before any payload read
        assert not os.path.exists(path)
        planter_again = _store(tmp_path / "kv")
        planter_again.put(KEY, _block(66))
        planter_again.close()
        assert store.get(KEY) is None and store.fetch_prefix_to_dram([KEY]) == 0
        assert not os.path.exists(path) and store.stats().auth_failures == 2 and store.stats().corrupt_blocks == 0


def test_block_tagged_with_another_key_is_a_miss(tmp_path):
    with _store(tmp_path / "kv", auth_key_file=key_file(tmp_path / "other")) as other:
        other.put(KEY, _block(1))
        path = other._disk.path_for(KEY)
    with _store(tmp_path / "kv", auth_key_file=key_file(tmp_path / "ours")) as store:
        assert store.contains(KEY) is True  # a tag is there: only the payload read can check it
        assert store.get(KEY) is None and store.stats().auth_failures == 1 and not os.path.exists(path)


def test_block_with_our_key_is_a_hit_with_exact_bytes_after_a_restart(tmp_path):
    keyfile = key_file(tmp_path / "key")
    with _store(tmp_path / "kv", auth_key_file=keyfile) as store:
        for i in range(3):
            store.put(b"k%d" % i, _block(i))
    with open(_store(tmp_path / "kv")._disk.path_for(b"k0"), "rb") as f:
        assert disk.HEADER.unpack(f.read(disk.HEADER_SIZE))[1] == disk.TAGGED_VERSION
    with _store(tmp_path / "kv", auth_key_file=keyfile, cpu_gib=0.01) as fresh:
        assert fresh.fetch_prefix_to_dram([b"k0", b"k1", b"k2"]) == 3  # disk -> DRAM promotion checks the tag
        assert all(torch.equal(fresh.get(b"k%d" % i), _block(i)) for i in range(3))
        assert fresh.stats().disk.hits == 3 and fresh.stats().auth_failures == 0


@pytest.mark.parametrize("where", ["tag", "payload", "header"])
def test_altered_tagged_block_is_a_miss(tmp_path, where):
    keyfile = key_file(tmp_path / "key")
    with _store(tmp_path / "kv", auth_key_file=keyfile) as store:
        store.put(KEY, _block(2))
        path = store._disk.path_for(KEY)
    offset = {"tag": disk.HEADER_SIZE + len(KEY) + 3, "payload": os.path.getsize(path) - 7, "header": 30}[where]
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    with _store(tmp_path / "kv", auth_key_file=keyfile) as store:
        assert store.get(KEY) is None and not os.path.exists(path)
        s = store.stats()
        assert (s.corrupt_blocks, s.auth_failures) == ((1, 0) if where == "header" else (0, 1))


def test_keyless_store_reads_todays_format_and_tagged_blocks(tmp_path):
    """Without a key nothing changes: a file written in today's format (built here byte by byte) is a hit, and
    a tagged block is read by its CRC (a keyless store trusts the directory)."""
    with _store(tmp_path / "kv") as store:
        path = store._disk.path_for(KEY)
        payload = _block(3).numpy().tobytes()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(disk.encode_header(FP.digest(), KEY, len(payload), zlib.crc32(payload)) + payload)
        assert torch.equal(store.get(KEY), _block(3))
        store.put(b"new", _block(4))
        with open(store._disk.path_for(b"new"), "rb") as f:
            assert disk.HEADER.unpack(f.read(disk.HEADER_SIZE))[1] == disk.FORMAT_VERSION
    with _store(tmp_path / "kv", auth_key_file=key_file(tmp_path / "key")) as keyed:
        keyed.put(b"tagged", _block(5))
    with _store(tmp_path / "kv") as store:
        assert torch.equal(store.get(b"tagged"), _block(5)) and store.stats().corrupt_blocks == 0


def test_scheduler_index_probes_need_a_tag_with_a_key(tmp_path):
    """``KeyIndexHits`` (tensor parallelism) counts a disk block only when its header carries a tag."""
    from longseq.kv_offload.vllm_hits import KeyIndexHits, RankInfo

    keyfile = key_file(tmp_path / "key")
    with _store(tmp_path / "kv") as planter:
        planter.put(b"planted", _block(6))
    with _store(tmp_path / "kv", auth_key_file=keyfile) as store:
        store.put(b"ours", _block(7))
    policy = trust.trust_policy("test", False, keyfile)
    hits = KeyIndexHits([RankInfo(0, FP.to_json(), 0, BLOCK_BYTES)], str(tmp_path / "kv"), 0.01, policy)
    assert hits.count([b"ours"]) == 1 and hits.count([b"planted"]) == 0
    assert hits.rec.snapshot().auth_failures == 1


def test_kv_stats_cli_reads_tagged_blocks(tmp_path):
    from longseq.kv_offload import disk_stats

    with _store(tmp_path / "kv", auth_key_file=key_file(tmp_path / "key")) as store:
        store.put(KEY, _block(8))
    summary = disk_stats.scan(str(tmp_path / "kv"), verify=True)
    assert summary["blocks"] == 1 and not summary["corrupt"]


def test_disk_tier_defaults_stay_private(tmp_path, umask_000):
    """The framework-free ``DiskTier`` (used directly by the scheduler's probes) creates private entries too."""
    disk.DiskTier(str(tmp_path / "kv"), FP, 1 << 20, StatsRecorder())
    dirs, files = _modes_under(str(tmp_path / "kv"))
    assert dirs == {0o700} and files == {0o600}
