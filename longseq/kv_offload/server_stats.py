"""``longseq kv stats --server FILE``: a running server's KV store counters, per tier, the remote tier included.

FILE is the stats file a server keeps up to date (the vLLM connector's ``stats_path``; with tensor parallelism each
rank writes ``<stats_path>.tp<rank>`` and the scheduler ``stats_path``). Read-only; standard library only.
"""

from __future__ import annotations

import json
import sys
import time


def describe(doc: dict, now: float | None = None) -> list[str]:
    """The lines printed for one stats file's content (missing counters print as 0, so older files still read)."""
    now = time.time() if now is None else now
    age = f", written {now - doc['time']:.0f} s ago" if isinstance(doc.get("time"), (int, float)) else ""
    rank = f", rank {doc['rank']}" if "rank" in doc else f", {doc['ranks']} ranks" if "ranks" in doc else ""
    lines = [f"server pid {doc.get('pid', '?')}{rank}{age}",
             f"  scheduler: {doc.get('lookups', 0)} lookups, {doc.get('hit_tokens', 0)} hit tokens, "
             f"{doc.get('miss_tokens', 0)} miss tokens"]
    store = doc.get("store")
    if not isinstance(store, dict):
        return lines + ["  store: not in this file (a scheduler's file: see each rank's <stats_path>.tp<rank>)"]
    s = {k: store.get(k, 0) for k in ("dram_hits", "dram_blocks", "disk_hits", "disk_misses", "disk_blocks_written",
                                      "disk_read_gbps", "corrupt_blocks", "bad_files", "auth_failures",
                                      "lookup_errors", "read_errors", "write_errors", "dropped_writes")}
    lines += [f"  dram: {s['dram_hits']} hits, holds {s['dram_blocks']} blocks",
              f"  disk: {s['disk_hits']} hits, {s['disk_misses']} misses, {s['disk_blocks_written']} blocks written, "
              f"read {s['disk_read_gbps']:.2f} GB/s",
              f"  disk faults: {s['corrupt_blocks']} corrupt, {s['bad_files']} bad files, {s['auth_failures']} auth "
              f"failures, {s['read_errors']} read errors, {s['write_errors']} write errors, {s['dropped_writes']} "
              f"dropped writes; lookup errors {s['lookup_errors']}"]
    remote = store.get("remote")
    if not isinstance(remote, dict):
        return lines + ["  remote: off"]
    r = {k: remote.get(k, 0) for k in ("puts", "put_dropped", "lookups", "hits", "misses", "failed_checks",
                                       "errors", "read_gbps")}
    lines.append(f"  remote: {'up' if remote.get('up') else 'DOWN'}, {r['puts']} blocks put, {r['put_dropped']} "
                 f"puts dropped, {r['lookups']} lookups, {r['hits']} hits, {r['misses']} misses, "
                 f"{r['failed_checks']} failed checks, {r['errors']} errors, read {r['read_gbps']:.2f} GB/s")
    return lines


def run(path: str, as_json: bool = False) -> int:
    """Print the counters in ``path``; exit status 0, or 2 if the file cannot be read as a stats file."""
    try:
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        print(f"longseq kv stats: {path} is not a readable server stats file ({e})", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=1) if as_json else "\n".join(describe(doc)))
    return 0
