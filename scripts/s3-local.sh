#!/usr/bin/env bash
# A local S3-compatible server for the remote-cache tests: moto's server mode
# (https://github.com/getmoto/moto), installed from PyPI into target/s3/venv.
#
#   scripts/s3-local.sh up      install if missing, start on 127.0.0.1, wait, create the bucket
#   scripts/s3-local.sh env     print the export lines for object_store / AWS clients
#   scripts/s3-local.sh down    stop it (its objects live in memory and are gone)
#   scripts/s3-local.sh status  say whether it runs (exit 1 if not)
#
#   eval "$(scripts/s3-local.sh env)"   # after `up`
#
# Settings (environment):
#   S3_LOCAL_PORT      port on 127.0.0.1 (default 9000, or a free port if 9000 is taken)
#   S3_LOCAL_BUCKET    bucket created by `up` (default fmnist-cache)
#   S3_LOCAL_ACCESS_KEY / S3_LOCAL_SECRET_KEY  credentials printed by `env`; moto accepts any
#   S3_LOCAL_MOTO_VERSION  moto version installed (default 5.2.5)
#   PYTHON             interpreter used to create the venv (default python3)
#
# Everything lives under target/s3/ (ignored by git): venv/, data/ (the server's
# spill directory for large objects), server.pid, server.port, server.log.
# All commands are idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
S3_DIR="$ROOT/target/s3"
VENV="$S3_DIR/venv"
DATA="$S3_DIR/data"
PID_FILE="$S3_DIR/server.pid"
PORT_FILE="$S3_DIR/server.port"
LOG_FILE="$S3_DIR/server.log"

BUCKET="${S3_LOCAL_BUCKET:-fmnist-cache}"
ACCESS_KEY="${S3_LOCAL_ACCESS_KEY:-fmnist-local}"
SECRET_KEY="${S3_LOCAL_SECRET_KEY:-fmnist-local-secret-do-not-print}"
MOTO_VERSION="${S3_LOCAL_MOTO_VERSION:-5.2.5}"
PYTHON="${PYTHON:-python3}"

log() { echo "s3-local: $*" >&2; }
die() { log "$*"; exit 1; }

running_pid() {
    # Prints the pid of our server if it is alive, else nothing.
    [[ -f "$PID_FILE" ]] || return 0
    local pid
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    local args
    if [[ -r "/proc/$pid/cmdline" ]]; then
        args="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
    else
        args="$(ps -p "$pid" -o args= 2>/dev/null || true)"
    fi
    # A recycled pid is not ours.
    if [[ "$args" == *moto_server* ]]; then echo "$pid"; fi
}

current_port() {
    if [[ -f "$PORT_FILE" ]]; then cat "$PORT_FILE"; else echo "${S3_LOCAL_PORT:-9000}"; fi
}

install() {
    if [[ -x "$VENV/bin/moto_server" ]] \
        && "$VENV/bin/python" -c "import moto, flask, flask_cors, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
        return 0
    fi
    log "installing moto $MOTO_VERSION into target/s3/venv (one-time, ~1 min)"
    mkdir -p "$S3_DIR"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV" \
        || die "could not create a venv with $PYTHON (on Debian: apt-get install python3-venv)"
    # moto[s3] + flask/flask-cors is what the server needs for S3; moto[server] would pull
    # every service's dependencies (~2x the size and install time).
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "moto[s3]==$MOTO_VERSION" flask flask-cors
}

pick_port() {
    if [[ -n "${S3_LOCAL_PORT:-}" ]]; then echo "$S3_LOCAL_PORT"; return; fi
    "$VENV/bin/python" - <<'EOF'
import socket
def free(p):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
if free(9000):
    print(9000)
else:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

# Waits until the server answers, then creates the bucket (an unsigned PUT: moto does
# not check signatures). 200 = created, 409 = already ours.
wait_and_create_bucket() {
    local port="$1" pid="$2"
    "$VENV/bin/python" - "$port" "$BUCKET" "$pid" <<'EOF'
import os, sys, time, urllib.request, urllib.error
port, bucket, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = f"http://127.0.0.1:{port}"
deadline = time.time() + 30
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("server exited during startup")
    try:
        urllib.request.urlopen(base + "/", timeout=1).read()
        break
    except (urllib.error.URLError, ConnectionError, OSError):
        if time.time() > deadline:
            sys.exit("server not ready after 30 s")
        time.sleep(0.1)
req = urllib.request.Request(f"{base}/{bucket}", method="PUT", data=b"")
try:
    urllib.request.urlopen(req, timeout=5).read()
except urllib.error.HTTPError as e:
    if e.code != 409:  # BucketAlreadyOwnedByYou / BucketAlreadyExists
        sys.exit(f"creating bucket {bucket}: HTTP {e.code}: {e.read()[:300]!r}")
EOF
}

cmd_up() {
    install
    mkdir -p "$DATA"
    local pid port
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
        port="$(current_port)"
        wait_and_create_bucket "$port" "$pid" || die "server (pid $pid) not healthy; see $LOG_FILE"
        log "already running on 127.0.0.1:$port (pid $pid), bucket $BUCKET"
        return 0
    fi
    rm -f "$PID_FILE" "$PORT_FILE"
    port="$(pick_port)"
    # TMPDIR: moto spools large objects to temporary files; keep them under target/s3/data.
    # setsid: own session, so it outlives the calling shell and a Ctrl-C there.
    local setsid=()
    if command -v setsid >/dev/null; then setsid=(setsid); fi
    TMPDIR="$DATA" ${setsid[@]+"${setsid[@]}"} "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" \
        >"$LOG_FILE" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PID_FILE"
    echo "$port" >"$PORT_FILE"
    if ! wait_and_create_bucket "$port" "$pid"; then
        tail -n 20 "$LOG_FILE" >&2 || true
        cmd_down
        die "failed to start on 127.0.0.1:$port"
    fi
    log "up on 127.0.0.1:$port (pid $pid), bucket $BUCKET; eval \"\$(scripts/s3-local.sh env)\""
}

cmd_down() {
    local pid
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        log "stopped (pid $pid)"
    fi
    rm -f "$PID_FILE" "$PORT_FILE"
    rm -rf "$DATA"
}

cmd_env() {
    local port
    port="$(current_port)"
    [[ -n "$(running_pid)" ]] || log "warning: server not running (scripts/s3-local.sh up)"
    cat <<EOF
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_ALLOW_HTTP=true
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_REGION=us-east-1
export S3_LOCAL_BUCKET=$BUCKET
EOF
}

cmd_status() {
    local pid
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
        echo "running on 127.0.0.1:$(current_port) (pid $pid)"
    else
        echo "not running"
        return 1
    fi
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    install) install ;;
    *) echo "usage: $0 up|down|env|status|install" >&2; exit 2 ;;
esac
