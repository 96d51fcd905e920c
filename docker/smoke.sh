#!/usr/bin/env bash
# Build the Docker images and smoke-test them end to end (`make docker-smoke`). Run as root (or a docker-group
# user) from anywhere; no registry needed: the base image is debootstrapped from Debian when it is missing.
#
#  1. dockerd running (started here, and stopped at the end, when it was not); tools installed with apt-get
#     when missing and we are root (docker.io, debootstrap, docker-compose)
#  2. base image $BASE_IMAGE: built with debootstrap (Debian bookworm minbase + python3, python3-venv) if missing
#  3. docker/local/ filled with this machine's build inputs (CA bundle, local torch CPU wheel): build stage only
#  4. CPU image built; runs as non-root; holds no tests/benchmarks/wheels/CA bundle
#  5. digits index built in a volume with the image's own CLI (proponent train / proponent index)
#  6. server container: /healthz, /readyz, HEALTHCHECK status, queries with the Python client from the host
#     (upload, stored sample, self-influence job)
#  7. SIGTERM mid-job (docker stop), restart on the same state volume: the job resumes and its result equals
#     an uninterrupted `proponent self-influence` run
#  8. the same image through docker/compose.yaml (docker compose or docker-compose v1)
#  9. GPU image (docker/Dockerfile.gpu) built from the same base with the CPU torch wheel (built, not run)
#
# Settings (environment): BASE_IMAGE (proponent-base:bookworm), IMAGE (proponent:cpu), GPU_IMAGE
# (proponent:gpu-smoke), SMOKE_GPU=1, SMOKE_COMPOSE=1, SMOKE_EPOCHS=5, SMOKE_JOB_M=64, SMOKE_PYTHON
# (.venv/bin/python), SMOKE_TORCH_WHEEL (default: torch-*+cpu-cp311-*.whl from pip's find-links),
# SMOKE_CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt), SMOKE_KEEP=0 (1: keep containers and volumes),
# SMOKE_PREFIX (proponent-smoke), DEBIAN_MIRROR (http://deb.debian.org/debian), DOCKER_BUILDKIT (0 when
# `docker buildx` is missing: the legacy builder; the Dockerfiles work with both).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BASE_IMAGE="${BASE_IMAGE:-proponent-base:bookworm}"
IMAGE="${IMAGE:-proponent:cpu}"
GPU_IMAGE="${GPU_IMAGE:-proponent:gpu-smoke}"
SMOKE_GPU="${SMOKE_GPU:-1}"
SMOKE_COMPOSE="${SMOKE_COMPOSE:-1}"
SMOKE_EPOCHS="${SMOKE_EPOCHS:-5}"
SMOKE_JOB_M="${SMOKE_JOB_M:-64}"
SMOKE_PYTHON="${SMOKE_PYTHON:-$ROOT/.venv/bin/python}"
SMOKE_CA_BUNDLE="${SMOKE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
SMOKE_KEEP="${SMOKE_KEEP:-0}"
P="${SMOKE_PREFIX:-proponent-smoke}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
THREADS="${PROPONENT_THREADS:-2}"
WORK="$(mktemp -d /tmp/proponent-smoke.XXXXXX)"
API_KEY="smoke-key"
T_START=$SECONDS
declare -a SUMMARY=()
STARTED_DOCKERD=""

say() { printf '\n== %s\n' "$*"; }
info() { printf '   %s\n' "$*"; }
die() { printf '\nSMOKE FAILED: %s\n' "$*" >&2; exit 1; }
timed() {  # timed LABEL LOGFILE CMD...: run CMD with its output in LOGFILE; record the duration
  local label=$1 log=$2 t0=$SECONDS; shift 2
  if ! "$@" >"$log" 2>&1; then tail -n 40 "$log" >&2; die "$label (log: $log)"; fi
  SUMMARY+=("$(printf '%-50s %5ss' "$label" $((SECONDS - t0)))")
  info "$label: $((SECONDS - t0))s"
}
py() { "$SMOKE_PYTHON" docker/smoke_client.py "$@"; }
free_port() { "$SMOKE_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
health() { docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$1"; }
wait_healthy() {  # wait_healthy CONTAINER: until the HEALTHCHECK reports healthy
  local t0=$SECONDS s
  while :; do
    s="$(health "$1")"
    [ "$s" = healthy ] && { info "container $1: health=$s after $((SECONDS - t0))s"; return; }
    if [ "$(docker inspect --format '{{.State.Running}}' "$1")" != true ] || [ "$s" = unhealthy ] \
       || [ $((SECONDS - t0)) -gt 240 ]; then
      docker logs --tail 40 "$1" >&2 || true; die "container $1 not healthy (health=$s)"
    fi
    sleep 1
  done
}
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  info "apt-get install $*"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "$@"; } \
    >"$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log" >&2; return 1; }
}
cleanup() {
  local rc=$?
  if [ "$SMOKE_KEEP" != 1 ] && docker info >/dev/null 2>&1; then
    [ -n "${COMPOSE:-}" ] && $COMPOSE -f docker/compose.yaml -p "$P" down -v >/dev/null 2>&1 || true
    docker rm -f "$P-server" "$P-cp" >/dev/null 2>&1 || true
    docker volume rm "$P-data" "$P-state" >/dev/null 2>&1 || true
  fi
  if [ -n "$STARTED_DOCKERD" ]; then kill "$STARTED_DOCKERD" 2>/dev/null || true; wait "$STARTED_DOCKERD" 2>/dev/null || true; fi
  [ $rc = 0 ] && rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'die "line $LINENO: $BASH_COMMAND"' ERR

# ------------------------------------------------------------------------------------ 1. tools, dockerd
say "prerequisites"
[ -x "$SMOKE_PYTHON" ] || die "$SMOKE_PYTHON not found: run 'make setup' (or set SMOKE_PYTHON to a python with proponent installed)"
# No engine (docker missing and not installable, or dockerd cannot start here): a failure, unless
# SMOKE_REQUIRE_ENGINE=0 (CI on machines that may not run containers), where it is a loud skip.
no_engine() {
  if [ "${SMOKE_REQUIRE_ENGINE:-1}" = 0 ]; then
    printf '\n== docker smoke SKIPPED: no Docker engine on this machine (%s)\n' "$*"; trap - EXIT; exit 0
  fi
  die "$*"
}
command -v docker >/dev/null && command -v dockerd >/dev/null || apt_install docker.io || no_engine "docker is missing"
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || no_engine "dockerd is not running and we are not root"
  info "starting dockerd (log: $WORK/dockerd.log)"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -n 20 "$WORK/dockerd.log" >&2; no_engine "dockerd did not start"; }
fi
if [ -z "${DOCKER_BUILDKIT+x}" ] && ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi
info "docker client $(docker version --format '{{.Client.Version}}'), server $(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}'), builder: $([ "${DOCKER_BUILDKIT:-1}" = 0 ] && echo legacy || echo BuildKit)"

# ------------------------------------------------------------------------------------ 2. base image
say "base image $BASE_IMAGE"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  info "present"
else
  [[ "$BASE_IMAGE" == proponent-base:* ]] || docker pull "$BASE_IMAGE" || die "cannot pull $BASE_IMAGE"
  if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || apt_install debootstrap || die "debootstrap is missing"
    build_base() {
      debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" \
        && rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/*.bin \
        && tar -C "$WORK/rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" \
        && rm -rf "$WORK/rootfs"
    }
    timed "base image (debootstrap + docker import)" "$WORK/base.log" build_base
  fi
fi

# ------------------------------------------------------------------------------------ 3. local build inputs
say "build inputs in docker/local/ (build stage only)"
TORCH_ARGS=()
if [ -z "${SMOKE_TORCH_WHEEL:-}" ]; then
  for d in $(pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p") /opt/wheels; do
    for w in "$d"/torch-*+cpu-cp311-*.whl; do [ -f "$w" ] && SMOKE_TORCH_WHEEL="$w" && break 2; done
  done
fi
if [ -n "${SMOKE_TORCH_WHEEL:-}" ]; then
  ln -f "$SMOKE_TORCH_WHEEL" docker/local/ 2>/dev/null || cp -f "$SMOKE_TORCH_WHEEL" docker/local/
  v="$(basename "$SMOKE_TORCH_WHEEL" | cut -d- -f2)"
  TORCH_ARGS=(--build-arg "TORCH_SPEC=torch==$v")
  info "torch wheel: $SMOKE_TORCH_WHEEL (TORCH_SPEC=torch==$v)"
else
  info "no local torch CPU wheel: pip resolves the default TORCH_SPEC"
fi
if [ -f "$SMOKE_CA_BUNDLE" ]; then
  cp -f "$SMOKE_CA_BUNDLE" docker/local/ca-certificates.crt
  info "pip CA bundle: $SMOKE_CA_BUNDLE"
fi
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE" "${TORCH_ARGS[@]}")

# ------------------------------------------------------------------------------------ 4. CPU image
say "CPU image $IMAGE (docker/Dockerfile)"
timed "build CPU image" "$WORK/build-cpu.log" docker build -f docker/Dockerfile "${BUILD_ARGS[@]}" -t "$IMAGE" .
info "build context: $(grep -m1 -o 'Sending build context to Docker daemon *[0-9.]*[kMG]*B' "$WORK/build-cpu.log" | awk '{print $NF}' || echo '(BuildKit)')"
info "image size: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}') (base $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.2f GB", $1/1e9}'))"
user="$(docker run --rm "$IMAGE" id)"
info "docker run --rm $IMAGE id -> $user"
[[ "$user" == uid=0* ]] && die "the image runs as root"
# Nothing of tests/, benchmarks/, examples/, the build inputs or the source tree may be in the image: every
# regular file of the image (up to 50 MB) is hashed and compared with those files (empty ones carry nothing and
# would match every empty file of the image, so they are left out).
find tests benchmarks examples docker/local -type f ! -empty ! -name README.md ! -name .gitignore ! -name __init__.py \
  ! -path '*/__pycache__/*' -size -50M -exec sha256sum {} + 2>/dev/null | sort >"$WORK/forbidden.sha256"
docker run --rm "$IMAGE" sh -c 'find / -xdev -type f -size -50M -exec sha256sum {} + 2>/dev/null; exit 0' \
  | sort >"$WORK/image.sha256"
found="$(join <(cut -c1-64 "$WORK/forbidden.sha256" | sort -u) <(sort "$WORK/image.sha256") || true)"
found+="$(docker run --rm "$IMAGE" sh -c 'find / -xdev \( -name "torch-*.whl" -o -path /tmp/local -o -path /src \
  -o -path /app -o -name .git -o -name .venv -o -path "/opt/proponent/*test*" \) 2>/dev/null; exit 0')"
[ -z "$found" ] || { echo "$found" >&2; die "the image holds files it should not"; }
info "image: none of its $(wc -l <"$WORK/image.sha256") files (< 50 MB) equals one of the $(wc -l <"$WORK/forbidden.sha256") files of tests/, benchmarks/, examples/, docker/local/ (CA bundle); no torch wheel, /src, /tmp/local, .git"
leak="$(docker history --no-trunc "$IMAGE"; docker image inspect -f '{{json .Config.Env}}' "$IMAGE")"
if grep -q -i -E "tmp/local|ca-certificates|pip.conf|PIP_CERT|TORCH_SPEC" <<<"$leak"; then die "the image's history or env mentions build inputs"; fi
info "image history and env: no trace of docker/local, the CA bundle or build arguments"
info "files of the proponent package in the image: $(docker run --rm "$IMAGE" sh -c 'find /opt/proponent/proponent -name "*.py" | wc -l') .py"

# ------------------------------------------------------------------------------------ 5. index with the image's CLI
say "digits index in volume $P-data, built with the image's CLI"
docker rm -f "$P-server" >/dev/null 2>&1 || true
docker volume rm "$P-data" "$P-state" >/dev/null 2>&1 || true
docker volume create "$P-data" >/dev/null && docker volume create "$P-state" >/dev/null
CLI=(docker run --rm -v "$P-data:/data" -e "PROPONENT_THREADS=$THREADS" "$IMAGE")
timed "proponent train --data digits --epochs $SMOKE_EPOCHS" "$WORK/train.log" \
  "${CLI[@]}" proponent train --data digits --out /data/runs/digits --epochs "$SMOKE_EPOCHS" --quiet
info "$(tail -n 1 "$WORK/train.log")"
timed "proponent index" "$WORK/index.log" "${CLI[@]}" proponent index --run /data/runs/digits --out /data/idx/digits --quiet
info "$(tail -n 1 "$WORK/index.log")"

# ------------------------------------------------------------------------------------ 6. server + client
say "server container $P-server"
PORT="$(free_port)"
URL="http://127.0.0.1:$PORT"
docker run -d --name "$P-server" -p "127.0.0.1:$PORT:8000" -v "$P-data:/data:ro" -v "$P-state:/state" \
  -e "PROPONENT_THREADS=$THREADS" -e "PROPONENT_API_KEYS=$API_KEY" "$IMAGE" \
  proponent serve --index /data/idx/digits --host 0.0.0.0 --port 8000 --state-dir /state >/dev/null
t0=$SECONDS; wait_healthy "$P-server"; SUMMARY+=("$(printf '%-50s %5ss' "server start -> healthy" $((SECONDS - t0)))")
timed "client: health, uploads, sample, self-influence" "$WORK/client.log" py check "$URL" --api-key "$API_KEY"
sed 's/^/   | /' "$WORK/client.log"

# ------------------------------------------------------------------------------------ 7. SIGTERM mid-job, resume
say "SIGTERM mid-job: self-influence with m=$SMOKE_JOB_M, docker stop, docker start"
JOB="$(py start-job "$URL" --api-key "$API_KEY" --m "$SMOKE_JOB_M")"
out="$(py wait-progress "$URL" "$JOB" --api-key "$API_KEY" --fraction 0.2)" || die "$out"
read -r _ done_before total <<<"$out"
info "job $JOB at $done_before/$total chunks: docker stop (SIGTERM, grace 60s)"
t0=$SECONDS
docker stop -t 60 "$P-server" >/dev/null
rc="$(docker inspect -f '{{.State.ExitCode}}' "$P-server")"
info "stopped in $((SECONDS - t0))s, exit code $rc (137 would mean SIGKILL after the grace period)"
[ "$rc" = 0 ] || die "the server did not exit cleanly on SIGTERM (exit code $rc)"
docker logs "$P-server" >"$WORK/server-1.log" 2>&1
grep -E "Shutting down|shutdown|stopp|Finished server process" "$WORK/server-1.log" | sed 's/^/   | /' || true
persisted="$(docker run --rm -v "$P-state:/state:ro" "$IMAGE" python -c "
import json, sys; d = json.load(open('/state/jobs/$JOB/job.json')); print(d.get('state'), json.dumps(d.get('progress')))")"
info "state volume, jobs/$JOB/job.json: $persisted"
docker start "$P-server" >/dev/null
t0=$SECONDS; wait_healthy "$P-server"
out="$(py progress "$URL" "$JOB" --api-key "$API_KEY")" || die "$out"
read -r state done_after _ <<<"$out"
info "after restart: job $state at $done_after/$total chunks (was $done_before/$total before the stop)"
[ "$done_after" -ge "$done_before" ] || die "the job's progress was lost over the restart"
py finish "$URL" "$JOB" --api-key "$API_KEY" --csv "$WORK/resumed.csv" | sed 's/^/   /'
SUMMARY+=("$(printf '%-50s %5ss' "restart -> resumed job finished" $((SECONDS - t0)))")
docker logs "$P-server" 2>&1 | tail -n +"$(($(wc -l <"$WORK/server-1.log") + 1))" >"$WORK/server-2.log"
grep -i -E "resum|serving" "$WORK/server-2.log" | sed 's/^/   | /' || true
grep -q -i "resum" "$WORK/server-2.log" || die "no 'resuming' line in the restarted server's log"
timed "uninterrupted CLI run (same m, for comparison)" "$WORK/cli-self.log" sh -c \
  "docker run --rm -v '$P-data:/data:ro' -e PROPONENT_THREADS=$THREADS '$IMAGE' sh -c \
   'proponent self-influence --index /data/idx/digits --out /tmp/r.csv --m $SMOKE_JOB_M >&2 && cat /tmp/r.csv' >'$WORK/cli.csv'"
py compare-csv "$WORK/resumed.csv" "$WORK/cli.csv" | sed 's/^/   /'
t0=$SECONDS; docker stop -t 60 "$P-server" >/dev/null
info "final docker stop: $((SECONDS - t0))s, exit code $(docker inspect -f '{{.State.ExitCode}}' "$P-server")"
docker rm "$P-server" >/dev/null

# ------------------------------------------------------------------------------------ 8. compose
if [ "$SMOKE_COMPOSE" = 1 ]; then
  say "docker/compose.yaml"
  COMPOSE=""
  if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"
  elif command -v docker-compose >/dev/null; then COMPOSE="docker-compose"
  elif apt_install docker-compose; then COMPOSE="docker-compose"; fi
  if [ -z "$COMPOSE" ]; then
    "$SMOKE_PYTHON" -c 'import sys, yaml; d = yaml.safe_load(open("docker/compose.yaml")); print("   compose.yaml parses: services", sorted(d["services"]))' \
      || die "no compose available and compose.yaml does not parse"
    info "no docker compose / docker-compose installable: compose.yaml only parsed, not run"
  else
    info "$($COMPOSE version 2>/dev/null | head -n 1)"
    # The compose file bind-mounts a host index directory: export the one built above.
    docker create --name "$P-cp" -v "$P-data:/data" "$IMAGE" >/dev/null
    docker cp "$P-cp:/data/idx/digits" "$WORK/index" && docker rm "$P-cp" >/dev/null
    chmod -R a+rX "$WORK/index"   # the index writer creates 0600 files; the container user must read them
    CPORT="$(free_port)"
    export PROPONENT_INDEX_DIR="$WORK/index" PROPONENT_PORT="$CPORT" PROPONENT_IMAGE="$IMAGE" \
      PROPONENT_BASE_IMAGE="$BASE_IMAGE" PROPONENT_API_KEYS=""
    [ ${#TORCH_ARGS[@]} = 0 ] || export PROPONENT_TORCH_SPEC="${TORCH_ARGS[1]#TORCH_SPEC=}"
    C=($COMPOSE -f docker/compose.yaml -p "$P")
    timed "compose config" "$WORK/compose-config.log" "${C[@]}" --profile gpu config -q
    timed "compose build (cached layers)" "$WORK/compose-build.log" "${C[@]}" build proponent
    timed "compose up -d" "$WORK/compose-up.log" "${C[@]}" up -d proponent
    cid="$("${C[@]}" ps -q proponent)"
    t0=$SECONDS; wait_healthy "$cid"
    timed "client against the compose service" "$WORK/compose-client.log" py check "http://127.0.0.1:$CPORT"
    sed 's/^/   | /' "$WORK/compose-client.log" | grep -E "readyz|index:|stored|self-influence"
    t0=$SECONDS; "${C[@]}" stop >/dev/null 2>&1
    info "compose stop (SIGTERM): $((SECONDS - t0))s, exit code $(docker inspect -f '{{.State.ExitCode}}' "$cid")"
    [ "$(docker inspect -f '{{.State.ExitCode}}' "$cid")" = 0 ] || die "compose service did not exit cleanly"
    "${C[@]}" down -v >/dev/null 2>&1
  fi
fi

# ------------------------------------------------------------------------------------ 9. GPU image (built, not run)
if [ "$SMOKE_GPU" = 1 ]; then
  say "GPU image $GPU_IMAGE (docker/Dockerfile.gpu from $BASE_IMAGE, CPU torch; built, not run on a GPU)"
  timed "build GPU image" "$WORK/build-gpu.log" docker build -f docker/Dockerfile.gpu "${BUILD_ARGS[@]}" -t "$GPU_IMAGE" .
  info "image size: $(docker image inspect -f '{{.Size}}' "$GPU_IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
  docker run --rm "$GPU_IMAGE" sh -c 'id; proponent --help >/dev/null && echo "proponent CLI ok";
    python -c "import faiss; print(\"faiss\", faiss.__version__, \"GPU symbols:\", hasattr(faiss, \"StandardGpuResources\"))"
    pip list 2>/dev/null | grep -i -E "^(faiss|torch) "' | sed 's/^/   | /'
fi

say "docker smoke passed in $((SECONDS - T_START))s"
printf '   %s\n' "${SUMMARY[@]}"
