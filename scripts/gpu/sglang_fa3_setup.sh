#!/usr/bin/env bash
# Runs ON the GPU machine, from the project's root, once per carried part (carry .gpu/sglang-fa3/pN), after
# scripts/gpu/sglang_setup.sh printed SGLANG READY: gathers the FA3 parts (made by make_sglang_fa3_parts.sh) in
# /tmp/lsq-sgl-fa3; when all have arrived it checks the archive's sha256 and unpacks sgl_kernel/flash_ops.abi3.so
# into /tmp/site-sgl, then prints FA3 READY. Idempotent. Parts survive only while the machine stays warm.
set -euo pipefail
B=${LONGSEQ_FA3_PARTS_DIR:-/tmp/lsq-sgl-fa3}
SITE=${LONGSEQ_SGL_SITE:-/tmp/site-sgl}
mkdir -p "$B"
for d in "$PWD"/.gpu/sglang-fa3/p*/; do
  [ -f "$d/MANIFEST" ] && cp -n "$d"/* "$B"/ 2>/dev/null || true
done
cd "$B"
[ -f MANIFEST ] || { echo "sglang_fa3_setup: no part found (carry .gpu/sglang-fa3/pN, run from the project's root)"; exit 1; }
want=$(grep '^sha fa3.zst' MANIFEST | cut -d' ' -f3)
if [ "$(cat "$SITE/sgl_kernel/.fa3" 2>/dev/null)" = "$want" ]; then rm -f fa3.part*; echo "FA3 READY"; exit 0; fi
missing=0
for p in $(grep '^part ' MANIFEST | cut -d' ' -f2); do [ -f "$p" ] || { echo "waiting for $p"; missing=1; }; done
[ "$missing" = 0 ] || { echo "have: $(ls fa3.part* 2>/dev/null | tr '\n' ' ')"; exit 0; }
# Parts may come before SGLang's own (they only wait here); unpacking needs its site.
[ -f "$SITE/.ready" ] || { echo "sglang_fa3_setup: all parts here, but SGLang's site is not set up: run scripts/gpu/sglang_setup.sh, then this again"; exit 1; }
parts=$(grep '^part ' MANIFEST | cut -d' ' -f2)
[ "$(cat $parts | sha256sum | cut -d' ' -f1)" = "$want" ] || { echo "FA3 archive corrupted in transfer: rebuild the parts"; rm -f fa3.part*; exit 1; }
dest="$SITE/sgl_kernel/flash_ops.abi3.so"
if command -v zstd >/dev/null; then
  cat $parts | zstd -q -dc --long=27 > "$dest.tmp"
else  # the vLLM bundle's set-up installed Python zstandard in /tmp/lsq-zst
  cat $parts | PYTHONPATH=/tmp/lsq-zst python3 -c "
import sys, zstandard
zstandard.ZstdDecompressor(max_window_size=2**31).copy_stream(sys.stdin.buffer, sys.stdout.buffer)" > "$dest.tmp"
fi
mv "$dest.tmp" "$dest"
echo "$want" > "$SITE/sgl_kernel/.fa3"
rm -f fa3.part*
echo "FA3 READY ($(du -sh "$dest" | cut -f1))"
