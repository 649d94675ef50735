"""Contracts of our vLLM backend classes that the engine relies on (checked against the installed vLLM)."""

from __future__ import annotations

import pytest
import torch

from longseq.config import LongSeqConfigError


def test_cpu_backend_keeps_cpu_attn_contract():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from longseq.attention_backends.vllm.cpu import LongSeqCPUBackend, LongSeqCPUImpl, LongSeqCPUMetadataBuilder

    assert issubclass(LongSeqCPUBackend, CPUAttentionBackend)  # isinstance checks elsewhere in vLLM keep working
    assert LongSeqCPUBackend.get_name() == "CPU_ATTN"
    assert LongSeqCPUBackend.supported_kv_cache_layouts() == CPUAttentionBackend.supported_kv_cache_layouts()
    assert LongSeqCPUBackend.get_impl_cls() is LongSeqCPUImpl
    assert LongSeqCPUBackend.get_builder_cls() is LongSeqCPUMetadataBuilder
    assert LongSeqCPUBackend.supports_attn_type("decoder") and not LongSeqCPUBackend.supports_attn_type("encoder")


@pytest.mark.parametrize("kwargs,match", [
    ({"head_size": 48}, "head size 48 is not supported"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype='fp8' is not supported"),
    ({"attn_type": "encoder_only"}, "attention type 'encoder_only' is not supported"),
    ({"alibi_slopes": [0.5] * 8}, "alibi_slopes"),
    ({"num_heads": 10, "num_kv_heads": 4}, "not a multiple"),
])
def test_cpu_impl_rejects_unsupported_layers(kwargs, match):
    from longseq.attention_backends.vllm.cpu import LongSeqCPUImpl

    args = {"num_heads": 8, "head_size": 64, "scale": 0.125, "num_kv_heads": 2, **kwargs}
    with pytest.raises(LongSeqConfigError, match=match):
        LongSeqCPUImpl(**args)


@pytest.fixture
def cpu_impl_factory(monkeypatch):
    """Build a ``LongSeqCPUImpl`` under a LONGSEQ_* environment, as the engine would while building layers."""
    import types

    import vllm.v1.attention.backends.cpu_attn as cpu_attn

    from longseq.attention_backends.vllm import techniques
    from longseq.attention_backends.vllm.cpu import LongSeqCPUImpl
    from longseq.config import get_config

    fake = types.SimpleNamespace(
        model_config=types.SimpleNamespace(dtype=torch.float32, get_total_num_kv_heads=lambda: 2),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=1))
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: fake)
    monkeypatch.setattr(techniques, "_current_vllm_config", lambda vllm_config=None: fake)
    # a Gemma-3-style model: layers 0-4 windowed, 5 global, 2 KV heads
    monkeypatch.setattr(techniques, "model_global_layer_rows", lambda vllm_config=None: [None] * 5 + [0])

    def build(env: dict[str, str], **layer):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        get_config(refresh=True)
        try:
            return LongSeqCPUImpl(**{"num_heads": 8, "head_size": 64, "scale": 0.125, "num_kv_heads": 2, **layer})
        finally:
            for k in env:
                monkeypatch.delenv(k)
            get_config(refresh=True)

    return build


@pytest.mark.parametrize("env", [{"LONGSEQ_ATTENTION": "sparse"}, {"LONGSEQ_CPU_KERNEL": "torch"},
                                 {"LONGSEQ_ATTENTION": "dense"}])
def test_cpu_windowed_layer_keeps_vllm_kernel_and_no_technique(cpu_impl_factory, env):
    """Windowed layers run vLLM's CPU kernel with their window in every mode; no technique applies to them."""
    impl = cpu_impl_factory(env, sliding_window=64)
    assert impl.windowed and impl.sliding_window == 64  # the stock kernel's window
    assert not impl.use_torch and impl.sparse is None and impl.duo is None
    impl = cpu_impl_factory(env)  # the same mode on a global layer
    assert not impl.windowed and impl.use_torch == (env != {"LONGSEQ_ATTENTION": "dense"})
    assert (impl.sparse is not None) == (env == {"LONGSEQ_ATTENTION": "sparse"})


def test_cpu_duo_windowed_layer_runs_dense_global_layer_gets_a_pattern_row(cpu_impl_factory):
    """The duo pattern has one row per global layer: layer 5 (the only global one) reads row 0."""
    import types

    duo = {"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": "random:0"}
    windowed = cpu_impl_factory(duo, sliding_window=64)
    assert windowed.duo is None and not windowed.use_torch
    glob = cpu_impl_factory(duo)
    assert glob.use_torch and glob.duo.num_layers == 1 and glob.duo.num_kv_heads == 2
    layer = glob._duo_for(types.SimpleNamespace(layer_name="model.layers.5.self_attn.attn"), torch.device("cpu"))
    assert torch.equal(layer.is_streaming.bool(), glob.duo.for_layer(0))


@pytest.mark.parametrize("mode", ["sparse", "duo", "torch"])
@pytest.mark.parametrize("feature", ["logits_soft_cap", "sinks"])
def test_cpu_global_layer_with_soft_cap_or_sinks_runs_our_path_with_them(cpu_impl_factory, mode, feature):
    """Sparse, duo and the torch kernel apply a global layer's soft-cap and sinks (``score_mods``); a windowed layer
    with them, and dense mode, keep vLLM's kernel."""
    value = 50.0 if feature == "logits_soft_cap" else torch.randn(8)
    env = {"LONGSEQ_CPU_KERNEL": "torch"} if mode == "torch" else {"LONGSEQ_ATTENTION": mode,
                                                                   "LONGSEQ_DUO_PATTERN": "random:0"}
    impl = cpu_impl_factory(env, **{feature: value})
    assert impl.use_torch
    assert impl.score_mods.softcap == (50.0 if feature == "logits_soft_cap" else None)
    assert (impl.score_mods.sinks is value) if feature == "sinks" else impl.score_mods.sinks is None
    assert not cpu_impl_factory(env, sliding_window=64, **{feature: value}).use_torch
    assert not cpu_impl_factory({"LONGSEQ_ATTENTION": "dense"}, **{feature: value}).use_torch


def test_cpu_impl_forward_matches_reference_through_vllm_cache_view(monkeypatch):
    """The torch-kernel impl's KV write + attention on a vLLM-shaped [B, H, N, 2D] cache equals the reference."""
    import types

    import vllm.v1.attention.backends.cpu_attn as cpu_attn

    from longseq.attention_backends.vllm.common import LongSeqStepInfo
    from longseq.attention_backends.vllm.cpu import LongSeqCPUImpl, LongSeqCPUMetadata
    from longseq.kernels.paged_attention.naive import gather_paged_kv
    from longseq.config import get_config

    monkeypatch.setenv("LONGSEQ_CPU_KERNEL", "torch")
    get_config(refresh=True)
    torch.manual_seed(0)
    hq, hkv, d, n, blocks = 6, 2, 64, 32, 8
    # The stock impl reads the model dtype from the current vLLM config (set by the engine while it builds layers).
    fake = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=torch.float32))
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: fake)
    impl = LongSeqCPUImpl(num_heads=hq, head_size=d, scale=d ** -0.5, num_kv_heads=hkv)
    monkeypatch.delenv("LONGSEQ_CPU_KERNEL")
    get_config(refresh=True)
    assert impl.use_torch
    kv_cache = torch.randn(blocks, hkv, n, 2 * d)
    # One request, 40 tokens of prefill in blocks [5, 2].
    t = 40
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    block_table = torch.tensor([[5, 2]], dtype=torch.int32)
    pos = torch.arange(t)
    slots = block_table[0][pos // n].long() * n + pos % n
    step = LongSeqStepInfo(num_reqs=1, num_actual_tokens=t, query_start_loc=torch.tensor([0, t], dtype=torch.int32),
                           query_start_loc_cpu=torch.tensor([0, t], dtype=torch.int32),
                           seq_lens=torch.tensor([t], dtype=torch.int32), block_table=block_table, slot_mapping=slots,
                           max_query_len=t, max_seq_len=t, num_decode_reqs=0, num_leading_decodes=0,
                           block_size=n)

    class Layer:
        layer_name = "model.layers.0.self_attn.attn"

    impl.do_kv_cache_update(Layer(), k, v, kv_cache, slots)
    out = torch.zeros(t, hq * d)
    meta = LongSeqCPUMetadata(num_actual_tokens=t, max_query_len=t, query_start_loc=step.query_start_loc,
                              max_seq_len=t, seq_lens=step.seq_lens, block_table=block_table, slot_mapping=slots,
                              scheduler_metadata=None, step=step)
    impl.forward(Layer(), q, k, v, kv_cache, meta, out)
    # The cache holds K then V per (block, head) as vLLM's CPU kernels expect.
    key_cache = kv_cache.view(blocks, hkv, 2 * n, d)[:, :, :n]
    torch.testing.assert_close(gather_paged_kv(key_cache, block_table[0], t).transpose(0, 1), k)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(3, 1).transpose(0, 1), v.repeat_interleave(3, 1).transpose(0, 1),
        is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out.view(t, hq, d), ref, atol=1e-5, rtol=1e-5)


def test_cpu_windowed_group_with_prefix_caching_warns():
    """Only a sliding-window KV group (the hybrid KV cache manager on) with prefix caching gets the warning."""
    import types

    from longseq.attention_backends.vllm.cpu import windowed_prefix_cache_warning

    cfg = lambda on: types.SimpleNamespace(cache_config=types.SimpleNamespace(enable_prefix_caching=on))  # noqa: E731
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    shape = {"block_size": 16, "num_kv_heads": 1, "head_size": 64, "dtype": torch.bfloat16}
    windowed = SlidingWindowSpec(**shape, sliding_window=1024)
    full = FullAttentionSpec(**shape, sliding_window=1024)  # the hybrid manager off: windowed layers look like this
    assert "--disable-hybrid-kv-cache-manager" in windowed_prefix_cache_warning(windowed, cfg(True))
    assert windowed_prefix_cache_warning(windowed, cfg(False)) is None
    assert windowed_prefix_cache_warning(full, cfg(True)) is None
