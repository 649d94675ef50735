"""Model classes for ``LONGSEQ_DUO_MEMORY=1``: vLLM's own Llama-family models whose attention layers are split into
retrieval and streaming sublayers (``duo_memory.split_model_attention``) right after vLLM builds them.

The plugin registers them under every architecture name vLLM resolves to these classes (``LlamaModel`` too;
``longseq.plugin.vllm.duo_memory_architectures``), so a served model needs no flag beyond the environment. Every
class here calls ``self.attn(q, k, v)`` in its attention module with grouped-query heads, which is what the split
relies on.
"""

from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from longseq.attention_backends.vllm.duo_memory import split_model_attention
from longseq.config import get_config

class DuoSplitLlamaForCausalLM(LlamaForCausalLM):
    # vLLM passes vllm_config by keyword when the signature names it; later versions add keywords (layer_type)
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        split_model_attention(self, vllm_config, get_config())


class DuoSplitQwen2ForCausalLM(Qwen2ForCausalLM):
    # vLLM passes vllm_config by keyword when the signature names it; later versions add keywords (layer_type)
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        split_model_attention(self, vllm_config, get_config())
