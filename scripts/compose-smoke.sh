#!/usr/bin/env bash
# The cluster for real, end to end: build the image, start the CPU profile (Redis, the API behind
# its proxy, a CPU worker), register a made sample dataset over REST, label it with a small
# random-weight teacher, fetch one image's labels and a heatmap, check that the proxy refuses an
# oversized request head, then tear everything down, volumes included.
#
#   scripts/compose-smoke.sh                     # docker compose if it runs, else podman-compose
#
# Environment (all optional):
#   SMOKE_TIMEOUT                seconds for the whole run (default 2400); exit 1 past it
#   SMOKE_ENGINE                 docker | podman (default: docker when its engine answers)
#   TOKENLABEL_BASE_IMAGE        the image to build on (default: docker-compose.cpu.yml's)
#   TOKENLABEL_TORCH_INDEX_URL   where torch comes from (e.g. the CPU-only wheel index)
#   SMOKE_PIP_CONF, SMOKE_CA_BUNDLE   files passed to the build as the pip_conf and ca_bundle
#                                secrets (a private index, a TLS-intercepting proxy)
#   SMOKE_BUILD_NETWORK          the build's network, e.g. "host" for an index on this machine
#   SMOKE_BUILD_REDIS=1          build Redis from the base's Debian packages
#                                (deploy/redis/Dockerfile) instead of pulling redis:7
#   SMOKE_BUILD_PROXY=1          build nginx from the base's Debian packages
#                                (deploy/proxy/Dockerfile) instead of pulling nginx:1.27
#   SMOKE_KEEP=1                 leave the stack up (no teardown) to look around
#
# Exits 0 when every step passed; otherwise 1, with the failing step and every container's logs.
# Not part of .ci/run (gigabytes of image, minutes of build). deploy/README.md records a run.
set -euo pipefail
cd "$(dirname "$0")/.."

TIMEOUT=${SMOKE_TIMEOUT:-2400}
PROJECT=tokenlabel-smoke
TAG=smoke
STEP="start"
began=$(date +%s)

say() { printf '[smoke %4ss] %s\n' "$(( $(date +%s) - began ))" "$*"; }
left() { echo $(( TIMEOUT - ($(date +%s) - began) )); }

# -- the engine -------------------------------------------------------------------------------
engine=${SMOKE_ENGINE:-}
if [[ -z $engine ]]; then
  if docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    engine=docker
  elif command -v podman >/dev/null && command -v podman-compose >/dev/null; then
    engine=podman
  else
    echo "compose-smoke: neither a running Docker engine with 'docker compose' nor podman with" \
         "podman-compose; see deploy/README.md (Without Docker)" >&2
    exit 1
  fi
fi
case $engine in
  docker) compose=(docker compose) ;;
  podman) compose=(podman-compose) ;;
  *) echo "compose-smoke: SMOKE_ENGINE must be docker or podman, not '$engine'" >&2; exit 1 ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/tokenlabel-smoke.XXXXXX")
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
api_key=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
mkdir -p "$work/data" "$work/checkpoints"
printf '%s\n' "$api_key" >"$work/api_keys.txt"
chmod -R a+rX "$work"
export COMPOSE_PROJECT_NAME=$PROJECT TOKENLABEL_TAG=$TAG TOKENLABEL_API_PORT=$port \
       TOKENLABEL_DATA_DIR=$work/data TOKENLABEL_CHECKPOINT_DIR=$work/checkpoints \
       TOKENLABEL_API_KEYS_FILE=$work/api_keys.txt
files=(-f docker-compose.yml -f docker-compose.cpu.yml)
api="http://127.0.0.1:$port"
auth=(-H "Authorization: Bearer $api_key")

teardown() {
  local rc=$?
  set +e
  if (( rc != 0 )); then
    say "FAILED at: $STEP"
    for service in redis api proxy worker-cpu; do
      echo "----- logs: $service"
      timeout 60 "${compose[@]}" "${files[@]}" logs --tail 200 "$service" 2>&1
    done
  fi
  if [[ ${SMOKE_KEEP:-} != 1 ]]; then
    timeout 300 "${compose[@]}" "${files[@]}" down -v >/dev/null 2>&1
    rm -rf "$work"
  fi
  (( rc == 0 )) && say "passed in $(( $(date +%s) - began )) s"
  exit $rc
}
trap teardown EXIT

# Run "$@" within the time left; a step past it fails the run.
within() { local t; t=$(left); (( t > 0 )) || { echo "out of time" >&2; return 1; }
           timeout "$t" "$@"; }

# GET or POST to the API; prints the body, fails on a non-2xx status.
call() {
  local method=$1 path=$2 body=${3:-}
  local args=(-sS --max-time 30 -X "$method" "${auth[@]}" -o "$work/body" -w '%{http_code}')
  [[ -n $body ]] && args+=(-H 'Content-Type: application/json' -d "$body")
  local code
  code=$(curl "${args[@]}" "$api$path")
  if [[ $code != 2* ]]; then
    echo "$method $path: HTTP $code: $(head -c 500 "$work/body")" >&2
    return 1
  fi
  cat "$work/body"
}

# Poll "$@" (a command printing a value) until it prints one of the states in $want.
wait_state() {
  local want=$1; shift
  local state
  while (( $(left) > 0 )); do
    state=$("$@" 2>/dev/null || true)
    if [[ " $want " == *" $state "* ]]; then echo "$state"; return 0; fi
    sleep 2
  done
  echo "timed out (last: ${state:-none})" >&2
  return 1
}

# -- build ------------------------------------------------------------------------------------
STEP="build"
build=(build -f deploy/Dockerfile -t "tokenlabel:$TAG"
       --build-arg "BASE_IMAGE=${TOKENLABEL_BASE_IMAGE:-ubuntu:24.04}"
       --build-arg "TORCH_INDEX_URL=${TOKENLABEL_TORCH_INDEX_URL:-}")
[[ -n ${SMOKE_PIP_CONF:-} ]] && build+=(--secret "id=pip_conf,src=$SMOKE_PIP_CONF")
[[ -n ${SMOKE_CA_BUNDLE:-} ]] && build+=(--secret "id=ca_bundle,src=$SMOKE_CA_BUNDLE")
[[ -n ${SMOKE_BUILD_NETWORK:-} ]] && build+=(--network "$SMOKE_BUILD_NETWORK")
say "building tokenlabel:$TAG with $engine (base ${TOKENLABEL_BASE_IMAGE:-ubuntu:24.04})"
build_began=$(date +%s)
within "$engine" "${build[@]}" .
say "built in $(( $(date +%s) - build_began )) s; image size: $("$engine" image inspect \
  --format '{{.Size}}' "tokenlabel:$TAG" | awk '{printf "%.2f GB", $1 / 1e9}')"

if [[ ${SMOKE_BUILD_REDIS:-} == 1 ]]; then
  STEP="build redis"
  redis_build=(build -f deploy/redis/Dockerfile -t "tokenlabel-redis:$TAG")
  [[ -n ${TOKENLABEL_BASE_IMAGE:-} ]] && redis_build+=(--build-arg "BASE_IMAGE=$TOKENLABEL_BASE_IMAGE")
  [[ -n ${SMOKE_BUILD_NETWORK:-} ]] && redis_build+=(--network "$SMOKE_BUILD_NETWORK")
  within "$engine" "${redis_build[@]}" deploy/redis >/dev/null
  export TOKENLABEL_REDIS_IMAGE=tokenlabel-redis:$TAG
  say "built Redis from the base's packages"
fi

if [[ ${SMOKE_BUILD_PROXY:-} == 1 ]]; then
  STEP="build proxy"
  proxy_build=(build -f deploy/proxy/Dockerfile -t "tokenlabel-proxy:$TAG")
  [[ -n ${TOKENLABEL_BASE_IMAGE:-} ]] && proxy_build+=(--build-arg "BASE_IMAGE=$TOKENLABEL_BASE_IMAGE")
  [[ -n ${SMOKE_BUILD_NETWORK:-} ]] && proxy_build+=(--network "$SMOKE_BUILD_NETWORK")
  within "$engine" "${proxy_build[@]}" deploy/proxy >/dev/null
  export TOKENLABEL_PROXY_IMAGE=tokenlabel-proxy:$TAG
  say "built nginx from the base's packages"
fi

# -- sample data, made by the image itself ------------------------------------------------------
STEP="make the sample dataset and teacher"
within "$engine" run --rm --user 0:0 -v "$work:/work" "tokenlabel:$TAG" python -c '
from pathlib import Path
from labeler_service.sample import make_random_checkpoint, make_sample_images
make_sample_images(Path("/work/data/toy"), per_class=4)
make_random_checkpoint(Path("/work/checkpoints/teacher.safetensors"), num_classes=3)'
chmod -R a+rX "$work"

# -- up ---------------------------------------------------------------------------------------
STEP="start the CPU profile"
up_began=$(date +%s)
within "${compose[@]}" "${files[@]}" up -d --no-build redis api proxy worker-cpu
STEP="wait for /readyz"
ready() { curl -s --max-time 5 -o /dev/null -w '%{http_code}' "$api/readyz"; }
wait_state 200 ready >/dev/null
say "ready in $(( $(date +%s) - up_began )) s"

# -- register, label, read --------------------------------------------------------------------
STEP="register the dataset over REST"
call POST /v1/datasets '{"name": "toy", "path": "toy"}' >/dev/null
dataset_state() { call GET /v1/datasets/toy | jq -r .state; }
state=$(wait_state "ready failed" dataset_state)
[[ $state == ready ]] || { call GET /v1/datasets/toy >&2; false; }
say "dataset registered: $(call GET /v1/datasets/toy | jq -c '{num_images, class_names}')"

STEP="label it"
job=$(call POST /v1/jobs '{"dataset": "toy", "topk": 2, "teacher": {"model": "test_nfnet",
      "checkpoint": "teacher.safetensors", "input_size": 64}}' | jq -r .id)
job_state() { call GET "/v1/jobs/$job" | jq -r .state; }
state=$(wait_state "succeeded failed cancelled" job_state)
[[ $state == succeeded ]] || { call GET "/v1/jobs/$job" >&2; false; }
labelset=$(call GET "/v1/jobs/$job" | jq -r .labelset)
say "job $job succeeded: $(call GET "/v1/jobs/$job" | jq -c .progress)"

STEP="fetch an image's labels and a heatmap"
labels=$(call GET "/v1/labelsets/$labelset/images/0")
jq -e '.status == 0 and (.logits | length) == .topk' <<<"$labels" >/dev/null \
  || { echo "image 0 not labeled: $(head -c 500 <<<"$labels")" >&2; false; }
curl -sS --fail --max-time 30 "${auth[@]}" -o "$work/heatmap.png" \
  "$api/v1/labelsets/$labelset/images/0/heatmap.png"
[[ $(head -c 8 "$work/heatmap.png" | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]] \
  || { echo "the heatmap is not a PNG" >&2; false; }
say "image 0: $(jq -c '{status_description, grid, topk}' <<<"$labels"); heatmap" \
    "$(stat -c %s "$work/heatmap.png") bytes"

STEP="the proxy refuses an oversized request head"
pad=$(head -c 40000 /dev/zero | tr '\0' a)
code=$(curl -s --max-time 30 -o /dev/null -w '%{http_code}' -H "X-Pad: $pad" "$api/healthz")
[[ $code == 400 ]] || { echo "a 40 KB header: HTTP $code, not nginx's 400" >&2; false; }
say "a 40 KB header: HTTP $code from the proxy"
STEP="done"
