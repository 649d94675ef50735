"""LONGSEQ_DUO_MEMORY's pieces without an engine: the per-layer streaming mask, the sink-window gap, vLLM's KV-cache
spec/manager for the streaming heads (with vLLM's real block pool), and the start-up refusals."""

from __future__ import annotations

import pytest
import torch

from longseq.attention_backends.core.duo import per_layer_streaming
from longseq.config import LongSeqConfig, LongSeqConfigError


def test_per_layer_streaming_takes_the_lowest_gates_of_every_layer():
    gates = torch.rand(7, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = per_layer_streaming(gates, 0.5)
    assert mask.sum(1).tolist() == [4] * 7
    for row, g in zip(mask, gates):
        assert g[row].max() < g[~row].min()
    assert per_layer_streaming(gates, 0.0).sum() == 0 and per_layer_streaming(gates, 1.0).all()
    assert per_layer_streaming(gates, 1 / 3)[:, :].sum(1).tolist() == [3] * 7  # floor(8/3 + 1/2) = 3


def test_config_refuses_duo_memory_without_duo_or_with_threshold():
    with pytest.raises(LongSeqConfigError, match="needs LONGSEQ_ATTENTION=duo"):
        LongSeqConfig(attention="sparse", duo_memory=True)
    with pytest.raises(LongSeqConfigError, match="LONGSEQ_DUO_SPARSITY"):
        LongSeqConfig(attention="duo", duo_pattern="x", duo_threshold=0.5, duo_memory=True)
    assert LongSeqConfig.from_env({"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": "x",
                                   "LONGSEQ_DUO_MEMORY": "1"}).duo_memory


@pytest.mark.parametrize("processed,expected", [(0, (1, 1)), (40, (1, 1)), (95, (1, 2)), (96, (1, 2)),
                                                (200, (1, 8))])
def test_sink_window_gap(processed, expected):
    from longseq.attention_backends.vllm.duo_memory import sink_window_gap

    # sink 10 -> block 0 stays; the next query p = processed sees j >= p - 63
    assert sink_window_gap(processed, sink=10, recent=64, block_size=16) == expected
    first, last = sink_window_gap(processed, 10, 64, 16)
    p = processed
    for b in range(first, last):  # every freed block: no token a query from p on may read
        assert all(not (j < 10 or j > p - 64) for j in range(b * 16, (b + 1) * 16))


def _spec(**kw):
    from longseq.attention_backends.vllm.duo_memory import SinkWindowSpec

    return SinkWindowSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16,
                          sink_tokens=kw.get("sink", 10), recent_tokens=kw.get("recent", 64),
                          in_flight_tokens=kw.get("in_flight", 0))


def test_spec_is_its_own_group_and_uses_the_sink_window_manager():
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from longseq.attention_backends.vllm.duo_memory import SinkWindowManager, as_full_attention

    spec = _spec()
    full = as_full_attention(spec)
    assert type(full) is FullAttentionSpec and full.page_size_bytes == spec.page_size_bytes
    assert KVCacheSpecRegistry.get_manager_class(spec) is SinkWindowManager
    # vLLM must not fold these layers into the full-attention group (it would keep every block)
    assert not full.is_uniform_with_collection({"a": full, "b": spec})
    assert not spec.is_uniform_with_collection({"a": spec, "b": full})


def test_spec_sizes_the_pool_for_sink_plus_window_plus_tokens_in_flight():
    from types import SimpleNamespace

    spec = _spec(sink=10, recent=64)
    cfg = SimpleNamespace(model_config=SimpleNamespace(max_model_len=131072), max_in_flight_tokens=256,
                          scheduler_config=SimpleNamespace(max_num_batched_tokens=256))
    # 1 sink block + cdiv(63 + 256, 16) = 20 window blocks + 1 for a window that starts mid-block
    assert spec.max_memory_usage_bytes(cfg) == 22 * spec.page_size_bytes
    cfg.model_config.max_model_len = 64
    assert spec.max_memory_usage_bytes(cfg) == 4 * spec.page_size_bytes  # never more than the whole context


def test_manager_frees_the_gap_keeps_sink_and_window_and_returns_blocks_to_the_pool():
    from vllm.v1.core.block_pool import BlockPool

    from longseq.attention_backends.vllm.duo_memory import SinkWindowManager

    pool = BlockPool(num_gpu_blocks=64, enable_caching=False, hash_block_size=16)
    mgr = SinkWindowManager(_spec(sink=10, recent=64), block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                            scheduler_block_size=16)
    free0 = pool.get_num_free_blocks()
    mgr.allocate_new_blocks("r", 200, 200)
    blocks = mgr.req_to_blocks["r"]
    assert len(blocks) == 13 and pool.get_num_free_blocks() == free0 - 13
    kept = [b.block_id for b in blocks]
    mgr.remove_skipped_blocks("r", 200)
    null = pool.null_block
    assert [b is null for b in blocks] == [False] + [True] * 7 + [False] * 5
    assert [b.block_id for b in blocks if b is not null] == kept[:1] + kept[8:]
    assert pool.get_num_free_blocks() == free0 - 6
    mgr.remove_skipped_blocks("r", 200)  # idempotent
    assert pool.get_num_free_blocks() == free0 - 6
    mgr.allocate_new_blocks("r", 216, 216)  # decoding on appends after the nulls
    mgr.remove_skipped_blocks("r", 216)
    assert [b is null for b in mgr.req_to_blocks["r"]] == [False] + [True] * 8 + [False] * 5
    mgr.free("r")
    assert pool.get_num_free_blocks() == free0


def test_admission_gate_asks_for_sink_window_and_in_flight_blocks_not_the_whole_prompt():
    """vLLM admits a request only once its whole prompt fits (``scheduler_reserve_full_isl``); the streaming group
    answers with the blocks it holds at most, as vLLM's sliding-window groups do, and the full count elsewhere."""
    from vllm.v1.core.block_pool import BlockPool

    from longseq.attention_backends.vllm.duo_memory import SinkWindowManager

    def manager(in_flight):
        pool = BlockPool(num_gpu_blocks=512, enable_caching=False, hash_block_size=16)
        return SinkWindowManager(_spec(sink=10, recent=64, in_flight=in_flight), block_pool=pool,
                                 enable_caching=False, kv_cache_group_id=0, scheduler_block_size=16)

    def ask(mgr, tokens, gate):
        return mgr.get_num_blocks_to_allocate("r", tokens, [], total_computed_tokens=0, num_local_computed_tokens=0,
                                              num_tokens_main_model=tokens, apply_admission_cap=gate)

    mgr = manager(256)
    assert ask(mgr, 2000, gate=True) == 22  # 1 sink + cdiv(63 + 256, 16) + 1, as the pool is sized
    assert ask(mgr, 2000, gate=False) == 125  # allocating a chunk is unchanged
    assert ask(mgr, 100, gate=True) == 7  # a short prompt: its own blocks
    assert ask(manager(0), 2000, gate=True) == 125  # in-flight unknown: every block, as before


def test_capacity_prices_llama_8b_at_half_streaming_near_half_dense(tmp_path, capsys):
    import json

    from longseq.plugin.cli import main
    from longseq.tools.duo_capacity import kv_capacity

    cfg = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
    r = kv_capacity(cfg, 0.5, sink=64, recent=256, context=129024, chunk=2048)
    assert r["dense_bytes_per_token"] == 32 * 8 * 2 * 128 * 2 and r["duo_bytes_per_token"] == r["dense_bytes_per_token"] // 2
    assert r["duo_bytes_per_request"] == 32 * 4 * 2 * 128 * 2 * (64 + 256 + 2 * 2048)  # two batches in flight
    assert r["duo_bytes_per_request_decoding"] == 32 * 4 * 2 * 128 * 2 * (64 + 256)
    assert 0.5 < r["ratio_decoding"] < r["ratio"] < 0.55
    assert kv_capacity(cfg, 0.5, 64, 256, 129024, chunk=2048, batches=1)["duo_bytes_per_request"] == \
        32 * 4 * 2 * 128 * 2 * (64 + 256 + 2048)
    assert kv_capacity(cfg, 0.5, 64, 256, 129024, tp=2)["kv_heads_per_rank"] == 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["duo", "capacity", "--model", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["streaming_heads_per_layer"] == 4


def test_flash_builder_sizes_its_schedule_for_the_groups_own_heads():
    """The retrieval and streaming sublayers have fewer query heads than the model; FlashAttention's
    ahead-of-time schedule sized for the model's heads is refused by FA3 at the first step (seen on an H100).
    The builder takes each group's count from vLLM's own helper (vLLM 0.26's builder does not call it)."""
    import inspect
    from types import SimpleNamespace

    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers

    flash = pytest.importorskip("longseq.attention_backends.vllm.flash")
    assert "get_num_attention_heads_from_layers(vllm_config, layer_names)" in inspect.getsource(
        flash.LongSeqFlashMetadataBuilder.__init__)

    class Layer(AttentionLayerBase):
        def __init__(self, heads):
            self.impl = SimpleNamespace(num_heads=heads)

    Layer.__abstractmethods__ = frozenset()  # a stand-in: only isinstance and impl.num_heads are read
    layers = {"l0.attn.retrieval": Layer(16), "l1.attn.retrieval": Layer(16), "l0.attn.streaming": Layer(8),
              "l0.attn": SimpleNamespace()}  # the replaced layer is no attention layer
    cfg = SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context=layers))
    assert get_num_attention_heads_from_layers(cfg, ["l0.attn.retrieval", "l1.attn.retrieval"]) == 16
    assert get_num_attention_heads_from_layers(cfg, ["l0.attn.streaming"]) == 8
    assert get_num_attention_heads_from_layers(cfg, ["l0.attn", "missing"]) is None
    with pytest.raises(AssertionError, match="must share num_heads"):
        get_num_attention_heads_from_layers(cfg, ["l0.attn.retrieval", "l0.attn.streaming"])


@pytest.mark.parametrize("streaming", [[True, False, True], [False, False, True, True], [True, False, False, False]])
def test_split_forward_gives_each_sublayer_its_heads_and_restores_the_order(streaming):
    """Each sublayer gets exactly the q/k/v heads of its kind (query heads of a KV head stay with it, in order) and
    the outputs come back in the model's head order; stub sublayers stand in for vLLM's attention layers."""
    from torch import nn

    from longseq.attention_backends.vllm.duo_memory import RETRIEVAL, STREAMING, DuoSplitAttention

    group, d, t = 2, 4, 5
    hkv, hq = len(streaming), len(streaming) * group
    seen = {}

    class Stub(nn.Module):
        def __init__(self, kind, scale):
            super().__init__()
            self.kind, self.scale = kind, scale

        def forward(self, q, k, v, **kwargs):
            seen[self.kind] = (q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d), kwargs)
            return q * self.scale  # an "attention" that keeps its query head order

    split = DuoSplitAttention.__new__(DuoSplitAttention)
    nn.Module.__init__(split)
    split.add_module(RETRIEVAL, Stub(RETRIEVAL, 2.0))
    split.add_module(STREAMING, Stub(STREAMING, -3.0))
    split._set_heads(streaming, hq, d)
    q, k, v = torch.randn(t, hq * d), torch.randn(t, hkv * d), torch.randn(t, hkv * d)
    out = split(q, k, v, output_shape=None).view(t, hq, d)
    for kind, want in ((RETRIEVAL, False), (STREAMING, True)):
        kv_heads = [h for h in range(hkv) if streaming[h] == want]
        q_heads = [h * group + g for h in kv_heads for g in range(group)]
        sq, sk, sv, kwargs = seen[kind]
        assert torch.equal(sq, q.view(t, hq, d)[:, q_heads]) and kwargs == {"output_shape": None}
        assert torch.equal(sk, k.view(t, hkv, d)[:, kv_heads]) and torch.equal(sv, v.view(t, hkv, d)[:, kv_heads])
        assert torch.equal(out[:, q_heads], q.view(t, hq, d)[:, q_heads] * (-3.0 if want else 2.0))


def test_duo_memory_architectures_follow_vllms_class_not_the_name():
    """Every architecture name vLLM resolves to its Llama or Qwen2 class gets our split class; others do not."""
    from types import SimpleNamespace

    from longseq.plugin.vllm import duo_memory_architectures

    def lazy(module: str, cls: str) -> SimpleNamespace:
        return SimpleNamespace(module_name=f"vllm.model_executor.models.{module}", class_name=cls)

    registry = {"LlamaForCausalLM": lazy("llama", "LlamaForCausalLM"), "LlamaModel": lazy("llama", "LlamaForCausalLM"),
                "Qwen2Model": lazy("qwen2", "Qwen2ForCausalLM"), "MistralForCausalLM": lazy("mistral", "MistralForCausalLM"),
                "Custom": object()}  # a class another plugin registered: no module/class names
    assert duo_memory_architectures(registry) == {"LlamaForCausalLM": "DuoSplitLlamaForCausalLM",
                                                  "LlamaModel": "DuoSplitLlamaForCausalLM",
                                                  "Qwen2Model": "DuoSplitQwen2ForCausalLM"}


def test_duo_memory_architectures_of_installed_vllm_cover_the_aliases():
    pytest.importorskip("vllm")
    from vllm import ModelRegistry

    from longseq.plugin.vllm import duo_memory_architectures

    found = duo_memory_architectures(ModelRegistry.models)
    for arch in ("LlamaForCausalLM", "LlamaModel", "Qwen2ForCausalLM", "Qwen2Model"):
        assert arch in found, arch
    assert "MixtralForCausalLM" not in found and "Qwen3ForCausalLM" not in found
