#!/usr/bin/env bash
# Builds, on this (CPU) machine, one part that carries the Mooncake Store client and mooncake_master (the remote
# KV tier, longseq/kv_offload/remote.py) to the GPU machine, which reaches no registry: the cp312 wheel of
# mooncake-transfer-engine-non-cuda (the version pyproject.toml's `remote` extra pins), msgpack, and Debian's
# shared libraries it links (libibverbs, libcurl, libnuma, ...); mooncake_setup.sh copies only those the GPU
# machine lacks.
# Usage, from the project's root:  bash scripts/gpu/make_mooncake_part.sh   -> .gpu/mooncake/ (git-ignored, ~54 MB)
# On the GPU machine, after the vLLM parts: carry .gpu/mooncake with `bash scripts/gpu/mooncake_setup.sh`, then
# `source scripts/gpu/mooncake_env.sh` after /tmp/lsq-bundle/env.sh.
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
out=$repo/.gpu/mooncake
cache=${LONGSEQ_GPU_MOONCAKE_CACHE:-$HOME/.cache/longseq-gpu-mooncake}
pin=$(grep -o 'mooncake-transfer-engine-non-cuda==[0-9a-z.]*' "$repo/pyproject.toml" | head -1)
mkdir -p "$cache/wheel" "$cache/debs"
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q "${plat[@]}" -d "$cache/wheel" "$pin" "msgpack==1.2.4" 2>&1 | grep -v "WARNING: Location" || true
# What store.so, mooncake_master and mooncake_client link beyond glibc and the wheel's own libraries.
( cd "$cache/debs" && apt-get download -q libibverbs1 libnl-3-200 libnl-route-3-200 libnuma1 libcurl4 libnghttp2-14 \
    librtmp1 libssh2-1 libpsl5 libldap-2.5-0 libsasl2-2 libsasl2-modules-db libgssapi-krb5-2 libkrb5-3 libk5crypto3 \
    libkrb5support0 libkeyutils1 libbrotli1 libidn2-0 libunistring2 libgnutls30 libhogweed6 libnettle8 libgmp10 \
    libp11-kit0 libtasn1-6 libffi8 libcom-err2 libdb5.3 libssl3 2>&1 | grep -v -e "^W:" -e "^Get:" -e "^Fetched" || true )
rm -rf "$out"; mkdir -p "$out"
cp "$cache"/wheel/*.whl "$cache"/debs/*.deb "$out/"
cp "$repo"/scripts/gpu/mooncake_setup.sh "$repo"/scripts/gpu/mooncake_env.sh "$out/"
( cd "$out" && sha256sum *.whl *.deb > MANIFEST )
du -sh "$out"
