"""Worker half of ``LongSeqOffloadConnector``: copies between vLLM's paged KV caches and the block store.

One store entry per block holds that page for every layer this rank has: a contiguous tensor ``[num_layers,
*page_shape]`` in the cache dtype, where ``page_shape`` is one page of one layer's cache tensor with the block
dimension removed (CUDA FlashAttention: cache ``[2, num_blocks, block_size, H, D]`` -> page ``[2, block_size, H,
D]``; vLLM CPU: cache ``[num_blocks, H, block_size, 2*D]`` -> page ``[H, block_size, 2*D]``). The page shape and
device type are part of the fingerprint, so CPU and GPU blocks never mix.

Loads (synchronous, before the forward pass): with the store in the scheduler's process, the scheduler already
verified every block and pulled disk blocks into DRAM; otherwise (tensor parallelism) each rank does that here and
reports the blocks it cannot load, which vLLM recomputes. On CUDA one kernel (``longseq.kernels.kv_block_copy``)
reads the store's pinned DRAM buffers directly and writes every layer's pages, a request's whole prefix per launch;
otherwise (CPU, ``load_kernel: copy``, a cache layout the kernel does not cover, a failed start-up self-test, or
blocks no longer in DRAM) each block is copied into a staging tensor on the cache device, chunk by chunk, and
scattered into every layer with one ``index_copy_`` per layer. Saves: after the forward, pages are gathered per
layer on a side CUDA stream into a staging tensor, copied to reused pinned host buffers, and handed to a background
thread that ``put``s them; the compute stream then waits (GPU-side) for the gather, not for the device->host copy
(which reads only the staging tensor and overlaps later steps), so a page vLLM reuses right away (preemption) is
never overwritten before it is read; requests with saves are reported finished-sending once their device->host copy
is done. Pages are always moved in their LOGICAL order (``index_select``/``index_copy_`` on the possibly
non-contiguous per-layer view), so the stored bytes do not depend on the cache's stride order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from .direct_load import DirectLoad, direct_load_setup
from .dram import as_bytes, host_bytes
from .store import BlockStore
from .vllm_scheduler import BlockTransfer

log = logging.getLogger("longseq.kv_offload")

#: Staging size per load/save chunk on the device (bounds the extra device memory the connector uses).
CHUNK_BYTES = 256 << 20
#: Saves waiting for the background thread beyond this are dropped (a dropped save is only a future miss).
MAX_QUEUED_SAVE_BYTES = 4 << 30


def find_block_dim(shape: tuple[int, ...], num_blocks: int) -> int:
    """The dimension of a per-layer cache tensor that indexes pages (the one of size ``num_blocks``)."""
    dims = [d for d, n in enumerate(shape) if n == num_blocks]
    if not dims:
        raise ValueError(f"LongSeqOffloadConnector: no dimension of size num_blocks={num_blocks} in KV cache "
                         f"shape {list(shape)}")
    return dims[0]


class StagingPool:
    """Reusable host buffers ``[chunk_blocks, *block_shape]`` (pinned on CUDA) for device->host saves.

    Pinned allocation (``cudaHostAlloc``) is slow and would run in the engine thread, inside the step whose
    forward wrote the pages (a prefill: it showed up in TTFT, docs/benchmarks/kv-offload.md).
    Buffers are allocated on first use, given back by the save thread once ``put`` copied them out, and
    reused; at most ``max_buffers`` exist (``take`` returns None when all are in flight). Thread-safe.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, max_buffers: int, pin_memory: bool) -> None:
        self.shape, self.dtype, self.pin_memory = shape, dtype, pin_memory
        self.max_buffers = max(1, max_buffers)
        self.allocated = 0
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self) -> torch.Tensor | None:
        with self._lock:
            if self._free:
                return self._free.pop()
            if self.allocated >= self.max_buffers:
                return None
            self.allocated += 1
        return torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pin_memory)

    def fill(self) -> None:
        """Allocate every buffer now (start-up), so no save pays for ``cudaHostAlloc`` while serving."""
        bufs = list(iter(self.take, None))
        for b in bufs:
            self.give(b)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)


class OffloadWorker:
    """Holds the per-layer page views ``[num_blocks, *page_shape]`` and moves pages to/from ``store``."""

    def __init__(self, kv_caches: list[torch.Tensor], num_blocks: int) -> None:
        views, seen = [], set()
        for t in kv_caches:
            if t.data_ptr() in seen:  # layers sharing one cache (KV sharing) are stored once
                continue
            seen.add(t.data_ptr())
            views.append(t.movedim(find_block_dim(tuple(t.shape), num_blocks), 0))
        shapes = {tuple(v.shape[1:]) for v in views}
        if len(shapes) != 1 or len({v.dtype for v in views}) != 1:
            raise ValueError(f"LongSeqOffloadConnector: layers differ in page shape/dtype: {sorted(shapes)}")
        self.views = views
        self.page_shape = shapes.pop()
        self.dtype = views[0].dtype
        self.device = views[0].device
        self.block_shape = (len(views), *self.page_shape)
        self.block_bytes = torch.Size(self.block_shape).numel() * views[0].element_size()
        self.chunk_blocks = max(1, CHUNK_BYTES // self.block_bytes)
        self.cuda = self.device.type == "cuda"
        self.store: BlockStore | None = None
        self.save_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._staging_bytes = self.chunk_blocks * self.block_bytes
        self._staging = StagingPool((self.chunk_blocks, *self.block_shape), self.dtype,
                                    MAX_QUEUED_SAVE_BYTES // self._staging_bytes, self.cuda)
        self._save_queue: queue.Queue = queue.Queue()
        self._queued_bytes = 0
        self._queued_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._req_events: dict[str, object] = {}  # req id -> last save's CUDA event (None on CPU)
        self._to_report: set[str] = set()
        self.load_errors: set[int] = set()
        self._direct: DirectLoad | None = None  # set by attach when the direct-read kernel is used
        self.counters = dict(loaded_blocks=0, loaded_tokens=0, load_seconds=0.0, load_bytes=0,
                             saved_blocks=0, save_bytes=0, dropped_save_blocks=0, load_failed_blocks=0,
                             save_call_seconds=0.0)

    def attach(self, store: BlockStore, pin_at_start: bool = True, load_kernel: str = "auto") -> None:
        """Use ``store``. ``pin_at_start`` (CUDA): allocate the pinned staging buffers and the store's whole DRAM
        tier now. Allocated lazily, ``cudaHostAlloc`` runs while serving, and it stalls the engine's CUDA calls
        (it raised TTFT well above what pinning at start costs: docs/benchmarks/kv-offload.md). Up front it costs
        start-up time instead.
        ``load_kernel``: ``auto`` loads with the direct-read kernel where it applies (CUDA, pinned tier, a
        supported cache layout, self-test passed), ``copy`` always with per-block copies."""
        self.store = store
        if self.cuda and load_kernel == "auto":
            self._direct = direct_load_setup(self.views, store)
        if self.cuda and pin_at_start:
            t0 = time.perf_counter()
            try:
                self._staging.fill()
                n = store.reserve_dram(self.block_bytes)
            except RuntimeError as e:  # cudaHostAlloc failed: say which knob sizes it, at start-up
                raise RuntimeError(f"LongSeqOffloadConnector: cannot pin the DRAM tier (kv_connector_extra_config "
                                   f"cpu_gib) plus {MAX_QUEUED_SAVE_BYTES / 2**30:g} GiB "
                                   f"of save staging in host memory: {e}. Lower cpu_gib, or set pin_at_start to "
                                   f"false to pin lazily while serving") from e
            log.info("LongSeqOffloadConnector: pinned %.1f GiB of staging + %.1f GiB of DRAM tier in %.1f s",
                     self._staging.allocated * self._staging_bytes / 2**30, n / 2**30, time.perf_counter() - t0)
        elif self.cuda:  # one staging buffer at start-up, so not even the first save pays for cudaHostAlloc
            self._staging.give(self._staging.take())
        self._thread = threading.Thread(target=self._save_loop, name="longseq-kv-save", daemon=True)
        self._thread.start()

    # ---- loads -------------------------------------------------------------------------------
    def load(self, transfers: list[BlockTransfer], block_size: int) -> None:
        """Load each transfer; any error is a load failure of that transfer's blocks (vLLM recomputes them),
        never an exception into the engine."""
        for tr in transfers:
            try:
                self._load_transfer(tr, block_size)
            except Exception as e:
                self.store.record_lookup_error(f"loading request {tr.req_id}", e)
                self._failed(tr.block_ids, tr.keys, bad=len(tr.keys))  # cause unknown: trust none of them

    def _failed(self, block_ids: list[int], keys: list[bytes], bad: int = 1) -> None:
        """Blocks that could not be loaded from the first failed one on: vLLM recomputes them all; the store forgets
        the first ``bad`` (they failed; they are saved again after the recompute). Later ones are only cut off by
        the gap: their bytes were checked or not read, so they stay for the next request."""
        self.load_errors.update(block_ids)
        self.counters["load_failed_blocks"] += len(block_ids)
        self.store.forget(keys[:bad])

    def _load_transfer(self, tr: BlockTransfer, block_size: int) -> None:
        t0 = time.perf_counter()
        if not tr.checked:  # the scheduler could not read this rank's store: check (and pull disk blocks) here
            tr = self._usable_prefix(tr)
        # The direct kernel takes the whole prefix in one launch (no staging memory to bound, and no GPU idle
        # time between chunks, which cost bandwidth: docs/benchmarks/kv-offload.md);
        # blocks it could not take are copied per block, in chunks.
        done = self._load_direct(tr.block_ids, tr.keys) if self._direct is not None else 0
        for start in range(done, len(tr.block_ids), self.chunk_blocks):
            ids, keys = tr.block_ids[start:start + self.chunk_blocks], tr.keys[start:start + self.chunk_blocks]
            ok = self._load_chunk_staged(ids, keys)
            done += ok
            if ok < len(ids):  # this block and all later ones are recomputed by vLLM
                self._failed(tr.block_ids[start + ok:], tr.keys[start + ok:])
                break
        dt = time.perf_counter() - t0
        c = self.counters
        c["loaded_blocks"] += done
        c["loaded_tokens"] += done * block_size
        c["load_seconds"] += dt
        c["load_bytes"] += done * self.block_bytes
        log.info("LongSeqOffloadConnector: loaded %d tokens (%d blocks, %.1f MiB) for request %s in %.1f ms"
                 " (%.2f GB/s)", done * block_size, done, done * self.block_bytes / 2**20, tr.req_id, dt * 1e3,
                 done * self.block_bytes / max(dt, 1e-9) / 1e9)

    def _usable_prefix(self, tr: BlockTransfer) -> BlockTransfer:
        """``tr`` cut at its first block this rank cannot load (missing, or failing a check); the cut blocks are
        reported as load errors, so vLLM recomputes them (on every rank: it takes the union of the ranks' errors)."""
        n = self.store.fetch_prefix_to_dram(tr.keys)
        if n < len(tr.keys):
            self._failed(tr.block_ids[n:], tr.keys[n:])
            log.info("LongSeqOffloadConnector: %d of %d blocks of request %s are not in this rank's store; vLLM "
                     "recomputes them", len(tr.keys) - n, len(tr.keys), tr.req_id)
        return BlockTransfer(tr.req_id, tr.block_ids[:n], tr.keys[:n], checked=True)

    def _load_direct(self, block_ids: list[int], keys: list[bytes]) -> int:
        """Leading blocks in pinned DRAM, loaded by the direct-read kernel; returns how many."""
        try:
            return self._direct.load(block_ids, keys, self.block_bytes)
        except Exception:  # never fail a request over the fast path: copy per block from now on
            log.exception("LongSeqOffloadConnector: direct load kernel failed; loads use per-block copies from now on")
            self._direct = None
            return 0

    def _load_chunk_staged(self, block_ids: list[int], keys: list[bytes]) -> int:
        """Per-block copies into a staging tensor on the cache device, then one ``index_copy_`` per layer."""
        stage = (torch.empty((len(keys), *self.block_shape), dtype=self.dtype, device=self.device) if self.cuda
                 else self._host_blocks(len(keys)))
        store = self.store
        # The store copies under its lock and syncs before releasing it: nobody can evict (and recycle) a DRAM
        # buffer while an async copy reads it.
        sync = torch.cuda.current_stream(self.device).synchronize if self.cuda else None
        found = store.get_dram_batch(keys, list(stage), synchronize=sync)
        missing = [i for i, ok in enumerate(found) if not ok]
        n = len(keys)
        for i in missing:  # evicted since the scheduler's check: read again (disk), verified by the store
            host = host_bytes(self.block_bytes)
            if store.get(keys[i], out=host) is None:
                n = i
                break
            as_bytes(stage[i]).copy_(host)
        if n:
            ids = torch.tensor(block_ids[:n], dtype=torch.long, device=self.device)
            for layer, view in enumerate(self.views):
                view.index_copy_(0, ids, stage[:n, layer])
        return n

    # ---- saves -------------------------------------------------------------------------------
    def save(self, transfers: list[BlockTransfer]) -> None:
        """Gather the pages now (after this step's forward) and queue them for the store. All requests' blocks
        of the step go through shared chunks (one gather per chunk, not per request)."""
        t0 = time.perf_counter()
        items = [(tr.req_id, b, k) for tr in transfers for b, k in zip(tr.block_ids, tr.keys)]
        gathered = None
        for tr in transfers:
            # setdefault keeps an earlier step's event: if this step's chunks are all dropped, the request's
            # pages must still not be freed before that earlier copy is done.
            self._req_events.setdefault(tr.req_id, None)
        for start in range(0, len(items), self.chunk_blocks):
            chunk = items[start:start + self.chunk_blocks]
            ids, keys = [b for _, b, _ in chunk], [k for _, _, k in chunk]
            nbytes = len(ids) * self.block_bytes
            with self._queued_lock:
                if self._queued_bytes + nbytes > MAX_QUEUED_SAVE_BYTES:
                    self.counters["dropped_save_blocks"] += len(ids)
                    continue
                self._queued_bytes += nbytes
            staging = self._staging.take() if self.cuda else None
            if self.cuda and staging is None:  # every pinned buffer is still in flight: a future miss
                with self._queued_lock:
                    self._queued_bytes -= nbytes
                self.counters["dropped_save_blocks"] += len(ids)
                continue
            host, event, gathered = self._gather(ids, staging)
            if event is not None:
                for req_id in {r for r, _, _ in chunk}:
                    self._req_events[req_id] = event  # the save stream is in order: later events imply earlier
            self._save_queue.put((keys, host, event, staging))
        if gathered is not None:
            # Later compute-stream work waits until the pages are gathered into device scratch (GPU-side; this
            # thread does not block): vLLM may reuse a page right away (a preempted request's pages are zeroed
            # and rewritten by the next step before any connector hook runs). It does not wait for the
            # device->host copies, which read only the scratch: they overlap the next forward passes instead of
            # adding their time to this step. The save stream is in order, so the last gather implies all.
            torch.cuda.current_stream(self.device).wait_event(gathered)
        self.counters["save_call_seconds"] += time.perf_counter() - t0  # the engine thread's share of saving

    def _host_blocks(self, n: int) -> torch.Tensor:
        """A pageable host tensor ``[n, *block_shape]`` of the cache dtype, from ``host_bytes``."""
        return host_bytes(n * self.block_bytes).view(self.dtype).view(n, *self.block_shape)

    def _gather(self, block_ids: list[int], staging: torch.Tensor | None):
        """Pages ``block_ids`` of every layer -> host ``[n, num_layers, *page_shape]`` (logical order, so the
        bytes do not depend on the cache's physical stride order). CUDA: async on the save stream into
        ``staging`` (pinned), returns (host view, event that completes the copy, event after which the pages
        themselves are no longer read); CPU: (host tensor, None, None)."""
        if not self.cuda:
            ids = torch.tensor(block_ids, dtype=torch.long)
            # Straight into one mapped buffer: no per-layer temporaries through malloc (``host_bytes``).
            host = self._host_blocks(len(block_ids))
            for layer, view in enumerate(self.views):
                torch.index_select(view, 0, ids, out=host[:, layer])
            return host, None, None
        main = torch.cuda.current_stream(self.device)
        self.save_stream.wait_stream(main)  # the forward that wrote these pages comes first
        host = staging[:len(block_ids)]
        with torch.cuda.stream(self.save_stream):
            # Pinned source: a pageable host->device copy would block this thread until the save stream
            # (and so the forward it waits for) is done, serializing the engine with the GPU every save.
            ids = torch.tensor(block_ids, dtype=torch.long, pin_memory=True).to(self.device, non_blocking=True)
            # ``staged`` is allocated on this stream, so the caching allocator recycles it only after the
            # copy below, in stream order.
            staged = torch.stack([v.index_select(0, ids) for v in self.views], dim=1)
            gathered = torch.cuda.Event()
            gathered.record(self.save_stream)
            host.copy_(staged, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.save_stream)
        return host, event, gathered

    def _save_loop(self) -> None:
        while True:
            item = self._save_queue.get()
            if item is None:
                self._save_queue.task_done()
                return
            keys, host, event, staging = item
            try:
                if event is not None:
                    event.synchronize()
                for i, key in enumerate(keys):
                    self.store.put(key, host[i])
                self.counters["saved_blocks"] += len(keys)
                self.counters["save_bytes"] += len(keys) * self.block_bytes
            except Exception:  # a failed save is a future miss, never a crash
                log.exception("LongSeqOffloadConnector: saving %d blocks failed", len(keys))
            finally:
                if staging is not None:  # put() copied the bytes out; the copy into it is done (event)
                    self._staging.give(staging)
                with self._queued_lock:
                    self._queued_bytes -= len(keys) * self.block_bytes
                self._save_queue.task_done()

    def finished_sending(self, finished_req_ids: set[str]) -> set[str]:
        """Finished requests whose pages may be freed: every device->host copy of theirs is done."""
        self._to_report.update(r for r in finished_req_ids if r in self._req_events)
        done = {r for r in self._to_report if self._req_events[r] is None or self._req_events[r].query()}
        for r in done:
            self._to_report.discard(r)
            del self._req_events[r]
        return done

    def drain(self, timeout: float | None = None, disk: bool = True) -> None:
        """Wait until every queued save is in the store and (``disk``) the store's disk writes are done, or
        ``timeout`` seconds in all (shutdown must not hang on a stuck save: what is left is only a future miss)."""
        if self._thread is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        q = self._save_queue
        with q.all_tasks_done:  # Queue.join() with a timeout
            if not q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, timeout=timeout):
                log.warning("LongSeqOffloadConnector: %d queued saves still pending after %.0f s; not waiting",
                            q.unfinished_tasks, timeout)
                return
        if disk:
            self.store.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))
