"""One validated configuration object, built once from ``LONGSEQ_*`` environment variables or a JSON file.

Nothing below ``plugin/`` reads ``os.environ``: adapters receive a :class:`LongSeqConfig`.
Bad input raises :class:`LongSeqConfigError` naming the setting and the allowed values. The engine
builds its attention backends at start-up, so that is where a bad setting stops it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

#: Techniques selectable with ``LONGSEQ_ATTENTION``. Later techniques add themselves here.
ATTENTION_TECHNIQUES = ("dense", "sparse", "duo")

#: Test-only fault injection, used by the end-to-end tests as a negative control: it proves the engine
#: really runs our backend (a broken variant must change the tokens).
DEBUG_FAULTS = ("none", "skip_kv_write")

#: Math under our CPU backend in dense mode: vLLM's own CPU kernel (bit-identical tokens) or our PyTorch path.
CPU_KERNELS = ("vllm", "torch")

#: Where KDA prefill runs under ``LONGSEQ_KDA=1`` (``LONGSEQ_KDA_PREFILL``): only the framework's own chunk kernel
#: (vLLM's vendored fla, SGLang's extend kernel); longseq's was slower and is gone (docs/benchmarks/kda.md).
KDA_PREFILL_KERNELS = ("framework",)

#: Page-summary dtypes of sparse mode.
SPARSE_SUMMARIES = ("auto", "fp8", "cache")
SPARSE_GROUP_SCORES = ("sum", "max")
#: Page top-k of sparse mode on the GPU: ours (Triton) or FlashInfer's radix top-k (docs/benchmarks/sparse.md).
SPARSE_TOPK_IMPLS = ("auto", "flashinfer")

#: Fields that take one of a fixed set of values, with that set (checked at start-up).
_CHOICES = {"cpu_kernel": CPU_KERNELS, "kda_prefill": KDA_PREFILL_KERNELS, "sparse_summary": SPARSE_SUMMARIES,
            "sparse_group_score": SPARSE_GROUP_SCORES, "sparse_topk": SPARSE_TOPK_IMPLS, "debug_fault": DEBUG_FAULTS}

#: Head sizes our kernels handle (vLLM's own GPU kernels cover at least these).
SUPPORTED_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 256)
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")
SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class LongSeqConfigError(ValueError):
    """A longseq setting is invalid. The message names the setting and what is allowed."""


@dataclasses.dataclass(frozen=True)
class LongSeqConfig:
    """Effective longseq settings.

    Attributes:
        attention: technique run by our attention backend (``LONGSEQ_ATTENTION``).
        cpu_override: on vLLM's CPU platform, replace ``CPU_ATTN`` with our backend (``LONGSEQ_CPU``).
        sglang_dense_backend: SGLang backend wrapped by ``longseq_dense`` (``LONGSEQ_SGLANG_DENSE``);
            ``auto`` = ``torch_native`` on CPU, ``triton`` on GPU.
        trace_dir: if set, each process running our backend writes a small JSON marker with call
            counts there (``LONGSEQ_TRACE_DIR``); tests use it to prove our code ran in the engine.
        debug_fault: test-only fault injection (``LONGSEQ_DEBUG_FAULT``).
        cpu_kernel: dense-mode math of the CPU backend (``LONGSEQ_CPU_KERNEL``): ``vllm`` or ``torch``.
        sparse_budget: sparse mode: KV tokens each decode query attends per KV head (``LONGSEQ_SPARSE_BUDGET``).
        sparse_page_size: tokens per scored page; divides the KV block size (``LONGSEQ_SPARSE_PAGE_SIZE``).
        sparse_dense_layers: the first N layers stay dense (``LONGSEQ_SPARSE_DENSE_LAYERS``; Quest keeps 2).
        sparse_sink_pages: first pages always kept (attention sinks) (``LONGSEQ_SPARSE_SINK_PAGES``).
        sparse_recent_pages: last pages always kept (``LONGSEQ_SPARSE_RECENT_PAGES``).
        sparse_summary: dtype of the page summaries (``LONGSEQ_SPARSE_SUMMARY``): ``fp8`` (e4m3, rounded
            outward so the Quest bound still holds; half the bytes to score), ``cache`` (the KV cache dtype,
            exact), or ``auto`` (fp8 on GPUs that support it, else the cache dtype).
        sparse_group_score: how a GQA group's query heads combine their Quest page bounds
            (``LONGSEQ_SPARSE_GROUP_SCORE``): ``max`` (the largest head's bound, the default: keeps pages that a
            single head needs, such as a retrieved needle) or ``sum`` (one score for the group's summed query,
            Quest's; faster at larger batches, but it loses pass keys: docs/benchmarks/sparse.md).
        sparse_topk_split_rows: GPU tuning (``LONGSEQ_SPARSE_TOPK_SPLIT_ROWS``): a decode launch with fewer rows
            (requests x KV heads) than this splits each row's top-k over several programs; unset: the kernel's
            default (``kernels/sparse_decode/topk_split.SPLIT_MAX_ROWS``); 0: never split. Same pages either way.
        sparse_topk: the GPU page top-k (``LONGSEQ_SPARSE_TOPK``): ``auto`` (ours, Triton) or ``flashinfer``
            (FlashInfer's radix top-k; needs FlashInfer, checked at start-up; same pages up to ties).
        sparse_reuse_steps: a decode row selects its pages every N steps and in between attends to the pages it
            kept plus every page written since (``LONGSEQ_SPARSE_REUSE_STEPS``; 1, the default: select every step;
            larger N trades fidelity for speed: docs/benchmarks/sparse.md#selection-reuse-longseq_sparse_reuse_steps).
        duo_pattern: duo mode: the DuoAttention head pattern (``LONGSEQ_DUO_PATTERN``): a folder in the
            authors' format (``full_attention_heads.tsv`` + ``config.json``) or a built-in name such as
            ``smollm2-135m-instruct``, or ``random`` / ``random:<seed>`` (random gates for the model's shape, built at
            start-up: shape-only benchmarks). Required when ``attention`` is ``duo``.
        duo_sparsity: fraction of all KV heads made streaming, the lowest gates first (``LONGSEQ_DUO_SPARSITY``,
            in [0, 1]). Exclusive with ``duo_threshold``; when both are unset, duo mode uses sparsity 0.5.
        duo_threshold: KV heads whose gate is below this value stream (``LONGSEQ_DUO_THRESHOLD``, in [0, 1]).
        duo_sink: attention-sink tokens kept by streaming heads (``LONGSEQ_DUO_SINK``); unset = the pattern's
            ``sink_size`` (64 for patterns that have none).
        duo_recent: most recent tokens kept by streaming heads, the query's own included (``LONGSEQ_DUO_RECENT``);
            unset = the pattern's ``recent_size`` (256 for patterns that have none).
        duo_hybrid_decode_batch: GPU duo decode steps of at least this many requests run FlashAttention on the
            retrieval heads and the Triton kernel on the streaming heads (``LONGSEQ_DUO_HYBRID_DECODE_BATCH``,
            default 8); 0 = one Triton launch for all heads at every batch size. The hybrid pays off only at
            larger batches (docs/benchmarks/duo.md).
        duo_memory: duo mode (vLLM): streaming KV heads keep only ``sink + recent`` tokens in the paged cache
            (``LONGSEQ_DUO_MEMORY``, ``0``/``1``), so the scheduler admits more requests. Every layer then streams the
            same number of KV heads (``duo_sparsity`` applied per layer on each tensor-parallel rank), each layer
            runs as two attention layers (retrieval heads: full KV; streaming heads: a sink + window KV group);
            ``duo_threshold`` is refused (it gives layers different counts). See docs/duo-memory.md.
        kda: run Kimi Delta Attention (Kimi-Linear's linear-attention layers) on longseq's KDA kernels instead of
            the framework's vendored ones (``LONGSEQ_KDA``, ``0``/``1``): vLLM's KDA layer is replaced through its
            out-of-tree layer registry, SGLang's through its KDA kernel dispatcher.
        kda_prefill: under ``kda``, which chunk (prefill) kernel runs (``LONGSEQ_KDA_PREFILL``): only
            ``framework`` (the framework's own); ``longseq`` (longseq's chunk kernel, removed) is refused with an
            error saying so. Decode always runs longseq's kernel.
    """

    attention: str = "dense"
    cpu_override: bool = False
    sglang_dense_backend: str = "auto"
    trace_dir: str | None = None
    debug_fault: str = "none"
    cpu_kernel: str = "vllm"
    sparse_budget: int = 2048
    sparse_page_size: int = 8
    sparse_dense_layers: int = 2
    sparse_sink_pages: int = 1
    sparse_recent_pages: int = 8
    sparse_summary: str = "auto"
    sparse_topk_split_rows: int | None = None
    sparse_group_score: str = "max"
    sparse_reuse_steps: int = 1
    sparse_topk: str = "auto"
    duo_pattern: str | None = None
    duo_sparsity: float | None = None
    duo_threshold: float | None = None
    duo_sink: int | None = None
    duo_recent: int | None = None
    duo_hybrid_decode_batch: int = 8
    duo_memory: bool = False
    kda: bool = False
    kda_prefill: str = "framework"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_TECHNIQUES:
            raise LongSeqConfigError(
                f"LONGSEQ_ATTENTION={self.attention!r} is not a longseq technique; "
                f"allowed values: {', '.join(ATTENTION_TECHNIQUES)}"
            )
        if self.kda_prefill == "longseq":
            raise LongSeqConfigError(
                "LONGSEQ_KDA_PREFILL='longseq': longseq's KDA chunk prefill kernel was removed; prefill runs on the "
                "framework's own kernel (vLLM's vendored fla chunk_kda, SGLang's extend kernel): unset "
                "LONGSEQ_KDA_PREFILL (or set it to framework)")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise LongSeqConfigError(f"{self.ENV_NAMES[name]}={getattr(self, name)!r} is not allowed; "
                                         f"allowed values: {', '.join(allowed)}")
        self._check_sparse()
        self._check_duo()

    def _check_sparse(self) -> None:
        env = self.ENV_NAMES
        for name in ("sparse_budget", "sparse_page_size", "sparse_reuse_steps"):
            if getattr(self, name) <= 0:
                raise LongSeqConfigError(f"{env[name]}={getattr(self, name)} must be a positive integer")
        for name in ("sparse_dense_layers", "sparse_sink_pages", "sparse_recent_pages", "sparse_topk_split_rows"):
            if (getattr(self, name) or 0) < 0:
                raise LongSeqConfigError(f"{env[name]}={getattr(self, name)} must be >= 0")
        p = self.sparse_page_size
        if p & (p - 1):
            raise LongSeqConfigError(f"LONGSEQ_SPARSE_PAGE_SIZE={p} must be a power of two (it divides the KV block size)")
        if self.sparse_budget % p:
            raise LongSeqConfigError(
                f"LONGSEQ_SPARSE_BUDGET={self.sparse_budget} must be a multiple of LONGSEQ_SPARSE_PAGE_SIZE={p}")
        if self.sparse_sink_pages + self.sparse_recent_pages > self.sparse_budget // p:
            raise LongSeqConfigError(
                f"LONGSEQ_SPARSE_SINK_PAGES + LONGSEQ_SPARSE_RECENT_PAGES ({self.sparse_sink_pages} + "
                f"{self.sparse_recent_pages}) exceed the budget of {self.sparse_budget // p} pages")

    def _check_duo(self) -> None:
        env = self.ENV_NAMES
        if self.attention == "duo" and not self.duo_pattern:
            raise LongSeqConfigError(
                "LONGSEQ_ATTENTION=duo needs LONGSEQ_DUO_PATTERN: a DuoAttention pattern folder "
                "(full_attention_heads.tsv + config.json) or a built-in pattern name such as smollm2-135m-instruct")
        if self.duo_sparsity is not None and self.duo_threshold is not None:
            raise LongSeqConfigError(
                f"LONGSEQ_DUO_SPARSITY={self.duo_sparsity} and LONGSEQ_DUO_THRESHOLD={self.duo_threshold} are both "
                "set; they are mutually exclusive: set one (or neither: sparsity 0.5)")
        for name in ("duo_sparsity", "duo_threshold"):
            val = getattr(self, name)
            if val is not None and not 0.0 <= val <= 1.0:
                raise LongSeqConfigError(f"{env[name]}={val} must be in [0, 1]")
        if self.duo_hybrid_decode_batch < 0:
            raise LongSeqConfigError(f"{env['duo_hybrid_decode_batch']}={self.duo_hybrid_decode_batch} must be >= 0 "
                                     "(0: one Triton launch at every batch size)")
        for name in ("duo_sink", "duo_recent"):
            val = getattr(self, name)
            if val is not None and val <= 0:
                raise LongSeqConfigError(f"{env[name]}={val} must be a positive integer (or unset: from the pattern)")
        if self.duo_memory and self.attention != "duo":
            raise LongSeqConfigError(f"LONGSEQ_DUO_MEMORY=1 needs LONGSEQ_ATTENTION=duo (got {self.attention!r})")
        if self.duo_memory and self.duo_threshold is not None:
            raise LongSeqConfigError(
                f"LONGSEQ_DUO_MEMORY=1 with LONGSEQ_DUO_THRESHOLD={self.duo_threshold}: saving KV memory needs the same "
                "number of streaming heads in every layer; use LONGSEQ_DUO_SPARSITY (applied per layer) instead")

    # Environment / JSON field names, in the order `longseq info` prints them.
    ENV_NAMES = {
        "attention": "LONGSEQ_ATTENTION",
        "cpu_override": "LONGSEQ_CPU",
        "sglang_dense_backend": "LONGSEQ_SGLANG_DENSE",
        "trace_dir": "LONGSEQ_TRACE_DIR",
        "debug_fault": "LONGSEQ_DEBUG_FAULT",
        "cpu_kernel": "LONGSEQ_CPU_KERNEL",
        "sparse_budget": "LONGSEQ_SPARSE_BUDGET",
        "sparse_page_size": "LONGSEQ_SPARSE_PAGE_SIZE",
        "sparse_dense_layers": "LONGSEQ_SPARSE_DENSE_LAYERS",
        "sparse_sink_pages": "LONGSEQ_SPARSE_SINK_PAGES",
        "sparse_recent_pages": "LONGSEQ_SPARSE_RECENT_PAGES",
        "sparse_summary": "LONGSEQ_SPARSE_SUMMARY",
        "sparse_topk_split_rows": "LONGSEQ_SPARSE_TOPK_SPLIT_ROWS",
        "sparse_group_score": "LONGSEQ_SPARSE_GROUP_SCORE",
        "sparse_reuse_steps": "LONGSEQ_SPARSE_REUSE_STEPS",
        "sparse_topk": "LONGSEQ_SPARSE_TOPK",
        "duo_pattern": "LONGSEQ_DUO_PATTERN",
        "duo_sparsity": "LONGSEQ_DUO_SPARSITY",
        "duo_threshold": "LONGSEQ_DUO_THRESHOLD",
        "duo_sink": "LONGSEQ_DUO_SINK",
        "duo_recent": "LONGSEQ_DUO_RECENT",
        "duo_hybrid_decode_batch": "LONGSEQ_DUO_HYBRID_DECODE_BATCH",
        "duo_memory": "LONGSEQ_DUO_MEMORY",
        "kda": "LONGSEQ_KDA",
        "kda_prefill": "LONGSEQ_KDA_PREFILL",
    }

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config",
                     display: Mapping[str, str] | None = None) -> "LongSeqConfig":
        """Build from a dict keyed by field name (a JSON config file). Unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise LongSeqConfigError(
                f"unknown key(s) {', '.join(map(repr, unknown))} in {source}; allowed keys: {', '.join(fields)}"
            )
        kwargs: dict[str, Any] = {}
        for name, raw in values.items():
            where = (display or {}).get(name) or f"{source} key {name!r}"
            kwargs[name] = _coerce(name, raw, fields[name].type, where)
        return cls(**kwargs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "LongSeqConfig":
        """Build from ``LONGSEQ_CONFIG`` (a JSON file) overlaid with individual ``LONGSEQ_*`` variables."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = env.get("LONGSEQ_CONFIG")
        if path:
            try:
                with open(path) as f:
                    loaded = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise LongSeqConfigError(f"LONGSEQ_CONFIG={path!r} cannot be read as JSON: {e}") from e
            if not isinstance(loaded, dict):
                raise LongSeqConfigError(f"LONGSEQ_CONFIG={path!r} must hold a JSON object")
            values.update(loaded)
        known_env = set(cls.ENV_NAMES.values()) | {"LONGSEQ_CONFIG"}
        stray = sorted(k for k in env if k.startswith("LONGSEQ_") and k not in known_env and k not in _FOREIGN_OK)
        if stray:
            raise LongSeqConfigError(
                f"unknown environment variable(s) {', '.join(stray)}; longseq reads: {', '.join(sorted(known_env))}"
            )
        from_env_vars = {}
        for field, var in cls.ENV_NAMES.items():
            if var in env:
                values[field] = env[var]
                from_env_vars[field] = var
        return cls.from_mapping(values, source="environment" if not path else f"LONGSEQ_CONFIG={path!r}",
                                display=from_env_vars)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Variables with the LONGSEQ_ prefix that belong to tooling (tests, benchmarks), not the plugin.
_FOREIGN_OK = {"LONGSEQ_TEST_MODEL", "LONGSEQ_CACHE_DIR", "LONGSEQ_VENV", "LONGSEQ_SGLANG_VENV", "LONGSEQ_RESULTS_DIR"}


def _coerce(name: str, raw: Any, type_name: Any, where: str) -> Any:
    t = str(type_name)
    if t == "bool":
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise LongSeqConfigError(f"{where}={raw!r} must be a boolean (1/0, true/false)")
    if t in ("int | None", "float | None"):  # optional numbers: unset (None / empty string) or the number
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        t = t.split(" |")[0]
    if t == "int":
        if isinstance(raw, bool):
            raise LongSeqConfigError(f"{where}={raw!r} must be an integer")
        try:
            return int(str(raw).strip())
        except ValueError:
            raise LongSeqConfigError(f"{where}={raw!r} must be an integer") from None
    if t == "float":
        if isinstance(raw, bool):
            raise LongSeqConfigError(f"{where}={raw!r} must be a number")
        try:
            val = float(str(raw).strip())
        except ValueError:
            raise LongSeqConfigError(f"{where}={raw!r} must be a number") from None
        if not math.isfinite(val):
            raise LongSeqConfigError(f"{where}={raw!r} must be a finite number")
        return val
    if t.startswith("str | None"):
        return None if raw in (None, "") else str(raw)
    if t == "str":
        lowered = ("attention", "debug_fault", "sglang_dense_backend", "cpu_kernel", "sparse_summary",
                   "sparse_group_score", "sparse_topk")
        return str(raw).strip().lower() if name in lowered else str(raw)
    raise AssertionError(f"no coercion for {name}: {t}")  # a new field must add its coercion


_CACHED: LongSeqConfig | None = None


def get_config(refresh: bool = False) -> LongSeqConfig:
    """The process-wide config, built from the environment on first use (validated then)."""
    global _CACHED
    if _CACHED is None or refresh:
        _CACHED = LongSeqConfig.from_env()
    return _CACHED
