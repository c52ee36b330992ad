#!/bin/sh
# Container entrypoint: `quept <args>` (default `serve`), every setting from QUEPT_* variables.
# A checkpoint mounted at /checkpoint is served when QUEPT_CHECKPOINT is not set; with neither,
# the server builds the default model into $QUEPT_CACHE_DIR (a volume, so only once).
set -eu
# An empty QUEPT_* variable (e.g. compose's `${QUEPT_API_KEY:-}`) means "not set".
for v in $(env | sed -n 's/^\(QUEPT_[A-Za-z0-9_]*\)=$/\1/p'); do
  unset "$v"
done
if [ -z "${QUEPT_CHECKPOINT:-}" ] && [ -f /checkpoint/elastic.json ]; then
  export QUEPT_CHECKPOINT=/checkpoint
fi
mkdir -p "${QUEPT_CACHE_DIR:-/data}" 2>/dev/null || true
# Native CPU kernels prebuilt in the image (NATIVE_KERNELS=1): seed the cache, never rebuild.
if [ -d /opt/quept/cache/native ] && [ -n "${QUEPT_CACHE_DIR:-}" ]; then
  mkdir -p "$QUEPT_CACHE_DIR/native" 2>/dev/null || true
  for d in /opt/quept/cache/native/*; do
    [ -e "$d" ] && [ ! -e "$QUEPT_CACHE_DIR/native/${d##*/}" ] && cp -r "$d" "$QUEPT_CACHE_DIR/native/" 2>/dev/null || true
  done
fi
exec quept "$@"
