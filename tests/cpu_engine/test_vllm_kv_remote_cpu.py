"""Two vLLM CPU servers share KV blocks through a real Mooncake Store (the remote tier), with faults.

Phases (loopback only; the test starts and stops the master and every server):
  A        OpenAI server A (connector, its own DRAM and disk dirs, the remote tier) answers four prompts and keeps
           running: a Mooncake object lives in the segment of the client that holds it, so A's memory is the pool.
           The test waits until every full block of the prompts is in the store (a plain Mooncake client asks).
  damage   through a plain client, as anyone who can reach the master could: block 0 of CORRUPT gets one payload
           byte flipped, block 0 of FOREIGN is replaced by the same bytes recorded for another model (fingerprint).
  B        server B, a separate process with empty DRAM and disk dirs, answers CLEAN (its prefix comes from the
           remote tier), CORRUPT and FOREIGN (failed checks: misses, recomputed); then the master is killed and B
           answers LATE, which A had saved: the remote calls fail within their time limit, B recomputes.
  C        after the master is gone, a server that requires the tier stops at start-up with an error naming
           ``remote.master``; with ``remote_optional`` it serves without the tier.
Comparison with A's answers: prompts that load nothing run exactly A's schedule, so their tokens are identical.
CLEAN's prefill after the load runs other GEMM shapes, which may flip a greedy near-tie of A's run
(``compare_greedy``); KV served from a damaged record would part far from any tie.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from engine_utils import ApiServer, EngineRunError, compare_greedy
from kv_fixtures import BLOCK, block_keys, kv_config, our_fingerprint, raw_mooncake_client

from longseq.kv_offload.block_format import HEADER_SIZE, encode_record
from longseq.kv_offload.mooncake_local import LocalMaster
from longseq.kv_offload.remote import remote_name
from longseq.models.prompts import make_prompts

MAX_TOKENS = 8
LENGTHS = [1500, 700, 700, 700]  # the issue's ~1.5K-token prompt, then three short ones for the faults
CLEAN, CORRUPT, FOREIGN, LATE = range(4)
SERVER_ARGS = ["--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
               "--enable-prefix-caching", "--shutdown-timeout", "60"]
#: remote tier of every server: A's segment holds the pool (~30 blocks of 2.9 MiB); timeout_s bounds each call
REMOTE = {"kind": "mooncake", "segment_gib": 0.25, "buffer_gib": 0.0625, "timeout_s": 1.0}


def start_server(model: str, kv: dict, log_path: str) -> ApiServer:
    server = ApiServer(model, {}, [*SERVER_ARGS, "--kv-transfer-config", json.dumps(kv)], log_path)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def wait_until_stored(client, names: list[str], timeout_s: float = 60) -> None:
    """A's write-through is asynchronous: wait (bounded) until every object exists."""
    deadline = time.monotonic() + timeout_s
    missing = names
    while missing and time.monotonic() < deadline:
        missing = [n for n in missing if client.is_exist(n) != 1]
        time.sleep(0.2)
    assert not missing, f"{len(missing)} of {len(names)} blocks not in the remote store after {timeout_s} s"


def damage_remote(client, fp, prompts: list[list[int]]) -> None:
    """Block 0 of CORRUPT: one payload byte flipped. Block 0 of FOREIGN: its own payload, recorded by another
    model's fingerprint, under our name."""
    import dataclasses

    for which in (CORRUPT, FOREIGN):
        key = block_keys(prompts[which])[0]
        name = remote_name(fp.digest(), key)
        record = bytearray(client.get(name))
        assert len(record) > HEADER_SIZE + len(key), len(record)
        if which == CORRUPT:
            record[-100] ^= 0xFF
        else:
            payload = np.frombuffer(bytes(record[HEADER_SIZE + len(key):]), dtype=np.uint8)
            other = dataclasses.replace(fp, model="another-model")
            record = b"".join(bytes(c) for c in encode_record(other.digest(), key, memoryview(payload), None))
        assert client.remove(name, True) == 0
        assert client.put(name, bytes(record)) == 0


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    return make_prompts(AutoTokenizer.from_pretrained(smollm2_path), LENGTHS, seed=11)


@pytest.fixture(scope="module")
def shared(smollm2_path, prompts, tmp_path_factory):
    """Runs every phase once; returns each server's answers and stats."""
    tmp = tmp_path_factory.mktemp("kv-remote")
    master = LocalMaster(tmp)
    master.start()
    remote = {**REMOTE, "master": master.address}
    res: dict = {}
    a = client = None
    try:
        a = start_server(smollm2_path, kv_config(str(tmp / "a-kv"), str(tmp / "a-stats.json"), remote=remote),
                         str(tmp / "a.log"))
        res["a"] = a.ask_greedy(smollm2_path, prompts, MAX_TOKENS)
        fp = our_fingerprint(str(tmp / "a-kv"))
        client = raw_mooncake_client(master)
        wait_until_stored(client, [remote_name(fp.digest(), k) for p in prompts for k in block_keys(p)])
        damage_remote(client, fp, prompts)

        b = start_server(smollm2_path, kv_config(str(tmp / "b-kv"), str(tmp / "b-stats.json"), remote=remote),
                         str(tmp / "b.log"))
        try:
            res["b"] = b.ask_greedy(smollm2_path, [prompts[i] for i in (CLEAN, CORRUPT, FOREIGN)], MAX_TOKENS)
            res["b_before_kill"] = json.load(open(tmp / "b-stats.json"))
            client.close()
            client = None
            master.stop()
            t0 = time.monotonic()
            res["b_late"] = b.ask_greedy(smollm2_path, [prompts[LATE]], MAX_TOKENS)
            res["b_late_seconds"] = time.monotonic() - t0
        finally:
            b.stop(timeout=90)
        res["b_stats"] = json.load(open(tmp / "b-stats.json"))

        with pytest.raises(EngineRunError) as refused:
            start_server(smollm2_path, kv_config(str(tmp / "c-kv"), str(tmp / "c-stats.json"), remote=remote),
                         str(tmp / "c-refused.log"))
        res["c_refused_log"] = refused.value.log
        c = start_server(smollm2_path, kv_config(str(tmp / "c-kv"), str(tmp / "c-stats.json"), remote=remote,
                                                 remote_optional=True), str(tmp / "c.log"))
        try:
            res["c"] = c.ask_greedy(smollm2_path, [prompts[CLEAN]], MAX_TOKENS)
        finally:
            c.stop(timeout=90)
        res["c_stats"] = json.load(open(tmp / "c-stats.json"))
        res["c_log"] = (tmp / "c.log").read_text(errors="replace")
    finally:
        if client is not None:
            client.close()
        if a is not None:
            a.stop(timeout=90)
        master.stop()
    res["a_stats"] = json.load(open(tmp / "a-stats.json"))
    return res


def picked(out: dict, which: list[int]) -> dict:
    return {k: [out[k][i] for i in which] for k in ("tokens", "logprobs", "texts")}


@pytest.mark.engine
def test_server_b_loads_the_prefix_server_a_computed_from_the_remote_store(shared):
    a_stats, b = shared["a_stats"], shared["b_before_kill"]
    assert a_stats["store"]["remote"]["puts"] == sum(n // BLOCK for n in LENGTHS), a_stats["store"]["remote"]
    # CLEAN: every block but the one holding its last token; CORRUPT and FOREIGN fail at block 0 (misses)
    assert b["loaded_tokens"] == (LENGTHS[CLEAN] - 1) // BLOCK * BLOCK, b
    assert b["load_failed_blocks"] == 0
    remote = b["store"]["remote"]
    # a prefix's records are read in parallel, so CORRUPT's and FOREIGN's good blocks 1-4 were read too (unused)
    good_behind_bad = 2 * (LENGTHS[CORRUPT] // BLOCK - 1)
    assert remote["hits"] == (LENGTHS[CLEAN] - 1) // BLOCK + good_behind_bad and remote["failed_checks"] == 2, remote
    assert remote["errors"] == 0 and remote["up"] is True
    assert b["store"]["disk_hits"] == 0  # B's own tiers started empty: the hits came from the remote store
    report = compare_greedy(picked(shared["a"], [CLEAN]), {"tokens": shared["b"]["tokens"][:1],
                                                          "logprobs": shared["b"]["logprobs"][:1]})
    assert report["max_logprob_diff"] < 0.2, report


@pytest.mark.engine
def test_damaged_and_foreign_remote_records_are_recomputed_with_identical_tokens(shared):
    for i, which in ((1, CORRUPT), (2, FOREIGN)):
        assert shared["b"]["tokens"][i] == shared["a"]["tokens"][which], which
        assert shared["b"]["texts"][i] == shared["a"]["texts"][which]


@pytest.mark.engine
def test_a_master_killed_mid_run_costs_misses_and_the_answer_stays_correct(shared):
    assert shared["b_late"]["tokens"][0] == shared["a"]["tokens"][LATE]
    s = shared["b_stats"]
    assert s["loaded_tokens"] == shared["b_before_kill"]["loaded_tokens"]  # nothing more came from anywhere
    remote = s["store"]["remote"]
    assert remote["errors"] >= 1 and remote["up"] is False, remote
    assert shared["b_late_seconds"] < 60, shared["b_late_seconds"]  # calls time out; no stall


@pytest.mark.engine
def test_after_the_master_is_gone_a_new_server_refuses_to_start_or_serves_without_the_tier(shared):
    assert "remote.master=" in shared["c_refused_log"] and "not reachable" in shared["c_refused_log"]
    assert shared["c"]["tokens"][0] == shared["a"]["tokens"][CLEAN]
    assert shared["c_stats"]["loaded_tokens"] == 0 and "remote" not in shared["c_stats"]["store"]
    assert "serving without the remote tier" in shared["c_log"]
