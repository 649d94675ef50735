#!/usr/bin/env bash
# Runs ON the GPU machine, from the project's root, with .gpu/mooncake carried (made by make_mooncake_part.sh):
#   bash scripts/gpu/mooncake_setup.sh     -> /tmp/site-mc (mooncake, msgpack), /tmp/mc-libs (missing .so files)
# Prints MOONCAKE READY when `from mooncake.store import MooncakeDistributedStore` imports and mooncake_master runs.
set -euo pipefail
src=${1:-$PWD/.gpu/mooncake}
[ -f "$src/MANIFEST" ] || { echo "mooncake_setup: carry .gpu/mooncake and run from the project's root"; exit 1; }
( cd "$src" && sha256sum -c --quiet MANIFEST ) || { echo "mooncake_setup: part corrupted in transfer"; exit 1; }
SITE=/tmp/site-mc LIBS=/tmp/mc-libs DEBS=/tmp/mc-debs
rm -rf "$SITE" "$LIBS" "$DEBS"; mkdir -p "$SITE" "$LIBS" "$DEBS"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$src"/*.whl 2>&1 | grep -v "as the 'root' user" || true
if command -v dpkg-deb >/dev/null; then
  for d in "$src"/*.deb; do dpkg-deb -x "$d" "$DEBS"; done
else  # a .deb is an ar archive holding data.tar.{xz,zst,gz}
  python3 - "$DEBS" "$src"/*.deb <<'PY'
import io, sys, tarfile
dest = sys.argv[1]
for deb in sys.argv[2:]:
    raw = open(deb, "rb").read(); i = 8
    while i < len(raw):
        name, size = raw[i:i + 16].decode().strip().rstrip("/"), int(raw[i + 48:i + 58])
        body = raw[i + 60:i + 60 + size]; i += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            tarfile.open(fileobj=io.BytesIO(body)).extractall(dest, filter="fully_trusted")
PY
fi
# Copy in only what the system lacks, so Debian's builds never shadow the system's own libraries.
bins=("$SITE/mooncake/store.so" "$SITE/mooncake/engine.so" "$SITE/mooncake/mooncake_master" "$SITE/mooncake/mooncake_client")
for _ in 1 2 3 4 5 6; do
  missing=$(for b in "${bins[@]}" "$LIBS"/*.so*; do [ -e "$b" ] && LD_LIBRARY_PATH=$LIBS ldd "$b" 2>/dev/null || true; done \
            | awk '/not found/ {print $1}' | sort -u || true)
  [ -n "$missing" ] || break
  for lib in $missing; do
    f=$(find "$DEBS" -name "$lib" | head -1)
    [ -n "$f" ] && cp -L "$f" "$LIBS/$lib" && echo "  added $lib" || echo "  not in the part: $lib"
  done
done
source "$(dirname "$0")/mooncake_env.sh"
python3 -c "from mooncake.store import MooncakeDistributedStore; print('  mooncake.store imports')"
"$SITE/mooncake/mooncake_master" --version >/dev/null 2>&1 && echo "  mooncake_master runs" || { echo "mooncake_master does not run"; exit 1; }
echo "MOONCAKE READY"
