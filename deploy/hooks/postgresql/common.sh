# Shared by promote, demote and rejoin (sourced, POSIX sh).
#
# Settings come from $FAILOVERD_PG_ENV_DIR/$FAILOVERD_GROUP.env (default
# directory /etc/failoverd/postgresql), a shell fragment:
#   PGBIN=/usr/lib/postgresql/15/bin      PGDATA=/var/lib/postgresql/15/main
#   PGHOST=/var/run/postgresql            PGPORT=5432      PGUSER=postgres
#   RUN_AS="sudo -n -u postgres"          # how to run pg_ctl as the data owner
#   CONNINFO_east="host=10.1.0.5 port=5432 user=replicator"  # each region's server
#   STATE_DIR=/var/lib/failoverd/postgresql   TIMEOUT_S=60
# The daemon gives FAILOVERD_GROUP, FAILOVERD_REGION, FAILOVERD_EPOCH,
# FAILOVERD_ROLE (and FAILOVERD_ACTIVE_REGION to rejoin).
set -eu

: "${FAILOVERD_GROUP:?}" "${FAILOVERD_EPOCH:?}"
ENV_FILE="${FAILOVERD_PG_ENV_DIR:-/etc/failoverd/postgresql}/$FAILOVERD_GROUP.env"
[ -r "$ENV_FILE" ] || { echo "cannot read $ENV_FILE" >&2; exit 2; }
. "$ENV_FILE"
: "${PGBIN:?set PGBIN in $ENV_FILE}" "${PGDATA:?set PGDATA in $ENV_FILE}"
PGHOST="${PGHOST:-/var/run/postgresql}"
PGPORT="${PGPORT:-5432}"
PGUSER="${PGUSER:-postgres}"
RUN_AS="${RUN_AS:-}"
STATE_DIR="${STATE_DIR:-/var/lib/failoverd/postgresql}"
TIMEOUT_S="${TIMEOUT_S:-60}"
export PGHOST PGPORT PGUSER

log() { echo "$(basename "$0") $FAILOVERD_GROUP epoch $FAILOVERD_EPOCH: $*"; }

# Each hook refuses an epoch older than one already applied here (a stale
# coordinator's late word); the same epoch again is fine (idempotent).
epoch_file="$STATE_DIR/$FAILOVERD_GROUP.epoch"
check_epoch() {
    mkdir -p "$STATE_DIR"
    if [ -f "$epoch_file" ] && [ "$FAILOVERD_EPOCH" -lt "$(cat "$epoch_file")" ]; then
        log "refused: epoch $(cat "$epoch_file") was already applied here" >&2
        exit 3
    fi
}
record_epoch() {
    if [ ! -f "$epoch_file" ] || [ "$FAILOVERD_EPOCH" -gt "$(cat "$epoch_file")" ]; then
        echo "$FAILOVERD_EPOCH" > "$epoch_file.tmp" && mv "$epoch_file.tmp" "$epoch_file"
    fi
}

pg_ctl() { $RUN_AS "$PGBIN/pg_ctl" -D "$PGDATA" "$@"; }
running() { pg_ctl status >/dev/null 2>&1; }
sql() { "$PGBIN/psql" -XtAq -d postgres -c "$1"; }
in_recovery() { [ "$(sql 'SELECT pg_is_in_recovery()')" = t ]; }
controldata() { $RUN_AS "$PGBIN/pg_controldata" "$PGDATA" | sed -n "s/^$1: *//p"; }
start() { pg_ctl -l "$PGDATA/failoverd-start.log" -w -t "$TIMEOUT_S" start >/dev/null; }

# Wait (bounded) until a query answers "t".
wait_for() {
    i=0
    while [ "$(sql "$1" 2>/dev/null || true)" != t ]; do
        i=$((i + 1))
        [ "$i" -le $((TIMEOUT_S * 20)) ] || { log "timed out waiting for: $1" >&2; exit 1; }
        sleep 0.05
    done
}
