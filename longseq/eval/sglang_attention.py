"""SmolLM2 on CPU with every attention call served by an SGLang attention backend, over SGLang's own KV pool.

SGLang's model runner needs its GPU kernels; its attention test kit (``sglang.test.kits.attention_unittest``) does
not. This harness runs the model's layers in Hugging Face ``transformers`` and hands each layer's post-RoPE
``q``/``k``/``v`` to a SGLang ``RadixAttention`` layer with the chosen backend (``longseq_dense``,
``longseq_sparse``, ``longseq_duo`` or one of SGLang's), a ``ForwardBatch`` per step (one extend for the prompt,
then one decode per token) and a ``MHATokenToKVPool`` of all layers; so the backends see what SGLang gives them
when serving. Used by ``examples/06_sglang_backends.ipynb`` to measure fidelity without a GPU; the GPU engine
test is ``tests/gpu/test_sglang_gpu.py``.

Needs SGLang (the ``.venv-sglang`` of ``scripts/setup_sglang.sh``) and ``transformers``.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch

ATTN_IMPLEMENTATION = "longseq_sglang"
_ACTIVE: list = []  # the harness whose step is running (transformers calls the attention function by name)


def _sglang_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function contract: ``query`` ``[1, Hq, T, D]``, ``key``/``value`` ``[1, Hkv, S, D]``
    (its own cache plus the step's tokens; only the last ``T`` are new); returns ``([1, T, Hq, D], None)``."""
    return _ACTIVE[-1].attend(module.layer_idx, query, key, value), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _sglang_attention)


def load_model(path: str):
    """(model, tokenizer): ``path``'s causal LM in float32 on CPU, attention through :class:`SGLangAttention`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _register_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@contextmanager
def longseq_environment(env: dict[str, str]):
    """``LONGSEQ_*`` set to ``env`` (every other ``LONGSEQ_*`` unset) while a backend is built and runs."""
    from longseq.config import get_config

    saved = {k: v for k, v in os.environ.items() if k.startswith("LONGSEQ_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(env)
    try:
        get_config(refresh=True)
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("LONGSEQ_")]:
            del os.environ[k]
        os.environ.update(saved)
        get_config(refresh=True)


class SGLangAttention:
    """One model's attention served by SGLang backend ``backend`` for one request at a time.

    ``model``: a Llama-family ``transformers`` model from :func:`load_model`; ``max_context``: prompt + generated
    tokens; ``page_size``: SGLang's ``--page-size``.
    """

    def __init__(self, model, backend: str, max_context: int, page_size: int = 16) -> None:
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
        from sglang.srt.layers.radix_attention import RadixAttention
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
        from sglang.srt.model_executor.forward_batch_info import ForwardMode
        from sglang.test.kits.attention_unittest.attention_methods import dense_attention as da

        from longseq.plugin.sglang import register

        register()
        cfg = model.config
        self.hq, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.hq
        self.num_layers, self.page_size, self.model = cfg.num_hidden_layers, page_size, model
        self.max_context = math.ceil(max_context / page_size) * page_size
        case = da.DenseAttentionCase(name=backend, backend=backend, forward_mode=ForwardMode.DECODE,
                                     num_heads=self.hq, num_kv_heads=self.hkv, page_size=page_size, prefix_lens=(1,))
        shape = da.TinyModelConfig(num_heads=self.hq, num_kv_heads=self.hkv, head_dim=self.d,
                                   hidden_size=cfg.hidden_size, context_len=self.max_context)
        shape.num_hidden_layers = self.num_layers  # what ModelConfig has and the kit's stand-in lacks
        shape.get_total_num_kv_heads = lambda: self.hkv
        runner = da.MockModelRunner(case=case, model_config=shape, dtype=torch.float32, device="cpu",
                                    max_context_len=self.max_context, head_dim=self.d)
        # The kit's pool holds one layer; the model needs all of them (slot 0's page stays unused, as in the kit).
        runner.token_to_kv_pool = MHATokenToKVPool(
            size=page_size + self.max_context + page_size, page_size=page_size, dtype=torch.float32,
            head_num=self.hkv, head_dim=self.d, layer_num=self.num_layers, device="cpu", enable_memory_saver=False,
            enable_alt_stream=False)
        self.runner = runner
        self.backend = ATTENTION_BACKENDS[backend](runner)
        self.layers = [RadixAttention(num_heads=self.hq, head_dim=self.d, scaling=self.d ** -0.5,
                                      num_kv_heads=self.hkv, layer_id=i) for i in range(self.num_layers)]
        self.batch = None

    def _forward_batch(self, prefix: int, new: int):
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

        if prefix + new > self.max_context:
            raise ValueError(f"{prefix + new} tokens exceed max_context={self.max_context}")
        mode = ForwardMode.DECODE if prefix and new == 1 else ForwardMode.EXTEND
        locs = torch.arange(prefix, prefix + new, dtype=torch.int64) + self.page_size  # one request, in order
        self.runner.req_to_token_pool.req_to_token[0, prefix:prefix + new] = locs.to(torch.int32)
        n = prefix + new
        batch = ForwardBatch(
            forward_mode=mode, batch_size=1, input_ids=torch.zeros(new, dtype=torch.int64),
            req_pool_indices=torch.zeros(1, dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
            seq_lens_cpu=torch.tensor([n], dtype=torch.int32), out_cache_loc=locs, seq_lens_sum=n,
            positions=torch.arange(prefix, n, dtype=torch.int64))
        self.runner.kv_index_translator.bind_own_plan(batch)
        if mode.is_extend():
            batch.extend_prefix_lens = torch.tensor([prefix], dtype=torch.int32)
            batch.extend_prefix_lens_cpu = [prefix]
            batch.extend_seq_lens = torch.tensor([new], dtype=torch.int32)
            batch.extend_seq_lens_cpu = [new]
            batch.extend_num_tokens = new
        return batch

    def attend(self, layer_id: int, query, key, value) -> torch.Tensor:
        t = query.shape[2]
        q = query[0].transpose(0, 1).reshape(t, self.hq * self.d)
        k = key[0, :, -t:].transpose(0, 1).reshape(t, self.hkv * self.d)
        v = value[0, :, -t:].transpose(0, 1).reshape(t, self.hkv * self.d)
        out = self.layers[layer_id](q.contiguous(), k.contiguous(), v.contiguous(), self.batch)
        return out.view(1, t, self.hq, self.d)

    @torch.no_grad()
    def generate(self, prompt: list[int], max_tokens: int, forced: list[int] | None = None, top_k: int = 20) -> dict:
        """Greedy decode of ``max_tokens`` after ``prompt`` (or, with ``forced``, those tokens fed back: teacher
        forcing). Returns ``{"tokens": [...], "logprobs": [{token id (str): log-prob} of the top ``top_k``]}``."""
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
        from transformers import DynamicCache

        cache, ids, prefix = DynamicCache(), list(prompt), 0
        tokens, logprobs = [], []
        _ACTIVE.append(self)
        try:
            for step in range(max_tokens):
                new = ids[prefix:]
                self.batch = self._forward_batch(prefix, len(new))
                with forward_context(ForwardContext(attn_backend=self.backend)):
                    self.backend.init_forward_metadata(self.batch)
                    logits = self.model(input_ids=torch.tensor([new]), past_key_values=cache, use_cache=True,
                                        position_ids=torch.arange(prefix, len(ids))[None]).logits[0, -1]
                lp = torch.log_softmax(logits.float(), -1)
                top = torch.topk(lp, top_k)
                logprobs.append({str(i): float(v) for i, v in zip(top.indices.tolist(), top.values.tolist())})
                token = forced[step] if forced is not None else int(top.indices[0])
                tokens.append(token)
                prefix = len(ids)
                ids.append(token)
        finally:
            _ACTIVE.pop()
            self.batch = None
        return {"tokens": tokens, "logprobs": logprobs}


def run_backend(model, backend: str, env: dict[str, str], prompts: list[list[int]], max_tokens: int,
                forced: list[list[int]] | None = None, page_size: int = 16) -> dict:
    """:meth:`SGLangAttention.generate` for each prompt with a fresh pool, under ``env``; the result is shaped like
    ``longseq.eval.fidelity``'s runs (``tokens`` and ``logprobs`` per prompt), for its ``compare``."""
    out = {"tokens": [], "logprobs": []}
    with longseq_environment(env):
        for i, prompt in enumerate(prompts):
            harness = SGLangAttention(model, backend, len(prompt) + max_tokens, page_size)
            res = harness.generate(prompt, max_tokens, forced[i] if forced is not None else None)
            out["tokens"].append(res["tokens"])
            out["logprobs"].append(res["logprobs"])
    return out
