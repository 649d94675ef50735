"""Shared pieces of the KV-offload tests: connector configs, block keys/paths on disk, vLLM cache layouts and
stand-ins for the scheduler's request/step objects (used by the CPU engine, adapter and GPU tests)."""

from __future__ import annotations

import os
import types

BLOCK = 128  # vLLM CPU's default KV block size


def kv_config(disk_dir: str, stats: str, short_name: bool = False, **extra) -> dict:
    cfg = {"kv_connector": "LongSeqOffloadConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"cpu_gib": 0.25, "disk_dir": disk_dir, "disk_gib": 1,
                                         "stats_path": stats, **extra}}
    if not short_name:
        cfg["kv_connector_module_path"] = "longseq.kv_offload.vllm"
    return cfg


def block_keys(prompt: list[int]) -> list[bytes]:
    from longseq.kv_offload.vllm_scheduler import chain_keys, request_seed

    plain = types.SimpleNamespace(mm_features=None, prompt_embeds=None, lora_request=None, cache_salt=None)
    return chain_keys(prompt, BLOCK, len(prompt) // BLOCK, request_seed(plain))


def our_fingerprint(disk_dir: str):
    from longseq.kv_offload.store import KVFingerprint

    (name,) = os.listdir(os.path.join(disk_dir, "fingerprints"))
    return KVFingerprint.from_json(open(os.path.join(disk_dir, "fingerprints", name)).read())


def block_path(disk_dir: str, fp, key: bytes) -> str:
    from longseq.kv_offload.disk import DiskTier
    from longseq.kv_offload.stats import StatsRecorder

    return DiskTier(disk_dir, fp, 1 << 30, StatsRecorder()).path_for(key)


def flip_payload_byte(path: str) -> None:
    """Invert one payload byte of a block file (100 bytes from its end): the header still passes."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def key_file(path, key: bytes | None = None, mode: int = 0o600) -> str:
    """A secret key file for ``auth_key_file`` (random 32 bytes, hex, unless ``key`` is given) with ``mode``."""
    with open(path, "wb") as f:
        f.write(key if key is not None else os.urandom(32).hex().encode() + b"\n")
    os.chmod(path, mode)
    return str(path)


def raw_mooncake_client(master):
    """A plain Mooncake client on ``master`` (a ``LocalMaster``): what anyone who can reach the master can write. It
    adds no memory to the pool (what it puts lands in the other clients' segments). Close it with ``.close()``."""
    from mooncake.store import MooncakeDistributedStore

    client = MooncakeDistributedStore()
    assert client.setup("127.0.0.1", "P2PHANDSHAKE", 0, 16 << 20, "tcp", "", master.address) == 0
    return client


def unit_store(tmp_path=None):
    from longseq.kv_offload.store import BlockStore, KVFingerprint

    fp = KVFingerprint(model="unit", layout="test", dtype="bfloat16", block_size=16)
    return BlockStore(fp, cpu_gib=0.01, disk_dir=str(tmp_path) if tmp_path else None, disk_gib=0.01)


#: Per-layer KV cache layouts as vLLM builds them: (logical shape with B = num_blocks, stride order).
#: vLLM allocates ``[logical[i] for i in order]`` contiguously and hands out ``.permute(inverse(order))``.
#: fa026_nhd is vLLM 0.26's FLASH_ATTN default on CUDA (logical [B, H, N, 2D], memory [B, N, H, 2D]);
#: fa026_hnd its HND variant; cpu is vLLM CPU's [B, H, N, 2D]; kv_first the older [2, B, N, H, D] layout.
LAYOUTS = {
    "fa026_nhd": (lambda B, N, H, D: (B, H, N, 2 * D), (0, 2, 1, 3)),
    "fa026_hnd": (lambda B, N, H, D: (B, H, N, 2 * D), (0, 1, 2, 3)),
    "cpu": (lambda B, N, H, D: (B, H, N, 2 * D), (0, 1, 2, 3)),
    "kv_first": (lambda B, N, H, D: (2, B, N, H, D), (0, 1, 2, 3, 4)),
}


def vllm_layout_cache(logical: tuple[int, ...], order: tuple[int, ...], dtype, device="cpu"):
    """A zeroed per-layer cache tensor built exactly like vLLM's ``_reshape_attention_kv_cache``."""
    import torch

    inv = [order.index(i) for i in range(len(order))]
    return torch.zeros([logical[i] for i in order], dtype=dtype, device=device).permute(*inv)


def logical_block(cache, block: int):
    """Page ``block`` of a cache in its logical order (the block dim is the one of size num_blocks)."""
    return cache.select(0 if cache.shape[0] != 2 else 1, block)


class FakeRequest(types.SimpleNamespace):
    """The fields of vLLM's ``Request`` the scheduler half reads; ``num_tokens`` follows the token list."""

    def __init__(self, rid: str, tokens: list[int]):
        super().__init__(request_id=rid, all_token_ids=tokens, mm_features=None, prompt_embeds=None,
                         lora_request=None, cache_salt=None)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def fake_step(new=(), cached=(), sched=None):
    cached = list(cached)
    return types.SimpleNamespace(
        scheduled_new_reqs=[types.SimpleNamespace(req_id=r, block_ids=(ids,), num_computed_tokens=c)
                            for r, ids, c in new],
        scheduled_cached_reqs=types.SimpleNamespace(req_ids=[r for r, _, _ in cached],
                                                    new_block_ids=[(ids,) if ids else None for _, ids, _ in cached],
                                                    num_computed_tokens=[c for _, _, c in cached],
                                                    resumed_req_ids=set()),
        num_scheduled_tokens=sched or {})
