"""``longseq kv stats DIR``: what a disk KV cache directory holds (size, blocks, models seen, bad files).

The directory is its own index: this scans every block file's header (and with ``--verify`` every
payload checksum) and names each fingerprint from its sidecar ``DIR/fingerprints/<digest>.json``.
Read-only: it never deletes or rewrites anything, so it is safe while servers are using the directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from collections import defaultdict

from .disk import TMP_SUFFIX, BlockCheckError, iter_block_files, read_header
from .safe_fs import UnsafeEntryError, open_regular

CHUNK = 4 << 20


def _check_file(path: str, verify: bool) -> tuple[str, int]:
    """(fingerprint digest hex, payload bytes). Raises BlockCheckError / UnsafeEntryError / OSError."""
    fd, st = open_regular(path)  # no symlink followed, and a FIFO cannot hang the scan
    with open(fd, "rb") as f:
        header = read_header(f, st.st_size)
        if verify:
            crc = 0
            while chunk := f.read(CHUNK):
                crc = zlib.crc32(chunk, crc)
            if crc != header.payload_crc:
                raise BlockCheckError("payload checksum mismatch")
    return header.digest.hex(), header.payload_nbytes


def _sidecar(root: str, digest: str) -> dict:
    try:
        with open(os.path.join(root, "fingerprints", digest + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def scan(root: str, verify: bool = False) -> dict:
    """Summary of a cache directory: totals, per-fingerprint counts (with the model/layout/dtype/block size
    from the sidecars), corrupt files (path + reason) and leftover temp files."""
    if not os.path.isdir(os.path.join(root, "blocks")):
        raise FileNotFoundError(f"{root} is not a longseq KV cache directory (no blocks/ folder)")
    per_fp: dict[str, dict] = defaultdict(lambda: {"blocks": 0, "bytes": 0})
    corrupt, temp_files, total_bytes, blocks = [], 0, 0, 0
    for entry in iter_block_files(root):
        try:
            size = entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue  # evicted while we scanned
        if entry.name.endswith(TMP_SUFFIX):
            temp_files += 1
            continue
        total_bytes += size
        blocks += 1
        try:
            digest, _ = _check_file(entry.path, verify)
        except FileNotFoundError:
            continue
        except (BlockCheckError, UnsafeEntryError, OSError) as e:
            corrupt.append({"path": entry.path, "reason": str(e)})
            continue
        per_fp[digest]["blocks"] += 1
        per_fp[digest]["bytes"] += size
    fingerprints = []
    for digest, counts in sorted(per_fp.items(), key=lambda kv: -kv[1]["bytes"]):
        side = _sidecar(root, digest)
        fingerprints.append({"digest": digest, **counts,
                             **{k: side.get(k) for k in ("model", "layout", "dtype", "block_size")}})
    return {"dir": os.path.abspath(root), "total_bytes": total_bytes, "blocks": blocks,
            "fingerprints": fingerprints, "corrupt": corrupt, "temp_files": temp_files,
            "payload_checksums_verified": verify}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", help="disk cache directory (the disk_dir given to the store)")
    parser.add_argument("--verify", action="store_true", help="also read every payload and check its checksum")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--server", metavar="FILE", help="also (or only) a running server's counters per tier, the "
                        "remote tier's included, from the stats file it writes (the vLLM connector's stats_path)")


def run(args: argparse.Namespace) -> int:
    """Print the summary; exit status 0 if clean, 1 if corrupt files were found, 2 if DIR is not a cache."""
    try:
        report = scan(args.dir, verify=args.verify)
    except FileNotFoundError as e:
        print(f"longseq kv stats: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['dir']}: {report['blocks']} blocks, {report['total_bytes'] / 2**30:.3f} GiB"
              f" ({report['total_bytes']} bytes), {len(report['fingerprints'])} fingerprint(s)")
        for fp in report["fingerprints"]:
            print(f"  {fp['digest']}  {fp['blocks']:8d} blocks {fp['bytes'] / 2**20:10.1f} MiB  "
                  f"model={fp['model']} dtype={fp['dtype']} block_size={fp['block_size']}\n"
                  f"      layout={fp['layout']}")
        checked = "headers and payload checksums" if args.verify else "headers (use --verify for payloads)"
        print(f"corrupt files: {len(report['corrupt'])} (checked {checked}); leftover temp files: "
              f"{report['temp_files']}")
        for bad in report["corrupt"][:20]:
            print(f"  {bad['path']}: {bad['reason']}")
    return 1 if report["corrupt"] else 0
