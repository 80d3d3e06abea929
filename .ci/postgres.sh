#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the job-store tests and print its URL.
# Uses Debian's postgresql package (installed when missing). Data lives in a temp dir.
set -euo pipefail
PORT="${RETORT_PG_PORT:-55432}"
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
fi
BIN="$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")"
DATA="$(mktemp -d /tmp/retort-pg.XXXXXX)"
chown postgres:postgres "$DATA"
runuser -u postgres -- "$BIN/initdb" -D "$DATA" --auth=trust -U postgres >/dev/null
runuser -u postgres -- "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w \
  -o "-p $PORT -k $DATA -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
runuser -u postgres -- "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres retort_test
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/retort_test"
