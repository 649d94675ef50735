#!/usr/bin/env bash
# Set up the SGLang venv for the CPU tests: sglang 0.5.23 + torch 2.14.1 and longseq installed editable
# (so the `sglang.srt.plugins` entry point is registered). Idempotent: a stamp holding the hash of this
# script and pyproject.toml skips the work when the venv already satisfies them.
#   bash scripts/setup_sglang.sh        -> .venv-sglang (override with LONGSEQ_SGLANG_VENV=/path)
#
# Why not `pip install sglang==0.5.23`: that pulls ~11 GB of GPU-only packages (flashinfer, sgl-kernel,
# deep-gemm, ...) and takes 5+ minutes on 2 cores. The CPU tests only import SGLang's Python code (attention
# registry, server args, the attention unit-test kit), so we install sglang/torch with --no-deps and add the
# packages those imports need. torch 2.14.1 is the CUDA build (the only 2.14.1 on PyPI): its extension
# libraries link the CUDA runtime libraries below at load time, so they are needed even without a GPU
# (cusolver and nvtx are loaded lazily and left out).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${LONGSEQ_SGLANG_VENV:-$repo/.venv-sglang}
py=${PYTHON:-python3.11}

# Installed with --no-deps: their own requirements would drag in the full GPU stack.
NODEPS=(
  sglang==0.5.23 torch==2.14.1 torchvision==0.29.1 "triton~=3.8.0" compressed-tensors==0.18.0
  "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-nvrtc==13.0.88.*" "nvidia-cuda-cupti==13.0.85.*"
  "nvidia-cublas==13.1.1.3.*" "nvidia-cufft==12.0.0.61.*" "nvidia-cufile==1.15.1.6.*" "nvidia-curand==10.4.0.35.*"
  "nvidia-cusparse==12.6.3.3.*" "nvidia-nvjitlink>=13.0.88,<14" nvidia-cudnn-cu13==9.24.0.43
  nvidia-cusparselt-cu13==0.8.1 nvidia-nccl-cu13==2.30.7 nvidia-nvshmem-cu13==3.4.5
)
# Pure-Python / light packages, installed normally. None of them requires torch, so pip does not
# resolve torch's GPU requirements. Pins follow sglang 0.5.23's own where it has one.
LIGHT=(
  # torch's own requirements (light ones)
  filelock "typing-extensions>=4.10" "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5" numpy
  # imported by sglang.srt (registry, server args, memory pools, model runner) and the attention kit
  aiohttp apache-tvm-ffi==0.1.11 dill einops fastapi gguf IPython msgspec openai==2.8.0 orjson
  partial_json_parser pillow psutil pybase64 pydantic "pyzmq>=25.1.2" requests sentencepiece==0.2.1
  tokenizers==0.23.2 tqdm transformers==5.19.0 "uvicorn>=0.51" loguru packaging
  # tests and the SGLang example notebook; the Mooncake Store client for the remote KV tier's tests (longseq[remote])
  "pytest>=8" pytest-timeout nbclient nbformat ipykernel matplotlib "mooncake-transfer-engine-non-cuda==0.3.13.post1"
)
IMPORTS="import torch, sglang.srt.plugins, sglang.srt.server_args, sglang.srt.layers.attention.attention_registry, \
sglang.test.kits.attention_unittest.attention_methods.dense_attention, longseq.plugin.sglang, pytest"

fail() { echo "longseq: setup_sglang failed: $*" >&2; exit 1; }
quiet() { grep -v -e "WARNING: Location" -e "as the 'root' user" -e "dependency conflicts" -e "^sglang .* requires" \
  -e "^torch .* requires" -e "^torchvision .* requires" -e "^compressed-tensors .* requires" -e "^$" || true; }

want=$( (printf '%s\n' "${NODEPS[@]}" "${LIGHT[@]}"; cat "$repo/pyproject.toml" "$repo/scripts/setup_sglang.sh") | sha256sum | cut -c1-16)
stamp="$venv/.longseq-sglang-$want"
if [ -f "$stamp" ] && (cd / && "$venv/bin/python" -c "import importlib.metadata as m, longseq.plugin.sglang
assert m.version('sglang') == '0.5.23' and m.version('torch').startswith('2.14.1')") 2>/dev/null; then
  echo "longseq: $venv is up to date"; exit 0
fi
command -v "$py" >/dev/null || fail "$py not found (SGLang 0.5.23 wheels are for Python 3.11; set PYTHON=...)"
source "$repo/scripts/need_disk.sh"
need_disk "$venv" 8 "the SGLang test venv (~5.8 GiB installed: torch 2.14.1 is a CUDA build)" || exit 1
t0=$(date +%s)
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv" || fail "cannot create the venv $venv"
pip=("$venv/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check)
echo "longseq: installing sglang 0.5.23 (CPU test subset) and longseq into $venv (about 2 minutes the first time)"
{ "${pip[@]}" --no-deps "${NODEPS[@]}" 2>&1 | quiet; } || fail "pip install --no-deps ${NODEPS[*]}"
{ "${pip[@]}" "${LIGHT[@]}" 2>&1 | quiet; } || fail "pip install of the light dependencies"
{ "${pip[@]}" --no-deps -e "$repo" 2>&1 | quiet; } || fail "pip install -e $repo"
# Import from a neutral cwd so the repo folder cannot shadow the installed package.
(cd / && "$venv/bin/python" -W ignore -c "$IMPORTS") || fail "the venv cannot import: $IMPORTS"
(cd / && "$venv/bin/python" -c "
import importlib.metadata as m, sys
eps = [e.value for e in m.entry_points(group='sglang.srt.plugins') if e.name == 'longseq']
sys.exit(0 if eps == ['longseq.plugin.sglang:register'] else f'sglang.srt.plugins entry point longseq missing: {eps}')
") || fail "the longseq entry point is not registered"
"$venv/bin/python" -m ipykernel install --user --name longseq-sglang --display-name "longseq (sglang-cpu)" >/dev/null \
  || fail "cannot register the Jupyter kernel longseq-sglang (examples/06)"
rm -f "$venv"/.longseq-sglang-*
touch "$stamp"
echo "longseq: setup_sglang done in $(( $(date +%s) - t0 )) s ($(du -sh "$venv" | cut -f1))"
