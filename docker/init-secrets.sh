#!/usr/bin/env bash
# Create what a deployment needs and must never commit or bake into an image,
# next to docker/compose.yaml (or in the folder given):
#
#   .env                      MAAS_REDIS_PASSWORD, MAAS_FLOWER_BASIC_AUTH, MAAS_UID/GID
#   secrets/redis-password    the Redis ACL user's password (random, 256 bits)
#   secrets/redis-users.acl   Redis ACL file: `default` off, user `maas` (SHA-256 of the password)
#   secrets/tls/              a private CA, the Redis server certificate and a client
#                             certificate (for docker/compose.tls.yaml, or any rediss:// setup)
#   secrets/keyring/          empty: `maas-worker keys init` goes here (workers read it)
#   secrets/clients/          one-tenant keyrings for producers (`maas-worker keys export`)
#   secrets/model-keys/       empty: model-keys.json for encrypted models, if any
#   data/redis/  models/  signers/
#
# Existing files are kept, so running it again is safe. Everything is created
# mode 0600/0700 and owned by you; the containers run as your uid (MAAS_UID)
# so they can read it. Needs bash and openssl. Usage:
#   docker/init-secrets.sh [DIR]          (DIR defaults to this script's folder)
# MAAS_TLS_SERVER_NAMES (default DNS:redis,DNS:localhost,IP:127.0.0.1) names
# the Redis server in its certificate; MAAS_TLS_DAYS (default 825) its lifetime.
set -euo pipefail
umask 077

here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here}
names=${MAAS_TLS_SERVER_NAMES:-DNS:redis,DNS:localhost,IP:127.0.0.1}
days=${MAAS_TLS_DAYS:-825}
command -v openssl >/dev/null 2>&1 || { echo "init-secrets: openssl is required" >&2; exit 1; }

secrets=$dir/secrets
tls=$secrets/tls
mkdir -p "$secrets/keyring" "$secrets/clients" "$secrets/model-keys" "$tls" "$dir/data/redis" \
    "$dir/models" "$dir/signers"

random_hex() { openssl rand -hex 32; }

# -- Redis ACL: one user for every maas-worker process; the default user is off.
[ -s "$secrets/redis-password" ] || random_hex > "$secrets/redis-password"
password=$(cat "$secrets/redis-password")
if [ ! -s "$secrets/redis-users.acl" ]; then
    digest=$(printf '%s' "$password" | openssl dgst -sha256 -r | cut -d' ' -f1)
    # All keys and channels; no administrative or dangerous commands (KEYS,
    # FLUSHALL, CONFIG, DEBUG, SHUTDOWN, ACL, MONITOR, ...).
    printf 'user default off\nuser maas on #%s ~* &* +@all -@admin -@dangerous\n' \
        "$digest" > "$secrets/redis-users.acl"
fi

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
    # Never run the services as root: use the image's user and hand the files to it.
    uid=10001
    gid=10001
    echo "init-secrets: running as root; then run:" \
        "chown -R 10001:10001 $secrets $dir/data $dir/models $dir/signers" >&2
fi
if [ ! -s "$dir/.env" ]; then
    {
        echo "# Written by init-secrets.sh. Secrets: never commit this file."
        echo "MAAS_REDIS_PASSWORD=$password"
        echo "MAAS_FLOWER_BASIC_AUTH=ops:$(random_hex)"
        echo "MAAS_UID=$uid"
        echo "MAAS_GID=$gid"
    } > "$dir/.env"
fi

cat <<EOF
Created in $dir (existing files were kept). Next, from the folder of compose.yaml:
  docker compose build
  docker compose --profile tools run --rm cli maas-worker keys init --tenant acme
  docker compose --profile tools run --rm cli maas-worker keys export --tenant acme \\
      --out /run/maas/clients/acme/keyring.json
  docker compose up --detach --scale worker=2
  docker compose --profile example run --rm producer
EOF
