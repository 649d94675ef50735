"""The vLLM CUDA backend's duo forward (``LongSeqFlashImpl._duo_forward``) run the way the engine runs it.

One engine-like step: a vLLM-layout cache ``[num_blocks, Hkv, block_size, 2*D]`` with shuffled blocks, a batch
mixing decode rows and prefill chunks (one with a cached prefix, one fresh), in vLLM's order (any), plus
CUDA-graph padding rows. Checked against ``duo_paged_attention_ref`` (fp32) and, with a window covering every
context, against plain FlashAttention over all heads, with errors per query head.

On a GPU FlashAttention is vLLM's (``vllm.vllm_flash_attn``, FA3 on Hopper) on strided head views; without one
the same code runs with the Triton kernel in the interpreter and ``flash_attn_varlen_func`` replaced by an fp32
reference with FlashAttention's signature, so the head slicing, strides and in-place writes of
``flash_retrieval_heads`` are exercised on CPU too.

    source /tmp/lsq-bundle/env.sh && python -m pytest tests/gpu/test_duo_flash_gpu.py -q -s
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from longseq.kernels.score_mods import ScoreMods

pytest.importorskip("triton")

from paged_tables import scattered_block_table  # noqa: E402
from triton_interp import CUDA, import_kernels, interpreter_env  # noqa: E402

import_kernels("longseq.kernels.duo_attention.unified")
_interpreter_env = pytest.fixture(autouse=True, scope="module")(interpreter_env)
flash = pytest.importorskip("longseq.attention_backends.vllm.flash")

from longseq.attention_backends.core.duo import StreamingHeadMask  # noqa: E402
from longseq.attention_backends.vllm.common import BackendTrace  # noqa: E402
from longseq.kernels.duo_attention import duo_paged_attention_ref  # noqa: E402
from longseq.config import LongSeqConfig  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
LAYER = types.SimpleNamespace(layer_name="model.layers.1.self_attn.attn")


class Step:
    """One step: requests ``(cached, new)`` over a vLLM-layout paged cache, ``pad`` CUDA-graph padding rows."""

    def __init__(self, reqs, hq, hkv, d, dtype, seed, block_size=16, pad=2):
        g = torch.Generator().manual_seed(seed)
        seq_lens = [c + n for c, n in reqs]
        nblk = [-(-s // block_size) for s in seq_lens]
        num_blocks = sum(nblk) + 3
        table = scattered_block_table(nblk, num_blocks, max(nblk) + 2, g)
        q_lens = [n for _, n in reqs]
        t = sum(q_lens)
        self.hq, self.hkv, self.d, self.dtype = hq, hkv, d, dtype
        # vLLM's cache: [num_blocks, Hkv, block_size, 2*D] logical view; K and V are strided views of it.
        self.kv_cache = torch.randn(num_blocks, hkv, block_size, 2 * d, generator=g).to(dtype).to(DEV)
        self.key_cache, self.value_cache = self.kv_cache.transpose(1, 2).split(d, dim=-1)
        # vLLM's query is a slice of the fused qkv projection: rows strided past Hq*D.
        qkv = torch.randn(t + pad, (hq + 2 * hkv) * d, generator=g).to(dtype).to(DEV)
        self.query = qkv[:, : hq * d]
        self.block_table = table.to(DEV)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
        self.qsl_cpu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
        self.qsl = self.qsl_cpu.to(DEV)
        self.t, self.nr, self.max_query_len = t, len(reqs), max(q_lens)
        self.scale = d ** -0.5

    def meta(self):
        step = types.SimpleNamespace(num_actual_tokens=self.t, num_reqs=self.nr, block_table=self.block_table,
                                     seq_lens=self.seq_lens, query_start_loc=self.qsl,
                                     max_query_len=self.max_query_len)
        return types.SimpleNamespace(step=step, block_table=self.block_table, seq_lens=self.seq_lens,
                                     query_start_loc=self.qsl, max_query_len=self.max_query_len,
                                     max_seq_len=int(self.seq_lens.max()), max_num_splits=0)

    def ref(self, is_streaming, sink, recent):
        """``[T, Hq, D]`` fp32 reference (from the rounded inputs)."""
        q = self.query[: self.t].view(self.t, self.hq, self.d).float()
        return duo_paged_attention_ref(q, self.key_cache.float(), self.value_cache.float(), self.block_table,
                                       self.qsl_cpu, self.seq_lens, is_streaming.cpu(), sink, recent, self.scale)

    def duo_forward(self, is_streaming, sink, recent, hybrid_decode_batch=0):
        """``[T, Hq, D]``: the impl's duo forward, as vLLM calls it (output has the padding rows too)."""
        impl = object.__new__(flash.LongSeqFlashImpl)
        impl.num_heads, impl.head_size, impl.scale = self.hq, self.d, self.scale
        impl.vllm_flash_attn_version = _fa_version()
        impl.duo = StreamingHeadMask(torch.stack([~is_streaming.cpu(), is_streaming.cpu()]), sink, recent)
        impl._duo_layer = None
        impl._duo_pattern_rows = [0, 1]  # the two-layer pattern, no sliding-window layers
        impl.score_mods = ScoreMods()  # no soft-cap, no sinks (``_init_techniques`` sets it)
        impl.config = LongSeqConfig(duo_hybrid_decode_batch=hybrid_decode_batch)
        impl.trace = BackendTrace("test", impl.config)
        impl._duo_for(LAYER, torch.device(DEV))
        output = torch.full((self.query.shape[0], self.hq * self.d), float("nan"), dtype=self.dtype, device=DEV)
        impl._duo_forward(LAYER, self.query, self.kv_cache, self.meta(), output)
        assert impl.trace.counts["duo_calls"] == 1
        return output[: self.t].view(self.t, self.hq, self.d)

    def flash_all_heads(self):
        """``[T, Hq, D]``: plain FlashAttention over every head (the dense path of the engine)."""
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        q = self.query[: self.t].view(self.t, self.hq, self.d)
        out = torch.empty_like(q)
        m = self.meta()
        flash_attn_varlen_func(q=q, k=self.key_cache, v=self.value_cache, out=out, cu_seqlens_q=m.query_start_loc,
                               max_seqlen_q=m.max_query_len, seqused_k=m.seq_lens, max_seqlen_k=m.max_seq_len,
                               softmax_scale=self.scale, causal=True, block_table=m.block_table,
                               fa_version=_fa_version())
        return out


def _fa_version() -> int:
    """FA3 where supported (Hopper), else FA2, as vLLM picks."""
    if not CUDA:
        return 3
    from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

    return 3 if is_fa_version_supported(3) else 2


@pytest.fixture(autouse=True)
def _flash_on_cpu(monkeypatch):
    """Without CUDA: ``vllm.vllm_flash_attn`` replaced by an fp32 reference with FlashAttention's signature that
    writes into ``out`` in place (so a copy instead of a view anywhere would leave NaNs in the result)."""
    if CUDA:
        yield
        return

    def flash_attn_varlen_func(*, q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k,
                               softmax_scale, causal, block_table, fa_version=None, num_splits=0, **_):
        assert causal and q.stride(-1) == 1 and k.stride(-1) == 1 and out.stride(-1) == 1
        assert int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) <= max_seqlen_q <= q.shape[0]
        dense = torch.zeros(k.shape[2], dtype=torch.bool)
        res = duo_paged_attention_ref(q.float(), k.float(), v.float(), block_table, cu_seqlens_q.cpu(), seqused_k,
                                      dense, 1, 1, softmax_scale)
        t = int(cu_seqlens_q[-1])
        out[:t] = res[:t].to(out.dtype)
        return out

    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn",
                        types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    yield


def per_head_errors(out, ref):
    """``(max_rel, mean_abs)``: ``[Hq]`` max |out - ref| / max |ref| and mean |out - ref| per query head."""
    err = (out.float() - ref).abs()
    return err.amax(dim=(0, 2)) / ref.abs().amax(dim=(0, 2)), err.mean(dim=(0, 2))


def _report(name, is_streaming, group, **errs):
    kinds = ["S" if is_streaming[h // group] else "R" for h in range(len(next(iter(errs.values()))[0]))]
    print(f"\n{name}: per query head (S streaming, R retrieval), max rel err / mean abs err vs fp32")
    print("  head  " + " ".join(f"{h:>3}{k}" + " " * 14 for h, k in enumerate(kinds)))
    for label, (mx, mean) in errs.items():
        print(f"  {label:<6}" + " ".join(f"{a:.1e}/{b:.1e}  " for a, b in zip(mx.tolist(), mean.tolist())))


# Engine-like mixed steps: decodes, a chunk after a cached prefix, a fresh prefill, in vLLM's (unsorted) order.
GPU_MIXED = [(1900, 1), (1200, 800), (700, 1), (0, 300), (60, 1)]
CPU_MIXED = [(99, 1), (50, 40), (30, 1), (0, 27), (5, 1)]
SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}  # (Hq, Hkv, D)


def _mask(hkv):
    return torch.tensor([i % 2 == 0 for i in range(hkv)])  # streaming, retrieval, ...: several retrieval runs


@pytest.mark.parametrize("decode_only,hybrid", [(False, False), (True, False), (True, True)])
def test_window_covering_everything_is_dense(decode_only, hybrid):
    """Sink + recent covering every context: duo must be dense attention up to rounding, on every head (decode
    steps through the one-launch kernel, or with ``hybrid`` FlashAttention on the retrieval heads)."""
    if CUDA:
        hq, hkv, d = SHAPES["smollm2"]
        reqs, dtype = [r for r in GPU_MIXED if not decode_only or r[1] == 1], torch.bfloat16
    else:
        hq, hkv, d = 6, 3, 32
        reqs, dtype = [r for r in CPU_MIXED if not decode_only or r[1] == 1], torch.float32
    s = Step(reqs, hq, hkv, d, dtype, seed=11)
    mask = _mask(hkv)
    ours = s.duo_forward(mask, 64, 8192, hybrid_decode_batch=1 if hybrid else 0)
    dense_ref = s.ref(torch.zeros_like(mask), 1, 1)
    assert torch.isfinite(ours).all(), "rows left unwritten"
    assert torch.allclose(s.ref(mask, 64, 8192), dense_ref)  # the reference agrees that this is dense
    mx, mean = per_head_errors(ours, dense_ref)
    if not CUDA:  # fp32 through the interpreter: exact up to fp32 rounding
        assert mx.max() < 1e-4, mx
        return
    fmx, fmean = per_head_errors(s.flash_all_heads(), dense_ref)
    _report("window covers everything" + (" (decode only)" if decode_only else "") + (" hybrid" if hybrid else ""),
            mask, hq // hkv,
            duo=(mx, mean), flash=(fmx, fmean))
    # Rounding, not a bug: every head's error within twice FlashAttention's own error on that head (both round
    # P and the output to bf16), and a bf16-sized maximum.
    assert mx.max() < 2e-2, mx
    assert (mean <= 2 * fmean + 1e-5).all(), (mean, fmean)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_mixed_step_matches_reference(shape):
    """Default-like sizes (sink 64, recent 256 on GPU) on a mixed step: every head vs the fp32 reference;
    retrieval heads (FlashAttention on strided head views) as close as FlashAttention over all heads."""
    hq, hkv, d = SHAPES[shape] if CUDA else (8, 4, 32)
    reqs, dtype = (GPU_MIXED, torch.bfloat16) if CUDA else (CPU_MIXED, torch.float32)
    sink, recent = (64, 256) if CUDA else (8, 16)
    s = Step(reqs, hq, hkv, d, dtype, seed=12)
    mask = _mask(hkv)
    ours = s.duo_forward(mask, sink, recent)
    ref = s.ref(mask, sink, recent)
    assert torch.isfinite(ours).all(), "rows left unwritten"
    mx, mean = per_head_errors(ours, ref)
    if not CUDA:
        assert mx.max() < 1e-4, mx
        return
    fmx, fmean = per_head_errors(s.flash_all_heads(), s.ref(torch.zeros_like(mask), 1, 1))
    _report(f"mixed step, {shape}, sink {sink} recent {recent}", mask, hq // hkv, duo=(mx, mean),
            flash=(fmx, fmean))
    assert mx.max() < 2e-2, mx
    retrieval = ~mask.repeat_interleave(hq // hkv)
    assert (mean[retrieval] <= 2 * fmean[retrieval] + 1e-5).all(), (mean, fmean)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_retrieval_heads_on_head_views_equal_flash_on_those_heads():
    """FlashAttention on a strided head view gives what it gives on a contiguous copy of those heads (no stride
    mistake in ``flash_retrieval_heads``); bitwise unless FlashAttention schedules the two differently."""
    hq, hkv, d = SHAPES["llama8b"]
    s = Step(GPU_MIXED, hq, hkv, d, torch.bfloat16, seed=13)
    mask = _mask(hkv)
    ours = s.duo_forward(mask, 64, 256)
    g = hq // hkv
    for lo, hi in flash.retrieval_head_runs(mask):
        part = Step.__new__(Step)
        part.__dict__.update(s.__dict__)
        part.hq, part.hkv = (hi - lo) * g, hi - lo
        part.key_cache, part.value_cache = (c[:, :, lo:hi].contiguous() for c in (s.key_cache, s.value_cache))
        q = s.query[: s.t].view(s.t, hq, d)[:, lo * g : hi * g].contiguous()
        part.query, part.t = q.view(s.t, -1), s.t
        want = part.flash_all_heads()
        got = ours[:, lo * g : hi * g]
        diff = (got.float() - want.float()).abs().max().item()
        print(f"retrieval heads {lo}..{hi - 1}: max |view - contiguous| = {diff:.2e}")
        assert diff <= 1e-2 * want.float().abs().max().item(), diff
