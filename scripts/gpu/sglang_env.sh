# Source ON the GPU machine, from the project's root, after sglang_setup.sh printed SGLANG READY and after the
# vLLM bundle's env (which installs longseq editable, so SGLang finds its sglang.srt.plugins entry point):
#   source /tmp/lsq-bundle/env.sh && source scripts/gpu/sglang_env.sh
# /tmp/site-sgl goes first on PYTHONPATH: its transformers 5.12.1, tokenizers 0.22.2, flashinfer 0.6.12,
# tvm-ffi 0.1.11, openai 2.6.1 and xgrammar 0.2.1 (SGLang 0.5.15's pins) shadow the system's and the vLLM
# site's. Do not run vLLM in a shell that sourced this; use a fresh one with only /tmp/lsq-bundle/env.sh.
if [ ! -f /tmp/site-sgl/.ready ]; then
  echo "sglang_env: /tmp/site-sgl is not set up (run bash scripts/gpu/sglang_setup.sh with each part)" >&2
fi
case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) echo "sglang_env: source /tmp/lsq-bundle/env.sh first (the vLLM site provides fastapi, uvicorn, pydantic, pyzmq, ...)" >&2 ;; esac
export PYTHONPATH=/tmp/site-sgl${PYTHONPATH:+:$PYTHONPATH}
# ninja, run by FlashInfer's and tvm-ffi's (sglang.jit_kernel) JIT builds
export PATH=/tmp/site-sgl/bin:$PATH
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export DO_NOT_TRACK=1
# JIT caches (FlashInfer kernels, sglang.jit_kernel modules built through tvm-ffi): /tmp lives as long as the machine.
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/lsq-jit}
export TVM_FFI_CACHE_DIR=${TVM_FFI_CACHE_DIR:-/tmp/lsq-jit/tvm-ffi}
# SGLang picks the model class from config.json's "architectures", which the bundle's GGUF conversion leaves
# null: a linked copy of the folder with it set (vLLM infers it from model_type).
src_model=/tmp/models/smollm2-135m-instruct sgl_model=/tmp/models/smollm2-135m-instruct-sgl
if [ -f "$src_model/config.json" ] && [ ! -f "$sgl_model/config.json" ]; then
  mkdir -p "$sgl_model" && for f in "$src_model"/*; do [ "${f##*/}" = config.json ] || ln -sf "$f" "$sgl_model/"; done
  python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); c["architectures"]=c.get("architectures") or ["LlamaForCausalLM"]; json.dump(c,open(sys.argv[2],"w"),indent=1)' "$src_model/config.json" "$sgl_model/config.json"
fi
export LONGSEQ_TEST_MODEL=$sgl_model
