#!/usr/bin/env bash
# A second, independent load generator for the AuthService's own RPCs: h2load (Debian's
# nghttp2-client) posts one gRPC body over and over — the echo ceiling, VerifyToken with a
# repeated token (verdict cache on) and Envoy's Check — in alternating rounds, and prints the
# median throughput of each with its ratio to the echo's, and the server's CPU time per call
# (/proc/PID/stat; steadier than throughput when the host drifts). The bodies (5-byte gRPC prefix +
# protobuf message, a token minted by the emulator) come from `loadgen body`.
#
# Everything runs on 127.0.0.1: `dev` (50051/8787/8081/9090) and the echo server (50070).
# h2load reports throughput and mean latency, not percentiles: scripts/perf.sh has those.
#
#   scripts/h2load.sh        # DUR=5 WARM=1 ROUNDS=3 CONNECTIONS=16 STREAMS=16 by default
set -euo pipefail
cd "$(dirname "$0")/.."

DUR=${DUR:-5}
WARM=${WARM:-1}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-16}
STREAMS=${STREAMS:-16}

command -v h2load >/dev/null || {
    echo "h2load is missing: apt-get install nghttp2-client" >&2
    exit 1
}
cargo build --release --quiet --bin clerk-grpc-auth --example loadgen
# shellcheck source=scripts/common.sh
. scripts/common.sh
start_run h2load

"$BIN" dev >"$OUT/dev.log" 2>&1 &
DEV_PID=$!
PIDS+=($DEV_PID)
"$LG" serve-echo >"$OUT/echo.log" 2>&1 &
ECHO_PID=$!
PIDS+=($ECHO_PID)
wait_port 50051
wait_port 50070
wait_port 8787

declare -A URL
for t in echo verify check; do
    port=50051
    [ "$t" = echo ] && port=50070
    path=$("$LG" body --target "$t" --out "$OUT/$t.bin" 2>/dev/null)
    URL[$t]="http://127.0.0.1:$port$path"
    # The body must be answered OK (h2load sees only the HTTP status, never grpc-status).
    status=$(curl -s --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
        --data-binary "@$OUT/$t.bin" -D - -o /dev/null "${URL[$t]}" | tr -d '\r' |
        sed -n 's/^grpc-status: //p')
    if [ "$status" != 0 ]; then
        echo "$t: grpc-status ${status:-none} for ${URL[$t]} (logs in $OUT)" >&2
        exit 1
    fi
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, clock ticks

run() { # run TARGET ROUND: one h2load run; its report to $OUT/TARGET-ROUND.txt, the server's
    # CPU time during it (ticks) to $OUT/TARGET-ROUND.cpu
    echo "== $1, round $2" >&2
    local pid=$DEV_PID before
    [ "$1" = echo ] && pid=$ECHO_PID
    before=$(cpu_ticks "$pid")
    h2load -D "$DUR" --warm-up-time="$WARM" -c "$CONNECTIONS" -m "$STREAMS" -t 1 \
        -d "$OUT/$1.bin" -H 'content-type: application/grpc' -H 'te: trailers' "${URL[$1]}" \
        >"$OUT/$1-$2.txt" 2>&1
    grep -q ', 0 failed, 0 errored, 0 timeout' "$OUT/$1-$2.txt" || {
        echo "$1: failed requests (see $OUT/$1-$2.txt)" >&2
        exit 1
    }
    echo $(($(cpu_ticks "$pid") - before)) >"$OUT/$1-$2.cpu"
}
for r in $(seq 1 "$ROUNDS"); do
    for t in echo verify check; do run "$t" "$r"; done
done

python3 - "$OUT" "$ROUNDS" "$(getconf CLK_TCK)" "$DUR" "$WARM" <<'EOF'
import re, statistics, sys
out, rounds, tick = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seconds = float(sys.argv[4]) + float(sys.argv[5])
def read(t, r):
    text = open(f"{out}/{t}-{r}.txt").read()
    rps = float(re.search(r"finished in [0-9.]+s, ([0-9.]+) req/s", text).group(1))
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", text).group(1)
    # Server CPU per call, µs: the CPU time covers the warm-up too, whose calls h2load does
    # not count, so the calls are the measured rate over the whole run.
    cpu = int(open(f"{out}/{t}-{r}.cpu").read()) / tick * 1e6 / (rps * seconds)
    return rps, mean, cpu
med = lambda t, i=0: statistics.median(read(t, r)[i] for r in range(1, rounds + 1))
echo, echo_cpu = med("echo"), med("echo", 2)
print()
print(f"| h2load, {rounds}-round median | calls/s | mean latency (round 1) | ratio | server CPU per call | echo's CPU / its |")
print("|---|---:|---:|---|---:|---:|")
for t, label, goal in [("echo", "bare tonic echo (the ceiling)", ""),
                       ("verify", "`VerifyToken`, repeated token (verdict cache on)", " (goal ≥ 0.85)"),
                       ("check", "Envoy `Check`, repeated token", " (goal ≥ 0.80)")]:
    print(f"| {label} | {med(t):,.0f} | {read(t, 1)[1]} | {med(t)/echo:.2f}× echo{goal} | {med(t, 2):.1f} µs | {echo_cpu/med(t, 2):.2f} |")
print(f"\nraw reports: {out}")
EOF
