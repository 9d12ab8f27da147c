#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests that run sweep workers against a real database.
#
#   .ci/postgres.sh COMMAND [ARGS...]
#
# makes a cluster in a temporary folder (initdb, password authentication), starts it on a free loopback port,
# creates a database, runs COMMAND with MNISTLAB_TEST_POSTGRES set to its URL, then stops the server and removes
# the folder, however COMMAND ends; the exit status is COMMAND's. Needs PostgreSQL's server programs (Debian:
# apt-get install postgresql). As root it runs the server as the `postgres` user: the server refuses root.
set -euo pipefail

bindir=""
for candidate in /usr/lib/postgresql/*/bin; do
    [ -x "$candidate/initdb" ] && bindir="$candidate"  # Debian installs one version here, normally
done
if [ -z "$bindir" ] && command -v initdb >/dev/null; then
    bindir="$(dirname "$(command -v initdb)")"
fi
if [ -z "$bindir" ]; then
    echo "postgres.sh: no initdb found; install PostgreSQL's server (Debian: apt-get install postgresql)" >&2
    exit 1
fi

tmp="$(mktemp -d)"
as_server=()
if [ "$(id -u)" = 0 ]; then
    chown postgres: "$tmp"
    as_server=(runuser -u postgres --)
fi
cleanup() {
    "${as_server[@]}" "$bindir/pg_ctl" -D "$tmp/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
printf '%s\n' "$password" >"$tmp/password"
chmod 644 "$tmp/password"
"${as_server[@]}" "$bindir/initdb" -D "$tmp/data" -U sweeper --pwfile="$tmp/password" --auth=scram-sha-256 \
    -E UTF8 --no-instructions >"$tmp/initdb.log" 2>&1 || { cat "$tmp/initdb.log" >&2; exit 1; }
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"${as_server[@]}" "$bindir/pg_ctl" -D "$tmp/data" -l "$tmp/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $tmp" start >/dev/null || { cat "$tmp/server.log" >&2; exit 1; }
PGPASSWORD="$password" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U sweeper sweeps
echo "postgres.sh: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (removed afterwards)" >&2

export MNISTLAB_TEST_POSTGRES="postgresql://sweeper:$password@127.0.0.1:$port/sweeps"
"$@"
