"""Scheduler half of ``LongSeqOffloadConnector``: block keys, hit lookup, and what each step loads and saves.

Framework objects it reads (the same in vLLM 0.26 and 0.32): ``Request`` (``request_id``, ``all_token_ids``,
``num_tokens``, ``lora_request``, ``cache_salt``, ``mm_features``), ``KVCacheBlocks.get_block_ids()`` and
``SchedulerOutput`` (``scheduled_new_reqs[i].block_ids/num_computed_tokens``, ``scheduled_cached_reqs``
``req_ids/new_block_ids/num_computed_tokens/resumed_req_ids``, ``num_scheduled_tokens``).

Keys are our own prefix-hash chain (blake2b over each block's token ids, chained), not vLLM's
``request.block_hashes``: vLLM seeds those per process unless PYTHONHASHSEED is set, so they never
match across a server restart, which is exactly the case the disk tier is for.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from .store import BlockStore
from .vllm_hits import KeyIndexHits, StoreHits

log = logging.getLogger("longseq.kv_offload")

KEY_BYTES = 16
#: Keys of recently sent saves remembered, so requests sharing a prefix in flight save each block once.
RECENT_SAVES = 1 << 16
#: Steps whose loads are remembered until the workers' load errors for them come back (async scheduling: 1 late).
RECENT_LOAD_STEPS = 4


def chain_keys(token_ids, block_size: int, num_blocks: int, seed: bytes, prev: list[bytes] | None = None) -> list[bytes]:
    """Keys of the first ``num_blocks`` full blocks of ``token_ids``: key_i = blake2b(key_{i-1} | tokens of block i).

    ``seed`` stands in for key_{-1} (it carries what else changes the KV: LoRA adapter, cache salt).
    ``prev``: keys already computed for a prefix of the same sequence (extended, not recomputed).
    """
    keys = list(prev or [])
    parent = keys[-1] if keys else seed
    first = len(keys)
    if num_blocks <= first:
        return keys
    # One conversion for all new blocks (per-block conversions were most of the hashing cost).
    raw = np.asarray(token_ids[first * block_size:num_blocks * block_size], dtype=np.int64).tobytes()
    step = block_size * 8
    for i in range(num_blocks - first):
        parent = hashlib.blake2b(parent + raw[i * step:(i + 1) * step], digest_size=KEY_BYTES,
                                 person=b"longseq-kvblk").digest()
        keys.append(parent)
    return keys


def request_seed(request) -> bytes | None:
    """Chain seed from what besides the tokens changes a request's KV; None = not cacheable here (images...)."""
    if getattr(request, "mm_features", None):
        return None  # multimodal placeholders: token ids do not identify the KV
    if getattr(request, "prompt_embeds", None) is not None:
        return None
    lora = getattr(request, "lora_request", None)
    parts = ["lora=" + (lora.lora_name if lora is not None else ""), "salt=" + str(getattr(request, "cache_salt", "") or "")]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=KEY_BYTES, person=b"longseq-kvseed").digest()


@dataclass
class BlockTransfer:
    """One request's blocks to move this step: ``block_ids[i]`` (vLLM page) <-> store entry ``keys[i]``.
    ``checked``: (loads) the scheduler already read and checked every block in this process's store."""

    req_id: str
    block_ids: list[int]
    keys: list[bytes]
    checked: bool = False


@dataclass
class ReqState:
    request: object
    seed: bytes
    keys: list[bytes] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    saved_blocks: int = 0  # leading blocks already in the store or sent for saving
    had_saves: bool = False  # the worker reports this request in finished_sending once its copies are done
    local_computed: int = 0  # tokens vLLM had locally when it asked for our hits
    hit_blocks: int = 0  # leading blocks verified present in the store


class OffloadScheduler:
    """Scheduler-side bookkeeping. ``hits``: where hits are counted (``vllm_hits.py``); a ``BlockStore`` is the
    worker's own store in this process (wrapped in ``StoreHits``)."""

    def __init__(self, hits: BlockStore | StoreHits | KeyIndexHits, block_size: int, save: bool = True) -> None:
        self.hits = StoreHits(hits) if isinstance(hits, BlockStore) else hits
        self.block_size = block_size
        self.save = save  # False (kv_consumer): never save, so no request waits for saves
        self.reqs: dict[str, ReqState] = {}
        self.pending_loads: list[BlockTransfer] = []
        self.lookups = self.hit_tokens = self.miss_tokens = 0
        # Engine-thread seconds spent here (every lookup; every step's bookkeeping): what the connector costs
        # the scheduler, reported in the stats so a slow TTFT can be attributed.
        self.lookup_seconds = self.step_seconds = 0.0
        self._recent_saves: OrderedDict[bytes, None] = OrderedDict()
        self._recent_loads: deque[list[BlockTransfer]] = deque(maxlen=RECENT_LOAD_STEPS)

    def track(self, request) -> None:
        self._state(request)

    def _state(self, request) -> ReqState | None:
        st = self.reqs.get(request.request_id)
        if st is None:
            seed = request_seed(request)
            if seed is None:
                return None
            st = self.reqs[request.request_id] = ReqState(request=request, seed=seed)
        return st

    def _keys(self, st: ReqState, num_blocks: int) -> list[bytes]:
        if len(st.keys) < num_blocks:
            st.keys = chain_keys(st.request.all_token_ids, self.block_size, num_blocks, st.seed, st.keys)
        return st.keys[:num_blocks]

    # ---- lookup ------------------------------------------------------------------------------
    def num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        t0 = time.perf_counter()
        try:
            return self._num_new_matched_tokens(request, num_computed_tokens)
        finally:
            self.lookup_seconds += time.perf_counter() - t0

    def _num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        """Tokens beyond ``num_computed_tokens`` that the store holds, in whole blocks (sync load).

        The last prompt token is never served (vLLM must compute at least one token to sample). With the worker's
        store in this process every counted block is verified readable now (``StoreHits``); otherwise the workers
        check them at load time and report failures for recompute (``KeyIndexHits``).
        """
        st = self._state(request)
        if st is None:
            return 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        first = num_computed_tokens // self.block_size
        if max_blocks <= first:
            return 0
        keys = self._keys(st, max_blocks)
        self.lookups += 1
        hits = first + self.hits.count(keys[first:])
        # The store does not hold the blocks past the hits (evicted, or a damaged file deleted): once recomputed they
        # must be saved again, also when another request sent them recently, or a hot prefix stays a miss for good.
        for k in keys[hits:]:
            self._recent_saves.pop(k, None)
        st.local_computed, st.hit_blocks = num_computed_tokens, hits
        new_tokens = max(0, hits * self.block_size - num_computed_tokens)
        self.hit_tokens += new_tokens
        self.miss_tokens += max(0, request.num_tokens - num_computed_tokens - new_tokens)
        return new_tokens

    def after_alloc(self, request, block_ids: list[int], num_external_tokens: int) -> None:
        st = self.reqs.get(request.request_id)
        if st is None or num_external_tokens <= 0:
            return
        first = st.local_computed // self.block_size
        n = num_external_tokens // self.block_size
        self.pending_loads.append(BlockTransfer(request.request_id, list(block_ids[first:first + n]),
                                                st.keys[first:first + n], checked=self.hits.mode == "store"))
        self.hits.sent(st.keys[first:first + n])
        st.saved_blocks = max(st.saved_blocks, first + n)  # loaded blocks are in the store already

    # ---- per step ----------------------------------------------------------------------------
    def build_step(self, scheduler_output) -> tuple[list[BlockTransfer], list[BlockTransfer]]:
        """(loads, saves) for this step. A block is saved once every token in it has its KV written by the
        end of this step and is known (drafted tokens are not, until accepted)."""
        t0 = time.perf_counter()
        loads, self.pending_loads = self.pending_loads, []
        if loads:
            self._recent_loads.append(loads)
        saves: list[BlockTransfer] = []
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self.reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._collect_save(st, new.num_computed_tokens + sched.get(new.req_id, 0), saves)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = set(cached.resumed_req_ids)  # resumed from preemption: new_block_ids replace the list
        for i, req_id in enumerate(cached.req_ids):
            st = self.reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                st.block_ids = list(new_ids[0]) if req_id in resumed else st.block_ids + list(new_ids[0])
            self._collect_save(st, cached.num_computed_tokens[i] + sched.get(req_id, 0), saves)
        self.step_seconds += time.perf_counter() - t0
        return loads, saves

    def _collect_save(self, st: ReqState, computed_after_step: int, saves: list[BlockTransfer]) -> None:
        if not self.save:
            return
        upto = min(computed_after_step, st.request.num_tokens, len(st.block_ids) * self.block_size)
        n_full = upto // self.block_size
        if n_full <= st.saved_blocks:
            return
        keys = self._keys(st, n_full)
        ids, todo = [], []
        # DRAM residency only, one lock for all: probing the disk tier costs a file open per block on the engine
        # thread. A block only on disk is saved again: that promotes it into DRAM (it is
        # hot now), and the disk writer sees the file exists and only refreshes its mtime.
        in_dram = self.hits.in_dram_batch(keys[st.saved_blocks:n_full])
        for b in range(st.saved_blocks, n_full):
            if keys[b] in self._recent_saves:  # another request already sent it (its put may be in flight)
                self._recent_saves.move_to_end(keys[b])
            elif not in_dram[b - st.saved_blocks]:
                self._recent_saves[keys[b]] = None
                if len(self._recent_saves) > RECENT_SAVES:
                    self._recent_saves.popitem(last=False)
                ids.append(st.block_ids[b])
                todo.append(keys[b])
        st.saved_blocks = n_full
        if ids:
            self.hits.sent(todo)
            st.had_saves = True
            saves.append(BlockTransfer(st.request.request_id, ids, todo))

    def load_failed(self, block_ids: set[int]) -> None:
        """Some worker could not load ``block_ids`` (vLLM recomputes them). Forget their keys and everything after
        them in the request, and save them again once recomputed: otherwise a block a rank lost would be counted,
        fail and be recomputed on every later hit."""
        for loads in self._recent_loads:
            for tr in loads:
                first = next((i for i, b in enumerate(tr.block_ids) if b in block_ids), None)
                if first is None:
                    continue
                lost = tr.keys[first:]
                self.hits.forget(lost)
                for k in lost:
                    self._recent_saves.pop(k, None)
                st = self.reqs.get(tr.req_id)
                if st is not None and lost[0] in st.keys:
                    st.saved_blocks = min(st.saved_blocks, st.keys.index(lost[0]))
                log.info("LongSeqOffloadConnector: %d blocks of request %s failed to load on some rank; they are "
                         "recomputed and saved again", len(lost), tr.req_id)

    def finished(self, request) -> bool:
        """Forget the request; True = its blocks must stay allocated until the worker reports its saves done."""
        st = self.reqs.pop(request.request_id, None)
        return st is not None and st.had_saves
