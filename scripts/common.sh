# Sourced by the measuring scripts (perf.sh, h2load.sh, callgrind.sh) after `cd` to the
# repository: `start_run NAME` makes $OUT (a fresh /tmp/clerk-NAME.XXXXXX for logs and
# reports) and kills every PID added to PIDS when the script exits; `wait_port PORT [SECONDS]`
# waits until something listens on 127.0.0.1:PORT (10 s by default) or exits.
# shellcheck shell=bash

BIN=target/release/clerk-grpc-auth
LG=target/release/examples/loadgen
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}

start_run() {
    OUT=$(mktemp -d "/tmp/clerk-$1.XXXXXX")
    trap cleanup EXIT
}

wait_port() {
    for _ in $(seq 1 $((${2:-10} * 10))); do
        if (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1 (logs in $OUT)" >&2
    exit 1
}
