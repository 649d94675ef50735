"""``longseq_dense``: SGLang attention backend that wraps one of SGLang's own dense backends.

It is the skeleton later techniques grow from: it builds the inner backend (``torch_native`` on CPU,
``triton`` on GPU, or ``LONGSEQ_SGLANG_DENSE``) through SGLang's registry and forwards every
``AttentionBackend`` method and attribute to it, so CUDA graphs, metadata hooks and backend-specific
attributes behave exactly as with the inner backend. It only adds per-process call counters (and a JSON
trace marker when ``trace_dir`` is set) so tests can prove SGLang ran our code.

:class:`LongSeqTechniqueBackend` (below) is the base of ``longseq_sparse`` and ``longseq_duo``: the same proxy,
plus what both share (the KV pool, the runner checks, which layer calls a technique may serve).

Tensor contract (unchanged from SGLang's): ``q`` ``[T, Hq * D]`` (or ``[T, Hq, D]``), ``k``/``v``
``[T, Hkv, D]`` in the model dtype; output ``[T, Hq * Dv]``.
"""

from __future__ import annotations

import atexit
import json
import os
import threading

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from longseq.attention_backends.sglang import BACKEND_CLASSES
from longseq.config import SUPPORTED_KV_CACHE_DTYPES, LongSeqConfig, LongSeqConfigError
from longseq.sglang_versions import kv_cache_dtype_name, kv_write_loc

BACKEND_NAME = "longseq_dense"
DEFAULT_INNER = {"cpu": "torch_native"}  # any other device: "triton"
LONGSEQ_BACKENDS = frozenset(BACKEND_CLASSES)  # never wrapped as the inner backend


def resolve_inner_backend(setting: str, device) -> str:
    """Name of the SGLang backend to wrap, from ``sglang_dense_backend`` (``auto`` = by device)."""
    if setting == "auto":
        return DEFAULT_INNER.get(str(device).split(":")[0], "triton")
    # longseq's own backends are never wrapped (longseq_sparse wrapping itself would recurse).
    if setting in LONGSEQ_BACKENDS or setting not in ATTENTION_BACKENDS:
        allowed = ["auto"] + sorted(n for n in ATTENTION_BACKENDS if n not in LONGSEQ_BACKENDS)
        raise LongSeqConfigError(
            f"LONGSEQ_SGLANG_DENSE={setting!r} is not an SGLang attention backend longseq_dense can wrap; "
            f"allowed values: {', '.join(allowed)}"
        )
    return setting


class BackendTrace:
    """Per-process call counters of one longseq SGLang backend (``longseq_dense`` unless told otherwise).

    With ``trace_dir`` set they are written to ``<trace_dir>/sglang-<backend>-<pid>.json`` when a backend
    is built, at forward calls 1, 2, 4, 8, ... and at exit, so the file costs nothing in steady state.
    Under CUDA graphs only eager calls (capture, non-graphed batches) reach Python and are counted.
    ``extra_counts`` are further counters the backend bumps itself; ``technique`` fixes the reported
    technique (default: the configured ``LONGSEQ_ATTENTION``).
    """

    def __init__(self, backend: str = BACKEND_NAME, extra_counts: tuple[str, ...] = (),
                 technique: str | None = None) -> None:
        self.backend, self._technique = backend, technique
        self.counts = {"forward_calls": 0, "extend_calls": 0, "decode_calls": 0, "backends_built": 0,
                       **dict.fromkeys(extra_counts, 0)}
        self.inner: set[str] = set()
        self.trace_dir: str | None = None
        self.technique = ""
        self._next_flush = 1
        self._lock = threading.Lock()
        self._atexit = False

    def configure(self, config: LongSeqConfig, inner: str) -> None:
        with self._lock:
            self.counts["backends_built"] += 1
            self.inner.add(inner)
            self.trace_dir, self.technique = config.trace_dir, self._technique or config.attention
            if self.trace_dir and not self._atexit:
                atexit.register(self.flush)
                self._atexit = True
        self.flush()

    def record(self, mode: str) -> None:
        self.counts["forward_calls"] += 1
        self.counts[mode] += 1
        if self.trace_dir and self.counts["forward_calls"] >= self._next_flush:
            self._next_flush *= 2
            self.flush()

    def flush(self) -> None:
        if not self.trace_dir:
            return
        os.makedirs(self.trace_dir, exist_ok=True)
        path = os.path.join(self.trace_dir, f"sglang-{self.backend}-{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"framework": "sglang", "backend": self.backend, "pid": os.getpid(),
                       "inner": sorted(self.inner), "technique": self.technique, **self.counts}, f)
        os.replace(path + ".tmp", path)


TRACE = BackendTrace()


class LongSeqDenseBackend(AttentionBackend):
    """Transparent proxy around ``ATTENTION_BACKENDS[inner_name](model_runner)``.

    Every ``AttentionBackend`` method and attribute (including CUDA-graph hooks and flags such as
    ``needs_cpu_seq_lens``) is forwarded to the inner backend; reads and writes of any other attribute
    go to the inner backend too (``__getattr__``/``__setattr__``), so SGLang code that pokes at
    backend state sees the inner backend's. Only the forward entry points are ours (they count calls).
    Subclasses (:class:`LongSeqTechniqueBackend`) extend ``_OWN`` with their own attributes and set their own
    ``trace``.
    """

    _OWN = frozenset({"inner", "inner_name", "config"})
    trace = TRACE

    def __init__(self, model_runner, config: LongSeqConfig):
        inner_name = resolve_inner_backend(config.sglang_dense_backend, model_runner.device)
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "inner_name", inner_name)
        object.__setattr__(self, "inner", ATTENTION_BACKENDS[inner_name](model_runner))
        self.trace.configure(config, inner_name)

    def __getattr__(self, name):  # only reached when normal lookup fails
        if name in type(self)._OWN:
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name in type(self)._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __repr__(self) -> str:
        return f"LongSeqDenseBackend(inner={self.inner_name})"

    # The forward entry points: count, then delegate. `forward` goes to the inner `forward` (not ours
    # below) so one call is counted once, whichever entry point SGLang uses.
    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.trace.record("decode_calls" if forward_batch.forward_mode.is_decode() else "extend_calls")
        return self.inner.forward(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.trace.record("decode_calls")
        return self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.trace.record("extend_calls")
        return self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_mixed(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.trace.record("extend_calls")
        return self.inner.forward_mixed(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)


def _forward_method(name):
    def method(self, *args, **kwargs):
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


def _forward_attribute(name):
    return property(lambda self: getattr(self.inner, name), doc=f"The inner backend's ``{name}``.")


# Forward the rest of the installed SGLang's AttentionBackend interface (methods, properties and class-level
# flags) to the inner backend. Generated from the base class so new hooks in a later SGLang are covered.
for _name, _value in list(vars(AttentionBackend).items()):
    if _name.startswith("__") or _name == "_abc_impl" or _name in vars(LongSeqDenseBackend):
        continue
    if callable(_value) or isinstance(_value, (staticmethod, classmethod)):
        setattr(LongSeqDenseBackend, _name, _forward_method(_name))
    else:
        setattr(LongSeqDenseBackend, _name, _forward_attribute(_name))
del _name, _value


def check_runner_kv_pool(model_runner, where: str) -> None:
    """What a technique that reads and writes SGLang's KV pool itself needs from the model runner: MHA/GQA/MQA
    attention with equal key and value head sizes, a supported KV dtype, the ``nhd`` slot-row layout and
    physical slot ids. ``where`` starts each :class:`LongSeqConfigError` message."""
    if getattr(model_runner, "use_mla_backend", False):
        raise LongSeqConfigError(f"{where}: MLA models are not supported (MHA/GQA/MQA attention only)")
    model_config = model_runner.model_config
    head, v_head = model_config.head_dim, getattr(model_config, "v_head_dim", model_config.head_dim)
    if head != v_head:
        raise LongSeqConfigError(f"{where}: key head size {head} != value head size {v_head} is not supported")
    kv_dtype = kv_cache_dtype_name(model_runner)
    if kv_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise LongSeqConfigError(f"{where}: --kv-cache-dtype {kv_dtype} is not supported; allowed values: "
                                 f"{', '.join(SUPPORTED_KV_CACHE_DTYPES)}")
    layout = getattr(model_runner.token_to_kv_pool, "kv_cache_layout", "nhd")
    if layout != "nhd":  # HND (SGLANG_USE_HND_KVCACHE) / vectorized_5d: pool rows are not token slots
        raise LongSeqConfigError(f"{where}: KV cache layout {layout!r} is not supported (only the default nhd)")
    translator = getattr(model_runner, "kv_index_translator", None)
    if getattr(translator, "is_translating", False):  # slots would not be physical pool rows
        raise LongSeqConfigError(f"{where}: translated KV ids (unified KV memory) are not supported")


def plain_causal_attention(layer, kwargs: dict) -> bool:
    """Whether a layer call is what the technique kernels implement: no sliding window, no cross-attention, no
    logit soft-cap, equal key/value head sizes, no extras (learned sinks and the like) in ``kwargs``."""
    window = getattr(layer, "sliding_window_size", -1)
    return ((window is None or window < 0) and not layer.is_cross_attention and not getattr(layer, "logit_cap", 0)
            and layer.qk_head_dim == layer.v_head_dim
            and all(value is None or value is False for value in kwargs.values()))


class LongSeqTechniqueBackend(LongSeqDenseBackend):
    """Base of the backends that run a technique on some layers (``longseq_sparse``, ``longseq_duo``).

    The wrapped dense backend serves every other layer; ``forward`` dispatches (idle / decode / extend / mixed)
    to this class's ``forward_*`` methods, not to the inner backend's ``forward``. Own state: the KV ``pool``
    (per layer ``[num_slots, Hkv, D]`` key and value buffers) and ``req_to_token`` ``[reqs + 1,
    max_context_len]`` int32 (each request's slots).
    """

    _OWN = LongSeqDenseBackend._OWN | {"pool", "req_to_token"}

    def __init__(self, model_runner, config: LongSeqConfig):
        super().__init__(model_runner, config)
        self.pool = model_runner.token_to_kv_pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return AttentionBackend.forward(self, q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def _write_kv(self, k, v, layer, forward_batch, save_kv_cache: bool) -> None:
        """Write this step's ``[T, Hkv, D]`` keys and values to the pool (what the inner backend would do)."""
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, kv_write_loc(forward_batch, layer), k, v)
