#!/usr/bin/env bash
# Builds, on this (CPU) machine, the parts that carry SGLang 0.5.15 (the release built for torch 2.11) to the
# GPU machine, as an overlay on the vLLM 0.26 bundle (../shared/gpu/make_bundle.sh): the GPU machine has
# torch 2.11.0+cu130, triton 3.6 and transformers 5.17; the vLLM site (/tmp/site) adds fastapi, uvicorn,
# pydantic, pyzmq, msgspec, openai-harmony, gguf, compressed-tensors, ... This site (/tmp/site-sgl, first on
# PYTHONPATH) holds only what SGLang's server imports for a Llama-style model with a plugin attention backend
# and that neither of those provides, or provides at a version SGLang 0.5.15 pins differently.
# Usage, from the project's root:  bash scripts/gpu/make_sglang_bundle.sh
# Result: .gpu/sglang/p0 .. pN (git-ignored), each at most 52 MiB, each with MANIFEST, sglang_setup.sh and
# sglang_env.sh. On the GPU machine, after the vLLM parts: one call per part carrying .gpu/sglang/pN with
# `bash scripts/gpu/sglang_setup.sh`, the last prints SGLANG READY; then
# `source /tmp/lsq-bundle/env.sh && source scripts/gpu/sglang_env.sh`.
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
here=$repo/scripts/gpu
cache=${LONGSEQ_GPU_SGLANG_CACHE:-$HOME/.cache/longseq-gpu-sglang}
out=$repo/.gpu/sglang
PART=52   # MiB per part: the rest of the 64 MiB a call carries is for the working tree
mkdir -p "$cache/wheels" "$cache/zst"
grep -qx '/.gpu/' "$repo/.git/info/exclude" 2>/dev/null || { mkdir -p "$repo/.git/info"; echo '/.gpu/' >> "$repo/.git/info/exclude"; }

REQS=(
  # SGLang itself and its CUDA kernels (sgl_kernel's sm90 common_ops; FA3/FlashMLA/sm100 libraries are pruned below)
  sglang==0.5.15 sglang-kernel==0.4.4
  # sglang's pins, differing from the vLLM site (flashinfer 0.6.14, tvm-ffi 0.1.15.post2, openai 3.54,
  # xgrammar 0.2.8) or from the system (transformers 5.17, whose tokenizers >=0.23.1 transformers 5.12.1 rejects: it wants <=0.23.0, and 0.23.0 has no wheel)
  flashinfer-python==0.6.12 apache-tvm-ffi==0.1.11 transformers==5.12.1 tokenizers==0.22.2
  openai==2.6.1 distro==1.9.0 xgrammar==0.2.1
  # imported at module level on the server's start-up path, found in neither the system nor the vLLM site
  torchvision==0.26.0 soundfile==0.13.1 sentencepiece==0.2.3 orjson==3.13.0 nvidia-ml-py==13.615.71
  # loguru: compressed-tensors (in the vLLM site; vLLM imports it lazily, SGLang at start-up) imports it
  loguru==0.7.3
  # IPython (sglang.utils: from IPython.display import ...) and what it imports
  ipython==9.18.1 ipython-pygments-lexers==1.1.1 asttokens==3.0.2 executing==2.3.0 jedi==0.20.1 parso==0.8.7
  matplotlib-inline==0.2.2 pexpect==4.9.0 ptyprocess==0.7.0 prompt-toolkit==3.0.53 pure-eval==0.2.4
  pygments==2.21.0 stack-data==0.6.3 traitlets==5.16.1 wcwidth==0.9.4
  # the ninja binary, which FlashInfer's and tvm-ffi's JIT builds run
  ninja==1.13.2
)
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps)
for p in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64 any; do
  plat+=(--platform "$p"); done
quiet() { grep -v -e "WARNING: Location" -e "as the 'root' user" -e "^$" || true; }

# The archive is rebuilt when the package list or the pruning below changes.
key=$( (printf '%s\n' "${REQS[@]}"; sed -n '/^  # --- pruning/,/^  # --- end of pruning/p' "$0") | sha256sum | cut -c1-12)
stamp="$cache/site-sgl-$key.tar.zst"
if [ ! -s "$stamp" ]; then
  echo "downloading wheels (about 700 MB the first time: sglang-kernel alone is 615 MB)..."
  nice -n 19 python3 -m pip download -q "${plat[@]}" -d "$cache/wheels" "${REQS[@]}" 2>&1 | quiet
  nice -n 19 python3 -m pip download -q "${plat[@]}" -d "$cache/zst" zstandard==0.25.0 2>&1 | quiet
  site="$cache/site"
  rm -rf "$site"
  nice -n 19 python3 -m pip install -q --no-compile --no-index --find-links "$cache/wheels" "${plat[@]}" \
    --target "$site" "${REQS[@]}" 2>&1 | quiet
  # --- pruning (only files that the serving path never loads) ---
  # FA3 (1.7 GB): only --attention-backend fa3 and some ViT encoders load it (sgl_kernel.flash_attn, lazily);
  # make_sglang_fa3_parts.sh carries it in optional parts.
  rm -f "$site/sgl_kernel/flash_ops.abi3.so"
  # FlashMLA: DeepSeek MLA models only.
  rm -f "$site/sgl_kernel/flashmla_ops.abi3.so"
  # sgl_kernel loads sm90/common_ops on compute capability 9.0 (H100/H200); sm100/ serves every other GPU.
  rm -rf "$site/sgl_kernel/sm100"
  # A static library for C++ users of xgrammar; Python loads libxgrammar_bindings.so.
  rm -f "$site/xgrammar/lib/libxgrammar.a"
  find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
  # Console scripts carry this machine's interpreter path; keep only ninja's binary (an ELF file in bin/).
  head -c4 "$site/bin/ninja" | grep -q ELF || { echo "bin/ninja from the ninja wheel is not a binary" >&2; exit 1; }
  find "$site/bin" -mindepth 1 ! -name ninja -exec rm -rf {} +
  # nvidia-ml-py's top-level example.py and IPython's man page.
  rm -rf "$site/example.py" "$site/share"
  # --- end of pruning ---
  for d in sglang sgl_kernel/sm90 flashinfer tvm_ffi xgrammar transformers tokenizers torchvision IPython; do
    [ -e "$site/$d" ] || { echo "missing $d in the staged site" >&2; exit 1; }
  done
  echo "staged site: $(du -sh "$site" | cut -f1); packing (zstd -12, one thread, niced; several minutes)..."
  tar cf - -C "$site" . | nice -n 19 zstd -q -T1 -12 --long=27 -f -o "$stamp.tmp"
  mv "$stamp.tmp" "$stamp"
  for f in "$cache"/site-sgl-*.tar.zst; do [ "$f" = "$stamp" ] || rm -f "$f"; done
fi

rm -rf "$out"; mkdir -p "$out/split"
# 64 KiB below the limit leaves room for MANIFEST and the two scripts in the same folder.
split -b $(( PART * 1048576 - 65536 )) -d -a 2 "$stamp" "$out/split/sgl.part"
i=0
for f in "$out"/split/*; do mkdir -p "$out/p$i"; mv "$f" "$out/p$i/"; i=$((i+1)); done
rmdir "$out/split"
# Where the GPU machine has no zstd command the unpacker uses Python zstandard: carry the wheel in the last part
# when it fits, else in a part of its own.
zwhl=$(ls "$cache"/zst/zstandard-0.25.0-*.whl)
last="$out/p$((i-1))"
if [ $(( $(du -sb "$last" | cut -f1) + $(stat -c %s "$zwhl") + 65536 )) -gt $(( PART * 1048576 )) ]; then
  last="$out/p$i"; mkdir -p "$last"
fi
cp "$zwhl" "$last/"
( cd "$out" && for f in p*/sgl.part*; do echo "part $(basename "$f")"; done > MANIFEST
  echo "sha sgl.tar.zst $(sha256sum < "$stamp" | cut -d' ' -f1)" >> MANIFEST
  echo "size sgl.tar.zst $(stat -c %s "$stamp")" >> MANIFEST
  for r in "${REQS[@]}"; do echo "pkg $r"; done >> MANIFEST
  for d in p*/; do cp MANIFEST "$here/sglang_setup.sh" "$here/sglang_env.sh" "$d"; done )
echo "parts:"; du -sh --apparent-size "$out"/p*
echo "archive: $(du -sh --apparent-size "$stamp" | cut -f1)  sha256 $(grep '^sha' "$out/MANIFEST" | cut -d' ' -f3)"
echo "next, on the GPU machine, after the vLLM parts: one call per part, carry .gpu/sglang/pN," \
     "command 'bash scripts/gpu/sglang_setup.sh' (the last prints SGLANG READY)"
