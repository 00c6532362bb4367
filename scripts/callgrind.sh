#!/usr/bin/env bash
# Instructions per call in the server's user space, counted by valgrind (repeatable, unlike
# wall-clock figures on a shared VM): the server — `dev` for VerifyToken and Check, the load
# generator's bare tonic echo for echo — runs under `valgrind --tool=callgrind`; h2load
# (Debian's nghttp2-client) sends WARM calls, the counters are zeroed, N more calls are sent
# and counted (4 connections × 4 streams). Prints instructions per call and the profile's
# path, for `callgrind_annotate --inclusive=yes --tree=calling PROFILE`.
#
# Under valgrind SHA-256 runs its portable code (about 44 700 instructions per VerifyToken or
# Check call); the native build uses the CPU's SHA extensions.
#
#   scripts/callgrind.sh check          # TARGET = echo | verify | check; N=5000 WARM=2000
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${1:?usage: scripts/callgrind.sh echo|verify|check}
N=${N:-5000}
WARM=${WARM:-2000}
for tool in valgrind callgrind_control h2load; do
    command -v "$tool" >/dev/null || {
        echo "$tool is missing: apt-get install valgrind nghttp2-client" >&2
        exit 1
    }
done
cargo build --release --quiet --bin clerk-grpc-auth --example loadgen
# shellcheck source=scripts/common.sh
. scripts/common.sh
start_run callgrind

grind=(valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" --dump-instr=no)
if [ "$TARGET" = echo ]; then
    # The echo's token still comes from the emulator.
    "$BIN" dev >"$OUT/dev.log" 2>&1 &
    PIDS+=($!)
    "${grind[@]}" "$LG" serve-echo >"$OUT/server.log" 2>&1 &
    SERVER=$!
    PORT=50070
else
    "${grind[@]}" "$BIN" dev >"$OUT/server.log" 2>&1 &
    SERVER=$!
    PORT=50051
fi
PIDS+=($SERVER)
wait_port 8787 120
wait_port "$PORT" 120
path=$("$LG" body --target "$TARGET" --out "$OUT/body.bin" 2>/dev/null)
URL="http://127.0.0.1:$PORT$path"
h2() { # h2 CALLS REPORT
    h2load -n "$1" -c 4 -m 4 -t 1 -d "$OUT/body.bin" -H 'content-type: application/grpc' \
        -H 'te: trailers' "$URL" >"$2" 2>&1
    grep -q ', 0 failed, 0 errored' "$2" || {
        echo "failed requests (see $2)" >&2
        exit 1
    }
}
# Under valgrind the keys load slowly: count only once a call is answered OK.
grpc_status() {
    curl -s --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
        --data-binary "@$OUT/body.bin" -D - -o /dev/null "$URL" | tr -d '\r' |
        sed -n 's/^grpc-status: //p'
}
for _ in $(seq 1 120); do
    [ "$(grpc_status)" = 0 ] && break
    sleep 0.5
done
[ "$(grpc_status)" = 0 ] || {
    echo "$TARGET is not answered OK (logs in $OUT)" >&2
    exit 1
}
h2 "$WARM" "$OUT/warm.txt"
callgrind_control -z "$SERVER" >/dev/null
h2 "$N" "$OUT/run.txt"
callgrind_control -d "$SERVER" >/dev/null
PROFILE=$(ls "$OUT"/callgrind.out.*1 | head -1)
total=$(callgrind_annotate "$PROFILE" | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
echo "$TARGET: $((total / N)) instructions per call ($N calls after $WARM)"
echo "profile: $PROFILE"
