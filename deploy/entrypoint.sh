#!/bin/sh
# Container entrypoint: `quept <args>` (default `serve`), every setting from QUEPT_* variables.
# A checkpoint mounted at /checkpoint is served when QUEPT_CHECKPOINT is not set; with neither,
# the server builds the default model into $QUEPT_CACHE_DIR (a volume, so only once).
set -eu
if [ -z "${QUEPT_CHECKPOINT:-}" ] && [ -f /checkpoint/elastic.json ]; then
  export QUEPT_CHECKPOINT=/checkpoint
fi
[ -n "${QUEPT_CHECKPOINT:-}" ] || unset QUEPT_CHECKPOINT
mkdir -p "${QUEPT_CACHE_DIR:-/data}" 2>/dev/null || true
exec quept "$@"
