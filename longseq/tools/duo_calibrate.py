"""DuoAttention calibration: learn which KV heads need full attention (retrieval heads) and which can stream.

Implements the optimization of Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with
Retrieval and Streaming Heads", on one machine (CPU or one GPU):

- the model is frozen; one gate ``alpha`` in [0, 1] per (layer, KV head), initialised to 1.0;
- in every attention layer the output of each query head of KV head ``h`` is
  ``alpha_h * full_causal_attn + (1 - alpha_h) * streaming_attn``, where streaming attention sees only the
  first ``sink`` tokens and the last ``recent`` tokens (causal, the query's own token included);
- data: synthetic multi-passkey samples made here from the seed (no downloads): filler text with
  ``num_keys`` pass keys ("The pass key for bravo is 48213.") at random depths, then a question and the
  teacher-forced answer that lists the keys;
- loss: mean squared error between the last hidden states (after the final norm) of the gated model and of
  the same model with full attention, at the positions that predict the key digits of the answer, plus
  ``l1 * mean(alpha)``; Adam on the gates only, gates clamped to [0, 1] after each step.

The gated attention is a function registered in transformers' ``AttentionInterface`` under
:data:`ATTN_NAME`; the gates live in a :class:`DuoGates` object attached to each attention module. The
full-attention teacher is the same model with the gates switched off (plain causal SDPA).

Output (the DuoAttention authors' published format): ``full_attention_heads.tsv`` (one row per layer, one
tab-separated column per KV head) and ``config.json`` (``sink_size``, ``recent_size`` and provenance).

    longseq duo calibrate --model PATH --out DIR [--steps 100 --seq-len 1024 ...]

This module imports only the standard library at import time (torch / transformers inside functions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shlex
import sys
import time

from .duo_calib_data import make_sample

#: Name of the gated attention function in transformers' AttentionInterface.
ATTN_NAME = "longseq_duo_mix"

TSV_NAME = "full_attention_heads.tsv"
CONFIG_NAME = "config.json"


@dataclasses.dataclass
class CalibConfig:
    """Settings of one calibration run (the CLI flags; all of them are recorded in config.json)."""

    model: str | None = None          # HF checkpoint folder; None: SmolLM2-135M-Instruct built offline
    out: str | None = None            # output folder (None: do not write)
    seed: int = 0
    steps: int = 100
    seq_len: int = 1024
    lr: float = 0.02                  # the authors' value
    l1: float = 0.05                  # the authors' reg weight
    sink: int = 64
    recent: int = 256
    num_keys: int = 4
    samples: int = 0                  # distinct samples, cycled (teacher states cached); 0: a new one each step
    device: str = "auto"              # auto | cpu | cuda
    dtype: str = "auto"               # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    threads: int | None = None        # torch.set_num_threads (None: torch's default)
    progress: bool = True
    time_limit_s: float | None = None  # stop after this many seconds of optimization, keeping the gates so far


@dataclasses.dataclass
class CalibResult:
    gates: list[list[float]]          # [num_layers][num_kv_heads], in [0, 1]
    final_loss: float                 # total loss of the last step (distill + l1 * mean(alpha))
    final_distill: float
    losses: list[float]               # total loss per step
    runtime_s: float
    meta: dict                        # everything config.json gets besides sink_size / recent_size


# -------------------------------------------------------------------------------------- gated attention


class DuoGates:
    """The gates of one model: ``alpha`` [num_layers, num_kv_heads] (fp32 leaf tensor) plus sink/recent.

    ``enabled = False`` turns every layer into plain full causal attention (the teacher).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, sink: int, recent: int, init: float = 1.0,
                 device=None):
        import torch

        self.alpha = torch.full((num_layers, num_kv_heads), float(init), dtype=torch.float32, device=device,
                                requires_grad=True)
        self.sink = int(sink)
        self.recent = int(recent)
        self.enabled = True


def streaming_mask(q_len: int, kv_len: int, sink: int, recent: int, device=None):
    """Bool [q_len, kv_len], True = attend: causal and (one of the first ``sink`` keys or among the last ``recent``).

    The queries are the last ``q_len`` of the ``kv_len`` positions.
    """
    import torch

    i = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return (j <= i) & ((j < sink) | (i - j < recent))


def streaming_attention_ref(query, key, value, sink: int, recent: int, scaling: float | None = None):
    """Sink + recent-window causal attention, dense masked SDPA (reference).

    query [B, Hq, T, D], key/value [B, Hkv, T, D] -> [B, Hq, T, D].
    """
    import torch.nn.functional as F

    mask = streaming_mask(query.shape[2], key.shape[2], sink, recent, query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                          enable_gqa=key.shape[1] != query.shape[1])


def streaming_attention_tail(query, key, value, sink: int, recent: int, scaling: float | None = None,
                             chunk: int = 256):
    """Streaming attention of the queries at positions ``>= sink + recent`` only, [B, Hq, T - sink - recent, D].

    Queries before ``sink + recent`` see every earlier key anyway (streaming == full there). The rest is done
    in query chunks, each against the sink keys plus its own window, so the cost is O(T * (sink + recent +
    chunk)) instead of O(T^2). Same shapes as :func:`streaming_attention_ref` (which it equals on the tail).
    """
    import torch
    import torch.nn.functional as F

    t = query.shape[2]
    first = sink + recent
    gqa = key.shape[1] != query.shape[1]
    outs = []
    for s in range(first, t, chunk):
        e = min(s + chunk, t)
        lo = s - recent + 1  # first window key of query s (>= sink + 1)
        k = torch.cat([key[:, :, :sink], key[:, :, lo:e]], dim=2)
        v = torch.cat([value[:, :, :sink], value[:, :, lo:e]], dim=2)
        i = torch.arange(s, e, device=query.device)[:, None]
        j = torch.arange(lo, e, device=query.device)[None, :]
        window = (j <= i) & (i - j < recent)
        mask = torch.cat([torch.ones(e - s, sink, dtype=torch.bool, device=query.device), window], dim=1)
        outs.append(F.scaled_dot_product_attention(query[:, :, s:e], k, v, attn_mask=mask, scale=scaling,
                                                   enable_gqa=gqa))
    if not outs:
        return query.new_zeros(query.shape[0], query.shape[1], 0, value.shape[3])
    return torch.cat(outs, dim=2)


def duo_mix_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers attention function: ``alpha * full + (1 - alpha) * streaming`` per KV head.

    query [B, Hq, T, D], key/value [B, Hkv, T, D] (prefill of unpadded sequences without a KV cache);
    returns ([B, T, Hq, D], None) as transformers expects. Without gates on ``module`` (or with them
    disabled) it is plain causal attention.
    """
    import torch
    import torch.nn.functional as F

    gates: DuoGates | None = getattr(module, "_longseq_duo", None)
    t, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or t != kv_len:
        raise ValueError("longseq duo calibration runs unpadded sequences without a KV cache "
                         "(equal-length samples, use_cache=False)")
    gqa = key.shape[1] != query.shape[1]
    full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    first = gates.sink + gates.recent if gates is not None else t
    if gates is None or not gates.enabled or first >= t:
        return full.transpose(1, 2).contiguous(), None
    if query.is_cuda:
        # One masked SDPA over all T^2 pairs instead of ~T/256 small chunk calls: the chunked form is launch-bound
        # on a GPU (docs/benchmarks/duo.md, calibration). The CPU keeps the O(T * window) form.
        stream = streaming_attention_ref(query, key, value, gates.sink, gates.recent, scaling)[:, :, first:]
    else:
        stream = streaming_attention_tail(query, key, value, gates.sink, gates.recent, scaling)
    groups = query.shape[1] // key.shape[1]
    alpha = gates.alpha[module.layer_idx].to(query.dtype).repeat_interleave(groups)[None, :, None, None]
    tail = full[:, :, first:]
    out = torch.cat([full[:, :, :first], stream + alpha * (tail - stream)], dim=2)
    return out.transpose(1, 2).contiguous(), None


def install_gates(model, sink: int, recent: int, init: float = 1.0) -> DuoGates:
    """Register :func:`duo_mix_attention`, switch ``model`` to it and attach fresh gates to every layer."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, duo_mix_attention)
    cfg = model.config
    num_layers = cfg.num_hidden_layers
    num_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    device = next(model.parameters()).device
    gates = DuoGates(num_layers, num_kv, sink, recent, init, device)
    attn_modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if len(attn_modules) != num_layers:
        raise ValueError(f"found {len(attn_modules)} attention modules for {num_layers} layers: "
                         "only Llama-style decoders (self_attn with layer_idx) are supported")
    for m in attn_modules:
        m._longseq_duo = gates
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:  # older transformers: set the config field the attention modules read
        model.config._attn_implementation = ATTN_NAME
    if model.config._attn_implementation != ATTN_NAME:
        model.config._attn_implementation = ATTN_NAME
    return gates


def last_hidden(model, input_ids):
    """Hidden states after the final norm, [B, T, hidden] (the decoder, without the LM head)."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


# -------------------------------------------------------------------------------------------- calibration


def _resolve(cfg: CalibConfig):
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return device, dtype


def load_model(path: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model.to(device).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)


def calibrate(cfg: CalibConfig, model=None, tokenizer=None, command: str | None = None) -> CalibResult:
    """Run the optimization; write ``cfg.out`` if set. ``model``/``tokenizer`` override loading ``cfg.model``."""
    import torch
    import transformers
    from tqdm.auto import tqdm

    import longseq

    if cfg.steps < 1:
        raise ValueError("--steps must be >= 1")
    if cfg.sink < 1 or cfg.recent < 1:
        raise ValueError("--sink and --recent must be >= 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = _resolve(cfg)
    t0 = time.time()
    model_name = cfg.model
    if model is None:
        path = cfg.model
        if path is None:
            from longseq.models.smollm2 import smollm2_path

            path, model_name = smollm2_path(), "smollm2-135m-instruct"
        model, tok = load_model(path, device, dtype)
        tokenizer = tokenizer or tok
    elif tokenizer is None:
        raise ValueError("pass the tokenizer with the model")
    torch.manual_seed(cfg.seed)
    gates = install_gates(model, cfg.sink, cfg.recent)
    opt = torch.optim.Adam([gates.alpha], lr=cfg.lr)
    losses: list[float] = []
    distill_val = float("nan")
    teachers: dict = {}  # sample index -> teacher hidden states at the loss positions (with --samples)
    bar = tqdm(range(cfg.steps), desc="duo calibrate", disable=not cfg.progress, dynamic_ncols=True)
    t_opt = time.time()
    for step in bar:
        if cfg.time_limit_s is not None and step > 0 and time.time() - t_opt > cfg.time_limit_s:
            break  # a GPU slot or CI budget ends: the gates so far are a valid (less converged) pattern
        index = step % cfg.samples if cfg.samples > 0 else step
        ids, positions = make_sample(tokenizer, cfg.seq_len, random.Random(cfg.seed * 1_000_003 + index),
                                     cfg.num_keys)
        input_ids = torch.tensor([ids], device=device)
        pos = torch.tensor(positions, device=device)
        teacher = teachers.get(index)
        if teacher is None:
            with torch.no_grad():
                gates.enabled = False
                teacher = last_hidden(model, input_ids)[0, pos].float()
                gates.enabled = True
            if cfg.samples > 0:
                teachers[index] = teacher
        student = last_hidden(model, input_ids)[0, pos].float()
        distill = (student - teacher).pow(2).mean(dim=-1).mean()
        loss = distill + cfg.l1 * gates.alpha.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            gates.alpha.clamp_(0.0, 1.0)
        losses.append(loss.item())
        distill_val = distill.item()
        bar.set_postfix(loss=f"{losses[-1]:.4f}", distill=f"{distill_val:.4f}",
                        mean_alpha=f"{gates.alpha.mean().item():.3f}",
                        below_half=int((gates.alpha < 0.5).sum()))
    bar.close()
    alpha = gates.alpha.detach().float().cpu()
    runtime = time.time() - t0
    meta = {
        "model": model_name or getattr(model.config, "_name_or_path", None),
        "seed": cfg.seed, "steps": cfg.steps, "steps_done": len(losses), "seq_len": cfg.seq_len, "l1": cfg.l1,
        "lr": cfg.lr,
        "num_keys": cfg.num_keys, "samples": cfg.samples or cfg.steps, "device": device, "dtype": dtype,
        "threads": torch.get_num_threads(),
        "command": command,
        "longseq_version": getattr(longseq, "__version__", None),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "final_loss": losses[-1], "final_distill_loss": distill_val,
        "initial_loss": losses[0], "runtime_s": round(runtime, 1),
        "num_layers": int(alpha.shape[0]), "num_kv_heads": int(alpha.shape[1]),
        "data": "synthetic multi-passkey (longseq.tools.duo_calibrate.make_sample): 5-digit keys at random "
                "depths in filler text, question + teacher-forced answer; loss on the key-digit positions",
        "loss": "mean over answer positions of mean-squared error of final hidden states vs full attention "
                "+ l1 * mean(alpha); Adam on the gates, clamped to [0, 1]",
    }
    result = CalibResult(gates=alpha.tolist(), final_loss=losses[-1], final_distill=distill_val, losses=losses,
                         runtime_s=runtime, meta=meta)
    if cfg.out:
        write_pattern(cfg.out, result.gates, cfg.sink, cfg.recent, meta)
    return result


def write_pattern(out_dir: str, gates: list[list[float]], sink: int, recent: int, meta: dict) -> None:
    """Write ``full_attention_heads.tsv`` + ``config.json`` (the authors' format) into ``out_dir``.

    Uses ``longseq.attention_backends.core.duo_pattern.save_duo_pattern`` when that module provides it, so the
    writer and the loader stay one format.
    """
    try:
        from longseq.attention_backends.core.duo_pattern import DuoPattern, save_duo_pattern
    except ImportError:
        save_duo_pattern = None
    if save_duo_pattern is not None:
        save_duo_pattern(DuoPattern(gates, sink, recent, meta), out_dir)
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, TSV_NAME), "w") as f:
        for row in gates:
            f.write("\t".join(f"{min(max(float(g), 0.0), 1.0):.6f}" for g in row) + "\n")
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump({"sink_size": int(sink), "recent_size": int(recent), **meta}, f, indent=1)
        f.write("\n")


def read_pattern(out_dir: str) -> tuple[list[list[float]], dict]:
    """(gates [layers][kv heads], config dict) of a written pattern folder (test helper)."""
    with open(os.path.join(out_dir, TSV_NAME)) as f:
        gates = [[float(x) for x in line.split("\t")] for line in f.read().splitlines() if line.strip()]
    with open(os.path.join(out_dir, CONFIG_NAME)) as f:
        return gates, json.load(f)


def summarize(gates: list[list[float]]) -> str:
    flat = sorted(g for row in gates for g in row)
    n = len(flat)
    below = sum(g < 0.5 for g in flat)
    per_layer = " ".join(f"{sum(r) / len(r):.2f}" for r in gates)
    return (f"{n} gates: min {flat[0]:.3f} median {flat[n // 2]:.3f} max {flat[-1]:.3f}; "
            f"{below} below 0.5 (streaming), {n - below} at or above (retrieval)\nmean gate per layer: {per_layer}")


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = CalibConfig()
    p.add_argument("--model", help="Hugging Face checkpoint folder (default: SmolLM2-135M-Instruct, built offline)")
    p.add_argument("--out", required=True, help="output folder (full_attention_heads.tsv + config.json)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per synthetic sample")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate of the gates")
    p.add_argument("--l1", type=float, default=d.l1, help="weight of mean(alpha) in the loss")
    p.add_argument("--sink", type=int, default=d.sink, help="sink tokens of streaming heads")
    p.add_argument("--recent", type=int, default=d.recent, help="recent-window tokens of streaming heads")
    p.add_argument("--num-keys", type=int, default=d.num_keys, help="pass keys per sample")
    p.add_argument("--samples", type=int, default=d.samples,
                   help="distinct samples, cycled, teacher states cached (default 0: a new sample every step)")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: bf16 on CUDA, fp32 on CPU); the gates are always fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop the optimization after this many seconds and write the gates reached so far "
                        "(config.json records steps_done)")


def run(args: argparse.Namespace, command: str | None = None) -> int:
    cfg = CalibConfig(model=args.model, out=args.out, seed=args.seed, steps=args.steps, seq_len=args.seq_len,
                      lr=args.lr, l1=args.l1, sink=args.sink, recent=args.recent, num_keys=args.num_keys,
                      samples=args.samples, device=args.device, dtype=args.dtype, threads=args.threads,
                      progress=not args.no_progress, time_limit_s=args.time_limit)
    result = calibrate(cfg, command=command)
    print(f"longseq duo calibrate: wrote {os.path.join(cfg.out, TSV_NAME)} and {CONFIG_NAME} "
          f"in {result.runtime_s:.0f} s after {len(result.losses)} of {cfg.steps} steps; final loss "
          f"{result.final_loss:.5f} (distill {result.final_distill:.5f})")
    print(summarize(result.gates))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m longseq.tools.duo_calibrate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv), command="python -m longseq.tools.duo_calibrate " + shlex.join(argv))


if __name__ == "__main__":
    sys.exit(main())
