"""longseq/eval/sglang_attention.py, the harness of the SGLang notebook: SmolLM2 in transformers with every
attention call served by an SGLang backend over SGLang's pool must give plain transformers' greedy tokens, and
the backends it builds must really run (their trace counters move)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.sglang


def test_dense_through_sglang_pool_gives_transformers_tokens_and_sparse_runs(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM

    from longseq.attention_backends.sglang.sparse import TRACE
    from longseq.eval.fidelity import compare
    from longseq.eval.sglang_attention import load_model, run_backend
    from longseq.models.prompts import make_prompts

    model, tok = load_model(smollm2_path)
    prompts = make_prompts(tok, [300, 41], seed=2)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    want = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(6):
                ids.append(int(ref(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            want.append(ids[len(p):])
    for backend in ("torch_native", "longseq_dense"):
        assert run_backend(model, backend, {}, prompts, 6)["tokens"] == want, backend
    dense = run_backend(model, "longseq_dense", {}, prompts, 6)
    before = TRACE.counts["sparse_decode_calls"]
    # 64 tokens per head (8 pages: 1 sink + 4 recent + 3 picked) on a 300-token prompt: sparse decode is real
    env = {"LONGSEQ_SPARSE_BUDGET": "64", "LONGSEQ_SPARSE_RECENT_PAGES": "4"}
    forced = run_backend(model, "longseq_sparse", env, prompts, 6, forced=dense["tokens"])
    assert TRACE.counts["sparse_decode_calls"] - before == 5 * 28 * 2  # 5 decode steps x 28 sparse layers x 2 prompts
    assert forced["tokens"] == dense["tokens"]  # teacher-forced: dense's tokens fed back
    m = compare(dense, forced)
    assert m["mean_kl"] > 0  # the 41-token prompt fits the budget, the 300-token one does not
    assert m["per_prompt"][1]["mean_kl"] < 1e-6 < m["per_prompt"][0]["mean_kl"]
