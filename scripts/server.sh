#!/usr/bin/env bash
# The team tracking server: `mlflow server` on a PostgreSQL database, with a proxied artifact store.
#
#   bash scripts/server.sh            # PostgreSQL up, database and user created, then mlflow server (foreground)
#   bash scripts/server.sh db         # only PostgreSQL, the database and the user; prints the store URI
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000   # then every entry point, tuner worker and promote use it
#
# Settings (environment): MLFLOW_HOST (127.0.0.1: loopback unless you say otherwise), MLFLOW_PORT (5000),
# CNN_PG_DB (mlflow), CNN_PG_USER (mlflow), CNN_PG_PASSWORD (mlflow), CNN_ARTIFACTS (./mlartifacts),
# CNN_PG_CREATEDB=1 lets the user create databases (the tests' throwaway ones),
# CNN_SERVER_AUTH=1 for MLflow's basic-auth app (also set MLFLOW_FLASK_SERVER_SECRET_KEY and
# MLFLOW_AUTH_CONFIG_PATH, an ini with admin_password; see docs/operations.md).
set -euo pipefail
cd "$(dirname "$0")/.."

db="${CNN_PG_DB:-mlflow}"
user="${CNN_PG_USER:-mlflow}"
password="${CNN_PG_PASSWORD:-mlflow}"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
as_postgres() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$1"; else sudo -u postgres sh -c "$1"; fi; }

# PostgreSQL up, the user and database made. Its chatter (apt, pg_ctlcluster's "Removed stale pid
# file.", psql) goes to stderr, so that `server.sh db` prints nothing but the store URI.
start_postgres() {
  if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "installing PostgreSQL (Debian's postgresql)" >&2
    as_root apt-get install -y -q postgresql >/dev/null
  fi
  version=$(ls /usr/lib/postgresql | sort -n | tail -1)
  if ! pg_lsclusters -h | grep -q "^$version main"; then
    as_root pg_createcluster "$version" main >/dev/null
  fi
  if ! pg_lsclusters -h | grep -q "^$version main .* online"; then
    as_root pg_ctlcluster "$version" main start
  fi
  for _ in $(seq 30); do as_postgres "pg_isready -q" && break; sleep 1; done

  # The user and database, once (rerunning is harmless).
  if ! as_postgres "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname = '$user'\"" | grep -q 1; then
    as_postgres "psql -q -c \"CREATE USER \\\"$user\\\" WITH PASSWORD '$password'\""
  fi
  if ! as_postgres "psql -tAc \"SELECT 1 FROM pg_database WHERE datname = '$db'\"" | grep -q 1; then
    as_postgres "psql -q -c \"CREATE DATABASE \\\"$db\\\" OWNER \\\"$user\\\"\""
  fi
  if [ "${CNN_PG_CREATEDB:-0}" = 1 ]; then  # the tests make a throwaway database each
    as_postgres "psql -q -c \"ALTER USER \\\"$user\\\" CREATEDB\""
  fi
}
start_postgres >&2

store="postgresql://$user:$password@127.0.0.1:5432/$db"
if [ "${1:-}" = db ]; then
  echo "$store"
  exit 0
fi

auth=()
[ "${CNN_SERVER_AUTH:-0}" = 1 ] && auth=(--app-name basic-auth)
# MLflow's job runner (a runner and 7 huey consumers, for its GenAI jobs) is of no use to image
# classification, and takes about half a core while idle on a 2-core machine and 2 GB of memory.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec mlflow server --backend-store-uri "$store" --artifacts-destination "${CNN_ARTIFACTS:-./mlartifacts}" \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" "${auth[@]}"
