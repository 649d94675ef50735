#!/usr/bin/env bash
# Runs ON the GPU machine, from the project's root, once per carried part (carry .gpu/sglang/pN):
#   bash scripts/gpu/sglang_setup.sh        (or: bash .gpu/sglang/pN/sglang_setup.sh)
# Gathers the SGLang 0.5.15 parts (made by scripts/gpu/make_sglang_bundle.sh) in /tmp/lsq-sgl-bundle; when all
# have arrived it checks the archive's sha256 and unpacks it to /tmp/site-sgl, then prints SGLANG READY.
# Idempotent: once /tmp/site-sgl holds the archive named by MANIFEST it only prints SGLANG READY. Parts survive
# only while the machine stays warm, so send the calls back to back (with the vLLM parts, whose site this
# one overlays: source /tmp/lsq-bundle/env.sh, then scripts/gpu/sglang_env.sh).
set -euo pipefail
B=/tmp/lsq-sgl-bundle
SITE=/tmp/site-sgl
src=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$B"
for d in "$src" "$PWD"/.gpu/sglang/p*/ "$src"/../../.gpu/sglang/p*/; do
  [ -f "$d/MANIFEST" ] && cp -n "$d"/* "$B"/ 2>/dev/null || true
done
cd "$B"
[ -f MANIFEST ] || { echo "sglang_setup: no part found (carry .gpu/sglang/pN and run from the project's root)"; exit 1; }
want=$(grep '^sha sgl.tar.zst' MANIFEST | cut -d' ' -f3)
if [ -f "$SITE/.ready" ] && [ "$(cat "$SITE/.ready")" = "$want" ]; then rm -f sgl.part*; echo "SGLANG READY"; exit 0; fi
missing=0
for p in $(grep '^part ' MANIFEST | cut -d' ' -f2); do [ -f "$p" ] || { echo "waiting for $p"; missing=1; }; done
[ "$missing" = 0 ] || { echo "have: $(ls sgl.part* 2>/dev/null | tr '\n' ' ')"; exit 0; }
parts=$(grep '^part ' MANIFEST | cut -d' ' -f2)
echo "all $(echo $parts | wc -w) parts here; checking sha256..."
[ "$(cat $parts | sha256sum | cut -d' ' -f1)" = "$want" ] || { echo "sglang archive corrupted in transfer: rebuild the bundle"; rm -f sgl.part*; exit 1; }
rm -rf "$SITE.tmp"; mkdir -p "$SITE.tmp"
if command -v zstd >/dev/null; then
  cat $parts | zstd -q -dc --long=27 | tar xf - -C "$SITE.tmp"
else
  if ! PYTHONPATH=/tmp/lsq-zst python3 -c "import zstandard" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/lsq-zst zstandard-*.whl 2>&1 | grep -v "as the 'root' user" || true
  fi
  PYTHONPATH=/tmp/lsq-zst python3 - "$SITE.tmp" $parts <<'PY'
import io, sys, tarfile, zstandard
dest, parts = sys.argv[1], sys.argv[2:]
class Cat(io.RawIOBase):
    def __init__(self, files): self.fs = [open(f, "rb") for f in files]; self.i = 0
    def readable(self): return True
    def readinto(self, b):
        while self.i < len(self.fs):
            n = self.fs[self.i].readinto(b)
            if n: return n
            self.i += 1
        return 0
r = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(io.BufferedReader(Cat(parts), 1 << 20))
tarfile.open(fileobj=r, mode="r|").extractall(dest, filter="fully_trusted")
PY
fi
rm -rf "$SITE"; mv "$SITE.tmp" "$SITE"
echo "$want" > "$SITE/.ready"
rm -f sgl.part*   # free /tmp; MANIFEST and the scripts stay
# Versions as Python will see them (this site first, then the vLLM site, then the system).
PYTHONPATH=$SITE:/tmp/site python3 - <<'PY' || true
import importlib.metadata as m
for d in ["sglang", "sglang-kernel", "flashinfer-python", "apache-tvm-ffi", "transformers", "tokenizers", "xgrammar",
          "openai", "torch", "triton", "torchvision", "fastapi", "pydantic"]:
    try: print(f"  {d} {m.version(d)}")
    except m.PackageNotFoundError: print(f"  {d} MISSING")
PY
echo "SGLANG READY"
