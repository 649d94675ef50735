"""Cost of ``auth_key_file`` on the KV offload store's disk reads: the keyed tag (HMAC-SHA256) against the CRC.

    python -m benchmarks.bench_kv_tag [--repeats 5] [--total-mib 192]

For each block size (2.9 MB: one SmolLM2-135M block on vLLM CPU, 30 layers x K/V x 3 heads x d64 x 128 tokens,
bf16; and 32 MiB) the same blocks are written into two fresh directories, one by a keyless store and one by a
store with a key, then read back through ``BlockStore.get(key, out=...)`` (DRAM tier off, so every get is a disk
read with its check: CRC without a key, the tag with one). The page cache is warm (the files were just written and
one warm-up pass reads them all), so this measures the check's CPU cost, not the disk. Median of ``--repeats``
passes, ``time.perf_counter``. Also times the hash functions alone on one buffer (crc32, HMAC-SHA256, keyed BLAKE2b),
which is why the tag is HMAC-SHA256. Writes ``results/kv_tag_cost_cpu.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import shutil
import statistics
import tempfile
import time
import zlib

SMOLLM2_BLOCK = 30 * 2 * 3 * 64 * 128 * 2  # 2,949,120 bytes
SIZES = {"smollm2_cpu_block_2.9MB": SMOLLM2_BLOCK, "32MiB": 32 << 20}


def _median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def hash_rates(nbytes: int, repeats: int) -> dict[str, float]:
    """GB/s of each candidate check alone over one ``nbytes`` buffer."""
    data, key = os.urandom(nbytes), os.urandom(32)
    funcs = {"crc32": lambda: zlib.crc32(data), "hmac_sha256": lambda: hmac.new(key, data, hashlib.sha256).digest(),
             "blake2b_keyed": lambda: hashlib.blake2b(data, key=key, digest_size=32).digest()}
    return {name: nbytes / _median_seconds(f, repeats)[0] / 1e9 for name, f in funcs.items()}


def read_rate(root: str, block_nbytes: int, n: int, repeats: int, key_file: str | None) -> dict:
    import torch

    from longseq.kv_offload.store import BlockStore, KVFingerprint

    fp = KVFingerprint(model="bench", layout="tag", dtype="bfloat16", block_size=128)
    gen = torch.Generator().manual_seed(block_nbytes)
    blocks = [torch.randint(0, 256, (block_nbytes,), dtype=torch.uint8, generator=gen) for _ in range(2)]
    keys = [b"bench-%06d" % i for i in range(n)]
    kw = dict(cpu_gib=0, disk_dir=root, disk_gib=(n + 2) * (block_nbytes + 4096) / 2**30, async_disk_writes=False,
              log_interval_s=0, block_nbytes=block_nbytes, auth_key_file=key_file)
    with BlockStore(fp, **kw) as store:
        for i, k in enumerate(keys):
            store.put(k, blocks[i % 2])
    out = torch.empty(block_nbytes, dtype=torch.uint8)
    with BlockStore(fp, **kw) as store:
        def read_all() -> None:
            for k in keys:
                assert store.get(k, out=out) is not None, "a block failed its check"

        median, ts = _median_seconds(read_all, repeats)
        assert torch.equal(out, blocks[(n - 1) % 2])
        s = store.stats(log_summary=False)
        assert s.corrupt_blocks == s.auth_failures == 0
    return {"gbps": n * block_nbytes / median / 1e9, "seconds_each": ts}


def main(argv=None) -> None:
    from benchmarks.common import command_line, environment, write_result

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kv_tag", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--total-mib", type=int, default=192, help="bytes of blocks per size and directory")
    p.add_argument("--name", default="kv_tag_cost_cpu")
    args = p.parse_args(argv)
    out = {"env": environment(), "command": command_line(),
           "inputs": {"repeats": args.repeats, "total_mib_per_size": args.total_mib, "page_cache": "warm",
                      "read_path": "BlockStore.get(key, out=...), DRAM tier off, one thread",
                      "tag": "HMAC-SHA256 (with key) vs zlib.crc32 (without)"},
           "hash_only_gbps": hash_rates(32 << 20, args.repeats), "rows": []}
    print("hash alone, 32 MiB buffer: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in out["hash_only_gbps"].items()))
    tmp = tempfile.mkdtemp(prefix="bench_kv_tag_")
    try:
        key_file = os.path.join(tmp, "key")
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(os.urandom(32).hex())
        for name, nbytes in SIZES.items():
            n = max(2, (args.total_mib << 20) // nbytes)
            row = {"block": name, "block_bytes": nbytes, "blocks": n}
            for mode, kf in (("crc", None), ("tag", key_file)):
                root = os.path.join(tmp, f"{name}_{mode}")
                r = read_rate(root, nbytes, n, args.repeats, kf)
                row[f"{mode}_gbps"], row[f"{mode}_seconds_each"] = r["gbps"], r["seconds_each"]
                shutil.rmtree(root)
            row["tag_over_crc"] = row["tag_gbps"] / row["crc_gbps"]
            out["rows"].append(row)
            print(f"{name:>24} x {n:3d}: without key (crc) {row['crc_gbps']:.2f} GB/s | with auth_key_file (tag) "
                  f"{row['tag_gbps']:.2f} GB/s | ratio {row['tag_over_crc']:.2f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("wrote", write_result(args.name, out))


if __name__ == "__main__":
    main()
