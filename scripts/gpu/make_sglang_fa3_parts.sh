#!/usr/bin/env bash
# Builds, on this (CPU) machine, optional parts that add SGLang's FA3 kernels (sgl_kernel/flash_ops.abi3.so, 1.7 GB;
# make_sglang_bundle.sh prunes it) to the GPU machine's SGLang site, for --attention-backend fa3: SGLang's default on
# Hopper, the baseline issue 22's decode table names. Taken from the same sglang-kernel wheel the bundle unpacked.
# Usage, from the project's root, after make_sglang_bundle.sh:  bash scripts/gpu/make_sglang_fa3_parts.sh
# Result: .gpu/sglang-fa3/p0 .. pN (git-ignored), each at most 52 MiB with MANIFEST. On the GPU machine, after
# SGLANG READY: one call per part carrying .gpu/sglang-fa3/pN with `bash scripts/gpu/sglang_fa3_setup.sh`; the last
# prints FA3 READY.
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
cache=${LONGSEQ_GPU_SGLANG_CACHE:-$HOME/.cache/longseq-gpu-sglang}
out=$repo/.gpu/sglang-fa3
PART=52   # MiB per part, as the other bundles
whl=$(ls "$cache"/wheels/sglang_kernel-0.4.4-*.whl 2>/dev/null | head -1)
[ -n "$whl" ] || { echo "no sglang-kernel 0.4.4 wheel in $cache/wheels: run scripts/gpu/make_sglang_bundle.sh first" >&2; exit 1; }
stamp="$cache/fa3-$(sha256sum < "$whl" | cut -c1-12).zst"
if [ ! -s "$stamp" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  python3 - "$whl" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("sgl_kernel/flash_ops.abi3.so", sys.argv[2])
PY
  echo "packing flash_ops.abi3.so ($(du -sh "$tmp/sgl_kernel/flash_ops.abi3.so" | cut -f1); zstd -12, niced, about a minute)..."
  nice -n 19 zstd -q -T1 -12 --long=27 -f "$tmp/sgl_kernel/flash_ops.abi3.so" -o "$stamp.tmp"
  mv "$stamp.tmp" "$stamp"
fi
rm -rf "$out"; mkdir -p "$out/split"
split -b $(( PART * 1048576 - 65536 )) -d -a 2 "$stamp" "$out/split/fa3.part"
i=0
for f in "$out"/split/*; do mkdir -p "$out/p$i"; mv "$f" "$out/p$i/"; i=$((i+1)); done
rmdir "$out/split"
( cd "$out" && for f in p*/fa3.part*; do echo "part $(basename "$f")"; done > MANIFEST
  echo "sha fa3.zst $(sha256sum < "$stamp" | cut -d' ' -f1)" >> MANIFEST
  echo "from $(basename "$whl")" >> MANIFEST
  for d in p*/; do cp MANIFEST "$d"; done )
echo "parts:"; du -sh --apparent-size "$out"/p*
echo "next, on the GPU machine, after SGLANG READY: one call per part, carry .gpu/sglang-fa3/pN," \
     "command 'bash scripts/gpu/sglang_fa3_setup.sh' (the last prints FA3 READY)"
