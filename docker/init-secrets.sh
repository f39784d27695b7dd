#!/usr/bin/env bash
# Create what a deployment needs and must never commit or bake into an image,
# next to docker/compose.yaml (or in the folder given):
#
#   .env                      MAAS_REDIS_PASSWORD_<ROLE> (one per Redis role, below),
#                             MAAS_FLOWER_BASIC_AUTH, MAAS_GRAFANA_ADMIN_PASSWORD, MAAS_UID/GID
#   secrets/redis-passwords/  one password file per Redis role (random, 256 bits):
#                             operator worker beat monitor flower gateway producer-<example tenant>
#   secrets/redis-acl/        users.acl: only `default` off until `maas-worker acl` writes
#                             every role's user into it (after `keys init`)
#   secrets/tls/              a private CA, the Redis server certificate and a client
#                             certificate (for docker/compose.tls.yaml, or any rediss:// setup)
#   secrets/keyring/          empty: `maas-worker keys init` goes here (workers read it)
#   secrets/clients/          one-tenant keyrings for producers (`maas-worker keys export`)
#   secrets/gateway-keyring/  empty: the gateway's MAC-only keyring (`keys export --mac-only`)
#   secrets/model-keys/       empty: model-keys.json for encrypted models, if any
#   data/redis/ data/prometheus/ data/grafana/  models/  signers/
#
# Existing files are kept (a .env without the role passwords gets them appended),
# so running it again is safe. Everything is created
# mode 0600/0700 and owned by you; the containers run as your uid (MAAS_UID)
# so they can read it. Needs bash and openssl. Usage:
#   docker/init-secrets.sh [DIR]          (DIR defaults to this script's folder)
# MAAS_TLS_SERVER_NAMES (default DNS:redis,DNS:localhost,IP:127.0.0.1) names
# the Redis server in its certificate; MAAS_TLS_DAYS (default 825) its lifetime;
# MAAS_EXAMPLE_TENANT (default acme) the tenant of the example producer.
set -euo pipefail
umask 077

here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here}
names=${MAAS_TLS_SERVER_NAMES:-DNS:redis,DNS:localhost,IP:127.0.0.1}
example_tenant=${MAAS_EXAMPLE_TENANT:-acme}
days=${MAAS_TLS_DAYS:-825}
command -v openssl >/dev/null 2>&1 || { echo "init-secrets: openssl is required" >&2; exit 1; }

secrets=$dir/secrets
tls=$secrets/tls
mkdir -p "$secrets/keyring" "$secrets/clients" "$secrets/gateway-keyring" "$secrets/model-keys" "$tls" "$dir/data/redis" \
    "$dir/data/prometheus" "$dir/data/grafana" \
    "$dir/models" "$dir/signers" "$secrets/redis-passwords" "$secrets/redis-acl"

random_hex() { openssl rand -hex 32; }

# -- Redis: one ACL user per role, each with a password of its own. Only the
# passwords are made here; `maas-worker acl` (run in the cli service after
# `keys init`) keeps them and writes every role's user, with its least
# privilege, into redis-acl/users.acl (docs/operations.md, Redis roles).
# Until then the file only turns the default user off: nobody can connect.
roles="operator worker beat monitor flower gateway producer-$example_tenant"
for role in $roles; do
    [ -s "$secrets/redis-passwords/$role" ] || random_hex > "$secrets/redis-passwords/$role"
done
# (Off, yet with every permission: the server replays the append-only file's
# transactions as `default`; maas_worker/tenancy/acl.py, DEFAULT_USER.)
[ -s "$secrets/redis-acl/users.acl" ] || echo "user default reset off ~* &* +@all" \
    > "$secrets/redis-acl/users.acl"

# -- TLS: a private CA, the server's certificate, one client certificate.
cnf=$(mktemp)
ext=$(mktemp)
trap 'rm -f "$cnf" "$ext"' EXIT
# A config of our own: the system's openssl.cnf may add or duplicate extensions.
printf '%s\n' "[req]" "distinguished_name=dn" "x509_extensions=ca" "prompt=no" \
    "[dn]" "CN=maas-worker Redis CA" \
    "[ca]" "basicConstraints=critical,CA:TRUE" "keyUsage=critical,keyCertSign,cRLSign" \
    "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid:always" > "$cnf"
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }
if [ ! -s "$tls/ca.crt" ]; then
    new_key "$tls/ca.key"
    openssl req -x509 -new -key "$tls/ca.key" -sha256 -days "$days" -config "$cnf" \
        -out "$tls/ca.crt"
fi
issue() {  # issue NAME CN EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
    local name=$1 cn=$2 eku=$3 san=${4:-}
    [ -s "$tls/$name.crt" ] && return 0
    new_key "$tls/$name.key"
    openssl req -new -key "$tls/$name.key" -subj "/CN=$cn" -config "$cnf" -out "$tls/$name.csr"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=$eku"
        echo "subjectKeyIdentifier=hash"
        echo "authorityKeyIdentifier=keyid,issuer"
        [ -z "$san" ] || echo "subjectAltName=$san"
    } > "$ext"
    openssl x509 -req -in "$tls/$name.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 -extfile "$ext" \
        -out "$tls/$name.crt" 2>/dev/null  # "Certificate request self-signature ok"
    rm -f "$tls/$name.csr"
}
issue redis redis serverAuth "$names"
issue client maas-worker clientAuth

# -- Models: start with the signed models bundled in the package, if this is a checkout.
bundled=$here/../maas_worker/models/bundled
if [ -d "$bundled" ] && [ -z "$(ls -A "$dir/models")" ]; then
    cp -R "$bundled"/. "$dir/models/"
fi

# -- .env for docker compose (it reads .env next to compose.yaml).
uid=$(id -u)
gid=$(id -g)
if [ "$uid" = 0 ]; then
    # Never run the services as root: use the image's user and hand the files to
    # it (the keyring folder must be its own: `keys init` writes a lock file there).
    uid=10001
    gid=10001
    chown -R "$uid:$gid" "$secrets" "$dir/data" "$dir/models" "$dir/signers"
    echo "init-secrets: running as root: the containers run as $uid:$gid, which now" \
        "owns secrets/, data/, models/ and signers/" >&2
fi
if [ ! -s "$dir/.env" ]; then
    {
        echo "# Written by init-secrets.sh. Secrets: never commit this file."
        echo "MAAS_FLOWER_BASIC_AUTH=ops:$(random_hex)"
        echo "MAAS_UID=$uid"
        echo "MAAS_GID=$gid"
    } > "$dir/.env"
fi
# Grafana's admin password (the `grafana` service), added to an existing .env too.
grep -q "^MAAS_GRAFANA_ADMIN_PASSWORD=" "$dir/.env" \
    || echo "MAAS_GRAFANA_ADMIN_PASSWORD=$(random_hex)" >> "$dir/.env"
# Each role's password for compose (MAAS_REDIS_PASSWORD_WORKER, ..._PRODUCER for
# the example producer), added to an existing .env when missing.
for role in $roles; do
    case $role in producer-*) name=PRODUCER ;; *) name=$(echo "$role" | tr '[:lower:]' '[:upper:]') ;; esac
    grep -q "^MAAS_REDIS_PASSWORD_$name=" "$dir/.env" \
        || echo "MAAS_REDIS_PASSWORD_$name=$(cat "$secrets/redis-passwords/$role")" >> "$dir/.env"
done

cat <<EOF
Created in $dir (existing files were kept). Next, from the folder of compose.yaml:
  docker compose build
  docker compose --profile tools run --rm --no-deps cli maas-worker keys init --tenant $example_tenant
  docker compose --profile tools run --rm --no-deps cli maas-worker keys export \\
      --tenant $example_tenant --out /run/maas/clients/$example_tenant/keyring.json
  docker compose --profile tools run --rm --no-deps cli maas-worker keys export --mac-only \\
      --out /run/maas/gateway-keyring/keyring.json
  docker compose --profile tools run --rm --no-deps cli maas-worker acl \\
      --acl-file /run/maas/redis-acl/users.acl --passwords /run/maas/redis-passwords
  docker compose up --detach --scale worker=2
  docker compose --profile example run --rm producer
EOF
