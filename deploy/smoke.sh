#!/usr/bin/env bash
# Smoke test of the container image: build it, run it, wait for /health, send a completion at
# X-Precision: w4, check the answer and /metrics, stop it gracefully, remove what it started.
#
#   deploy/smoke.sh                      # docker or podman, whichever is present
#
# Environment (all optional):
#   QUEPT_SMOKE_ENGINE      docker | podman            (default: the one on PATH, podman first
#                                                       when no Docker engine answers)
#   BASE_IMAGE              base image for the build   (default: localhost/debian:bookworm if
#                           that image exists locally, e.g. from shared/tools/local-base-image.sh,
#                           else the Dockerfile's python slim image)
#   QUEPT_SMOKE_CHECKPOINT  a checkpoint directory on the host, mounted read-only at /checkpoint;
#                           without it the server builds the default model into a volume
#   QUEPT_SMOKE_WHEELHOUSE  a directory of wheels offered to the build (a torch wheel there is
#                           used instead of an index); the host's torch wheel is found in
#                           pip's find-links directories when this is not set
#   QUEPT_SMOKE_PORT        host port (default 18000)
#   QUEPT_SMOKE_TIMEOUT     seconds to wait for /health (default 1800: a first start builds
#                           the default checkpoint)
#   QUEPT_SMOKE_KEEP=1      keep the image and the data volume (faster reruns)
#   QUEPT_SMOKE_BUILD_ARGS  extra arguments for the build command
#   QUEPT_SMOKE_RUN_ENV     extra `-e` settings for the container, space-separated KEY=VALUE
#   QUEPT_SMOKE_EXPECT_BACKEND  fail unless the server reports this backend (default: native, or
#                           torch when QUEPT_SMOKE_BUILD_ARGS holds NATIVE_KERNELS=0; empty: any)
# On podman the build and the container use the host network, runc when it is installed
# (crun fails on some hybrid cgroup hosts) and explicit ulimits; the host's CA bundle is handed
# to the build, so pip works behind a TLS-intercepting proxy.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"

log() { printf '[smoke %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "FAIL: $*"; exit 1; }

# ------------------------------------------------------------------------------ engine
engine=${QUEPT_SMOKE_ENGINE:-}
if [[ -z $engine ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null; then engine=podman
  elif command -v docker >/dev/null; then engine=docker
  else die "neither docker nor podman is installed"; fi
fi
command -v "$engine" >/dev/null || die "$engine is not installed"
command -v python3 >/dev/null || die "python3 is needed on the host for the checks"

eng=("$engine")
build_flags=()
run_flags=()
net=bridge
if [[ $engine == podman ]]; then
  if command -v runc >/dev/null; then eng+=(--runtime "$(command -v runc)"); fi
  build_flags+=(--format docker --network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
  run_flags+=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
  net=host
fi

id="quept-smoke-$$"
if [[ -z ${QUEPT_SMOKE_EXPECT_BACKEND+set} ]]; then
  [[ ${QUEPT_SMOKE_BUILD_ARGS:-} == *NATIVE_KERNELS=0* ]] && QUEPT_SMOKE_EXPECT_BACKEND=torch || QUEPT_SMOKE_EXPECT_BACKEND=native
fi
export QUEPT_SMOKE_EXPECT_BACKEND
tag="localhost/quept:smoke"
port=${QUEPT_SMOKE_PORT:-18000}
timeout_s=${QUEPT_SMOKE_TIMEOUT:-1800}
volume="quept-smoke-data"
tmp_files=()

if [[ -z ${BASE_IMAGE:-} ]] && "$engine" image inspect localhost/debian:bookworm >/dev/null 2>&1; then
  BASE_IMAGE=localhost/debian:bookworm
fi
[[ -n ${BASE_IMAGE:-} ]] && build_flags+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")

cleanup() {
  local rc=$?
  set +e
  if "$engine" container inspect "$id" >/dev/null 2>&1; then
    [[ $rc -ne 0 ]] && { log "container log (last 40 lines):"; "$engine" logs --tail 40 "$id" 2>&1 | sed 's/^/    /'; }
    "${eng[@]}" rm -f "$id" >/dev/null 2>&1
  fi
  for f in "${tmp_files[@]}"; do rm -f "$f"; done
  if [[ ${QUEPT_SMOKE_KEEP:-0} != 1 ]]; then
    "$engine" volume rm -f "$volume" >/dev/null 2>&1
    "$engine" rmi -f "$tag" >/dev/null 2>&1
    [[ $engine == podman ]] && "$engine" image prune -f --filter "label=quept.stage=build" >/dev/null 2>&1
  fi
  log "cleaned up (container $id$([[ ${QUEPT_SMOKE_KEEP:-0} == 1 ]] || echo ", image $tag, volume $volume"))"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ build-time inputs
# The host's CA bundle (TLS-intercepting proxies); deploy/certs/ is git-ignored.
for ca in "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
  if [[ -n $ca && -f $ca ]]; then
    cp "$ca" deploy/certs/smoke-host-ca.crt; tmp_files+=("$root/deploy/certs/smoke-host-ca.crt"); break
  fi
done
# A local torch wheel saves downloading torch (and picks the CPU build).
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/Dockerfile | head -1)
wheel_dirs=()
[[ -n ${QUEPT_SMOKE_WHEELHOUSE:-} ]] && wheel_dirs+=("$QUEPT_SMOKE_WHEELHOUSE")
for d in ${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true); do
  [[ -d $d ]] && wheel_dirs+=("$d")
done
if [[ -n ${QUEPT_SMOKE_WHEELHOUSE:-} ]]; then
  for w in "$QUEPT_SMOKE_WHEELHOUSE"/*.whl; do
    [[ -f $w ]] || continue
    dst="deploy/wheelhouse/$(basename "$w")"
    [[ -e $dst ]] || { ln "$w" "$dst" 2>/dev/null || cp "$w" "$dst"; tmp_files+=("$root/$dst"); }
  done
fi
if ! ls deploy/wheelhouse/torch-*.whl >/dev/null 2>&1; then
  for d in "${wheel_dirs[@]}"; do
    w=$(ls "$d"/torch-"${torch_version}"*-linux_x86_64.whl "$d"/torch-"${torch_version}"*manylinux*x86_64.whl 2>/dev/null | head -1 || true)
    if [[ -n $w ]]; then
      dst="deploy/wheelhouse/$(basename "$w")"
      ln "$w" "$dst" 2>/dev/null || cp "$w" "$dst"; tmp_files+=("$root/$dst")
      log "torch from local wheel $(basename "$w")"
      break
    fi
  done
fi

# ---------------------------------------------------------------------------- build
log "engine: $engine ($("$engine" --version 2>/dev/null | head -1)); base image: ${BASE_IMAGE:-Dockerfile default}"
log "building $tag ..."
t0=$(date +%s)
# shellcheck disable=SC2086
"${eng[@]}" build "${build_flags[@]}" --label quept.smoke=1 ${QUEPT_SMOKE_BUILD_ARGS:-} \
  -t "$tag" -f deploy/Dockerfile . > "/tmp/$id-build.log" 2>&1 \
  || { tail -40 "/tmp/$id-build.log"; die "build failed (full log: /tmp/$id-build.log)"; }
build_s=$(( $(date +%s) - t0 ))
size_b=$("$engine" image inspect --format '{{.Size}}' "$tag")
size_mb=$(( size_b / 1000000 ))
log "build time: ${build_s}s; image size: ${size_mb} MB ($tag)"
# The compiler stays in the build stage: the image ships the built kernels only.
compilers=$("${eng[@]}" run --rm "${run_flags[@]}" --entrypoint sh "$tag" -c 'command -v g++ c++ cc gcc clang++ || true' 2>/dev/null)
[[ -z $compilers ]] || die "the runtime image holds a compiler: $compilers"
rm -f "/tmp/$id-build.log"

# ------------------------------------------------------------------------------ run
run_flags+=(-d --name "$id" -v "$volume:/data")
if [[ $net == host ]]; then
  run_flags+=(--network host -e QUEPT_HOST=127.0.0.1 -e "QUEPT_PORT=$port")
else
  run_flags+=(-p "127.0.0.1:$port:8000")
fi
if [[ -n ${QUEPT_SMOKE_CHECKPOINT:-} ]]; then
  [[ -f $QUEPT_SMOKE_CHECKPOINT/elastic.json ]] || die "QUEPT_SMOKE_CHECKPOINT=$QUEPT_SMOKE_CHECKPOINT has no elastic.json"
  run_flags+=(-v "$(cd "$QUEPT_SMOKE_CHECKPOINT" && pwd):/checkpoint:ro")
fi
for kv in ${QUEPT_SMOKE_RUN_ENV:-}; do run_flags+=(-e "$kv"); done
# (podman without systemd logs that it cannot schedule periodic health checks: harmless here)
"${eng[@]}" run "${run_flags[@]}" "$tag" 2> >(grep -v "systemd connection" >&2) >/dev/null
log "started container $id; waiting for http://127.0.0.1:$port/health (up to ${timeout_s}s)"

t0=$(date +%s)
last=""
while :; do
  code=$(python3 - "$port" <<'EOF'
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=3).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("down")
EOF
)
  [[ $code == 200 ]] && break
  running=$("$engine" container inspect --format '{{.State.Running}}' "$id" 2>/dev/null || echo false)
  [[ $running == true ]] || die "container exited before /health answered 200"
  (( $(date +%s) - t0 > timeout_s )) && die "/health not 200 after ${timeout_s}s (last: $code)"
  line=$("$engine" logs --tail 20 "$id" 2>&1 | tr '\r' '\n' | grep -v -e 'GET /health' -e '^[[:space:]]*$' | tail -1 | cut -c1-150 || true)
  [[ $line != "$last" ]] && { log "  health=$code  | $line"; last=$line; }
  sleep 3
done
ready_s=$(( $(date +%s) - t0 ))
log "/health 200 after ${ready_s}s"

if [[ $engine == podman ]]; then
  "${eng[@]}" healthcheck run "$id" >/dev/null 2>&1 && log "image HEALTHCHECK: healthy" || die "image HEALTHCHECK failed"
fi

# ----------------------------------------------------------------- completion + metrics
python3 - "$port" <<'EOF' || die "completion or metrics check failed"
import json, os, re, sys, time, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"

def get(path):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return r.read().decode()

models = json.loads(get("/v1/models"))["data"]
model = models[0]["id"]
info = json.loads(get("/v1/precisions"))
print(f"[smoke] serving {model}: backend {info.get('backend')}, policy {info.get('policy')}, "
      f"default {info.get('default')}, widths {[w['name'] for w in info.get('widths', [])]}")
want = os.environ.get("QUEPT_SMOKE_EXPECT_BACKEND")
assert not want or info.get("backend") == want, f"backend {info.get('backend')!r}, expected {want!r}"
body = {"model": model, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json", "X-Precision": "w4"})
t = time.monotonic()
with urllib.request.urlopen(req, timeout=300) as r:
    status, used, out = r.status, r.headers.get("X-Precision", ""), json.loads(r.read())
dt = time.monotonic() - t
text = out["choices"][0]["text"]
usage = out.get("usage") or {}
print(f"[smoke] first answer ({dt:.2f}s, model {model}, X-Precision {used!r}, "
      f"{usage.get('completion_tokens')} tokens): {text!r}")
assert status == 200, status
assert used.startswith("w4"), f"response X-Precision is {used!r}, expected w4"
assert text.strip(), "empty completion"
assert usage.get("completion_tokens", 0) > 0, usage

# decode speed of the image, one stream: 128 tokens (end of sequence ignored) per width, after the answer above
for width in ("w8", "w4", "w2"):
    body = {"model": model, "prompt": "Write a story about the sea.", "max_tokens": 128, "temperature": 0,
            "ignore_eos": True}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Precision": width})
    t = time.monotonic()
    with urllib.request.urlopen(req, timeout=300) as r:
        n = json.loads(r.read())["usage"]["completion_tokens"]
    dt = time.monotonic() - t
    assert n == 128, f"{width}: {n} tokens, expected 128"
    print(f"[smoke] {width}: {n} tokens in {dt:.2f}s = {n / dt:.1f} tok/s (one stream, prefill included)")

metrics = get("/metrics")
def value(name, **labels):
    total, found = 0.0, False
    for line in metrics.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3)); found = True
    assert found, f"metric {name}{labels or ''} missing from /metrics"
    return total
checks = {
    'quept:requests_by_precision_total{precision="w4"}': value("quept:requests_by_precision_total", precision="w4") >= 1,
    'quept:generation_tokens_total{precision="w4"}': value("quept:generation_tokens_total", precision="w4") >= 1,
    "quept:request_success_total": value("quept:request_success_total") >= 1,
    "quept:time_to_first_token_seconds_count": value("quept:time_to_first_token_seconds_count") >= 1,
    "quept:num_requests_waiting": value("quept:num_requests_waiting") >= 0,
    "quept:kv_cache_usage_perc": value("quept:kv_cache_usage_perc") >= 0,
}
bad = [k for k, ok in checks.items() if not ok]
assert not bad, f"unexpected metric values: {bad}"
print(f"[smoke] metrics ok: {', '.join(checks)}")
EOF

# ------------------------------------------------------------------- graceful stop
t0=$(date +%s)
"${eng[@]}" stop -t 60 "$id" 2> >(grep -v "systemd connection" >&2) >/dev/null
stop_s=$(( $(date +%s) - t0 ))
exit_code=$("$engine" container inspect --format '{{.State.ExitCode}}' "$id")
log "stopped in ${stop_s}s, exit code $exit_code"
[[ $exit_code == 0 || $exit_code == 143 ]] || die "unclean exit code $exit_code"

log "SMOKE PASSED: build ${build_s}s, image ${size_mb} MB, ready ${ready_s}s"
