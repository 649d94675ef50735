"""``longseq duo capacity``: KV bytes per token and per sequence with ``LONGSEQ_DUO_MEMORY=1`` vs dense, from a
model's ``config.json`` (no weights, no framework).

Per layer and tensor-parallel rank, ``k = floor(sparsity * H + 1/2)`` of the rank's ``H`` KV heads stream (the
per-layer count the split needs). Retrieval heads keep every token; streaming heads keep ``sink + recent``
tokens per request while decoding. vLLM reserves more for them, as for a sliding window: the prefill chunks in
flight (``--chunk`` tokens per concurrent batch, 2 batches under async scheduling, vLLM's ``max_in_flight_tokens``),
whose keys are written before they are attended. That reservation is what its "Maximum concurrency" line and its
admission gate count. Bytes count keys and values at ``--dtype-bytes`` (2: bf16/fp16).

    longseq duo capacity --model PATH [--sparsity 0.5 --sink 64 --recent 256 --context 131072 --tp 1 --chunk 2048
                                       --batches 2]

Standard library only (torch is not imported).
"""

from __future__ import annotations

import argparse
import json
import os

from longseq.attention_backends.core.head_count import streaming_head_count


def kv_capacity(model_config: dict, sparsity: float, sink: int, recent: int, context: int, tp: int = 1,
                chunk: int = 2048, dtype_bytes: int = 2, batches: int = 2) -> dict:
    """Per rank: ``dense_bytes_per_token``, ``duo_bytes_per_token`` (retrieval heads), ``duo_bytes_per_request``
    (streaming heads' constant as vLLM reserves it: sink + recent + ``batches`` chunks in flight),
    ``duo_bytes_per_request_decoding`` (sink + recent), bytes of one ``context``-token sequence each way and their
    ratios (``ratio``: reserved, ``ratio_decoding``: held while decoding)."""
    layers = int(model_config["num_hidden_layers"])
    q_heads = int(model_config["num_attention_heads"])
    kv_total = int(model_config.get("num_key_value_heads") or q_heads)
    head_dim = int(model_config.get("head_dim") or model_config["hidden_size"] // q_heads)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1]")
    kv = max(1, kv_total // tp)
    k = streaming_head_count(sparsity, kv)
    per_head_token = 2 * head_dim * dtype_bytes  # K and V
    dense_tok = layers * kv * per_head_token
    duo_tok = layers * (kv - k) * per_head_token
    duo_req = layers * k * per_head_token * min(context, sink + recent + batches * chunk)
    duo_req_decoding = layers * k * per_head_token * min(context, sink + recent)
    dense_seq, duo_seq = dense_tok * context, duo_tok * context + duo_req
    return {"layers": layers, "kv_heads_per_rank": kv, "streaming_heads_per_layer": k, "head_dim": head_dim,
            "dense_bytes_per_token": dense_tok, "duo_bytes_per_token": duo_tok, "duo_bytes_per_request": duo_req,
            "duo_bytes_per_request_decoding": duo_req_decoding, "in_flight_tokens": batches * chunk,
            "context": context, "dense_bytes_per_sequence": dense_seq, "duo_bytes_per_sequence": duo_seq,
            "ratio": duo_seq / dense_seq, "ratio_decoding": (duo_tok * context + duo_req_decoding) / dense_seq}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder or its config.json")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of each layer's KV heads that stream")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--context", type=int, default=131072, help="sequence length to price")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (bytes are per rank)")
    p.add_argument("--chunk", type=int, default=2048,
                   help="prefill tokens in flight: vLLM's --max-num-batched-tokens (its default depends on the GPU "
                        "and on serve vs the LLM class, e.g. 8192 / 16384 on an H100 or H200)")
    p.add_argument("--batches", type=int, default=2,
                   help="concurrent batches, each with a chunk in flight: 2 under async scheduling (vLLM's default "
                        "where supported), 1 without")
    p.add_argument("--dtype-bytes", type=int, default=2)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    path = os.path.join(args.model, "config.json") if os.path.isdir(args.model) else args.model
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    r = kv_capacity(cfg, args.sparsity, args.sink, args.recent, args.context, args.tp, args.chunk, args.dtype_bytes,
                    args.batches)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    gib = 1 << 30
    print(f"{path}: {r['layers']} layers x {r['kv_heads_per_rank']} KV heads per rank, head_dim {r['head_dim']}; "
          f"{r['streaming_heads_per_layer']} streaming head(s) per layer")
    print(f"  dense: {r['dense_bytes_per_token']:,} B/token -> {r['dense_bytes_per_sequence'] / gib:.2f} GiB per "
          f"{r['context']:,}-token sequence")
    print(f"  LONGSEQ_DUO_MEMORY=1: {r['duo_bytes_per_token']:,} B/token + {r['duo_bytes_per_request'] / 2**20:.1f} "
          f"MiB per request reserved ({r['in_flight_tokens']:,} tokens in flight) -> "
          f"{r['duo_bytes_per_sequence'] / gib:.2f} GiB ({r['ratio']:.3f}x dense, {1 / r['ratio']:.2f}x the "
          f"sequences in the same KV memory: vLLM's estimate and admission)")
    print(f"  while decoding: {r['duo_bytes_per_request_decoding'] / 2**20:.1f} MiB per request -> "
          f"{r['ratio_decoding']:.3f}x dense")
    return 0
