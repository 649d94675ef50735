"""DuoAttention: full attention for retrieval KV heads, sink + recent window for streaming KV heads (issue 4).

A streaming head's query at position ``p`` sees keys ``j <= p`` with ``j < sink_size`` or
``j > p - recent_size`` (the ``recent_size`` most recent tokens, its own included); a retrieval head sees every
``j <= p``. ``naive.py`` holds the PyTorch references (prefill with chunking, paged decode) that faster kernels
are tested against; ``unified.py`` the Triton kernel (prefill, chunked prefill, decode and mixed batches over a
paged cache, streaming heads visiting only their sink and window tiles), imported from there so that this
package stays importable without Triton.
"""

from longseq.kernels.duo_attention.naive import (
    duo_paged_attention_ref,
    duo_paged_decode_ref,
    duo_prefill_ref,
    duo_token_mask,
)

__all__ = ["duo_paged_attention_ref", "duo_paged_decode_ref", "duo_prefill_ref", "duo_token_mask"]
