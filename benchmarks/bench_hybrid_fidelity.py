"""Sparse and duo vs dense on a sliding-window hybrid with trained weights, through vLLM's real engine.

The model is SmolLM2-135M-Instruct's weights declared as a Gemma-3-style hybrid (``smollm2_hybrid_path``: 5 of
every 6 layers see the last ``--window`` tokens, layers 5, 11, 17, 23, 29 are global). Windowed layers keep
vLLM's kernel and their window in every mode; sparse selection and duo streaming apply to the five global layers.
Duo's pattern is the calibrated SmolLM2 pattern's rows of those layers (one row per global layer), at
``--sparsity``. Metrics as ``bench_sparse_fidelity.py`` (``longseq.eval.study.variant_study``): teacher-forced
next-token agreement and mean KL with the dense run's tokens fed in, free-running greedy match, passkey.

    python -m benchmarks.bench_hybrid_fidelity --budgets 1024,2048 --lengths 4096,4096 --passkey-lengths 4000,3000
    python -m benchmarks.bench_hybrid_fidelity --quick      (one 2K prompt, one passkey, 8 tokens: a smoke run)
Writes benchmarks/results/<name>.json (``variants``: label -> metrics; ``--out-dir`` elsewhere).
"""

from __future__ import annotations

import argparse
import os
import tempfile


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_hybrid_fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--window", type=int, default=1024, help="tokens a windowed layer sees")
    p.add_argument("--global-every", type=int, default=6, help="every n-th layer is global")
    p.add_argument("--budgets", type=ints, default=[1024, 2048])
    p.add_argument("--lengths", type=ints, default=[4096, 4096])
    p.add_argument("--passkey-lengths", type=ints, default=[4000, 3000])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="smollm2-135m-instruct", help="a pattern with a row per layer of the model")
    p.add_argument("--name", default=None, help="result name (default hybrid_fidelity_cpu, + _quick with --quick)")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results")
    p.add_argument("--quick", action="store_true", help="smoke run: --lengths 2048 --passkey-lengths 2000 "
                   "--max-tokens 8 --budgets 512")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.passkey_lengths, args.max_tokens, args.budgets = [2048], [2000], 8, [512]
    args.name = args.name or "hybrid_fidelity_cpu" + ("_quick" if args.quick else "")
    return args


def global_rows_pattern(pattern: str, layer_types: list[str], folder: str) -> str:
    """Save the rows of ``pattern`` (one per layer) that belong to global layers as a pattern folder; its path."""
    from longseq.attention_backends.core.duo_pattern import DuoPattern, load_duo_pattern, save_duo_pattern
    from longseq.attention_backends.core.layers import global_layer_rows

    full = load_duo_pattern(pattern)
    rows = global_layer_rows(layer_types, full.num_layers)
    keep = [i for i, r in enumerate(rows) if r is not None]
    sub = DuoPattern(full.gates[keep], full.sink_size, full.recent_size, dict(full.meta), f"{pattern} rows {keep}")
    path = os.path.join(folder, "global-rows")
    save_duo_pattern(sub, path)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    import json

    from transformers import AutoTokenizer

    from benchmarks.common import command_line, environment, report_variants, write_result
    from longseq.eval.study import engine_setup, variant_study
    from longseq.models.smollm2 import smollm2_hybrid_path

    model = smollm2_hybrid_path(args.window, args.global_every)
    layer_types = json.load(open(os.path.join(model, "config.json")))["layer_types"]
    tok = AutoTokenizer.from_pretrained(model)
    base_env, kw, dense_env = engine_setup(cpu=True)
    # vLLM's own CPU backend answers a repeated prompt of this hybrid differently once it hits the prefix cache
    # (docs/benchmarks/hybrid.md), and a study repeats its prompts: every run computes its whole prompt
    kw["enable_prefix_caching"] = False
    with tempfile.TemporaryDirectory() as tmp:
        variants = {f"sparse/{b}": {"LONGSEQ_ATTENTION": "sparse", "LONGSEQ_SPARSE_BUDGET": str(b)}
                    for b in args.budgets}
        variants["duo"] = {"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_SPARSITY": str(args.sparsity),
                           "LONGSEQ_DUO_PATTERN": global_rows_pattern(args.pattern, layer_types, tmp)}
        res = variant_study(model, tok, variants, args.lengths, args.passkey_lengths, args.max_tokens, base_env,
                            kw, dense_env)
    dense_pk = res["dense"]["passkey_correct"]
    result = {"name": args.name, "command": command_line(), "env": environment(), "inputs": vars(args),
              "model": {"base": "SmolLM2-135M-Instruct", "layer_types": layer_types, "sliding_window": args.window},
              "dense": {"passkey_correct": dense_pk}}
    result["variants"] = report_variants(res["variants"], dense_pk)
    print(write_result(args.name, result, args.out_dir))


if __name__ == "__main__":
    main()
