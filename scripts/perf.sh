#!/usr/bin/env bash
# Reproduces the README's performance table on this machine (about 6 minutes):
#   openssl speed rsa2048 and the in-process verifier
#   (cargo bench -p clerk-grpc-auth-bench --bench verify_ratio);
#   a bare tonic echo server (the ceiling), VerifyToken with repeated tokens (verdict cache on)
#   and with the cache off, measured in alternating rounds (median of ROUNDS);
#   Check (alternating rounds too), VerifyToken with fresh tokens, the Orders example through
#   the in-process layer; the verdict-cache entry size (--bench verdict_memory);
#   p99 at half of each maximum (open loop); a 10 000-token random-kid flood.
# Everything runs on 127.0.0.1: two `dev` instances (cache on: 50051/8787/8081/9090; cache off:
# 50052/8788/8082/9092), the echo server (50070) and the in_process example (50061).
#
#   scripts/perf.sh                 # DUR=5 WARM=1 ROUNDS=3 CONCURRENCY=64 by default
set -euo pipefail
cd "$(dirname "$0")/.."

DUR=${DUR:-5}
WARM=${WARM:-1}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-64}
FRESH_POOL=${FRESH_POOL:-60000}

cargo build --release --quiet --bin clerk-grpc-auth --example loadgen --example in_process
# shellcheck source=scripts/common.sh
. scripts/common.sh
start_run perf

"$BIN" dev >"$OUT/dev-cache.log" 2>&1 &
PIDS+=($!)
"$BIN" dev --listen 127.0.0.1:50052 --emulator-listen 127.0.0.1:8788 \
    --http-listen 127.0.0.1:8082 --metrics-listen 127.0.0.1:9092 --verdict-cache-capacity 0 >"$OUT/dev-nocache.log" 2>&1 &
PIDS+=($!)
"$LG" serve-echo >"$OUT/echo.log" 2>&1 &
ECHO_PID=$!
PIDS+=($ECHO_PID)
wait_port 50051
wait_port 50052
wait_port 50070
wait_port 8787
CLERK_JWKS_URL=http://127.0.0.1:8787/.well-known/jwks.json \
    target/release/examples/in_process --listen 127.0.0.1:50061 >"$OUT/in_process.log" 2>&1 &
PIDS+=($!)
wait_port 50061

# The CPU time the hypervisor gave other guests instead of this VM ("steal", /proc/stat), in
# clock ticks summed over the CPUs: it tells a tail the host caused from one it did not.
steal() { awk '/^cpu /{print $9}' /proc/stat; }

# [RUN_DUR=… RUN_WARM=…] lg NAME ARGS…: one loadgen run; its JSON report goes to $OUT/NAME.json
# and the steal time during it (ms, whole run) to $OUT/NAME.steal.
lg() {
    local name=$1 before
    shift
    echo "== $name: $*" >&2
    before=$(steal)
    "$LG" run --json --duration "${RUN_DUR:-$DUR}" --warmup "${RUN_WARM:-$WARM}" \
        --sample-every 3600 "$@" \
        2>>"$OUT/loadgen.log" | tee -a "$OUT/runs.txt" | tail -1 >"$OUT/$name.json"
    echo $((($(steal) - before) * 1000 / $(getconf CLK_TCK))) >"$OUT/$name.steal"
}

ECHO_ARGS=(--target echo --pid "$ECHO_PID")
NOCACHE_ARGS=(--addr http://127.0.0.1:50052 --emulator http://127.0.0.1:8788
    --metrics http://127.0.0.1:9092/metrics)
for r in $(seq 1 "$ROUNDS"); do
    lg "echo-$r" "${ECHO_ARGS[@]}" --concurrency "$CONCURRENCY"
    lg "repeated-$r" --concurrency "$CONCURRENCY"
    lg "nocache-$r" "${NOCACHE_ARGS[@]}" --concurrency "$CONCURRENCY"
    lg "check-$r" --target check --concurrency "$CONCURRENCY"
done

median() { # median NAME-PREFIX: the median throughput of the rounds
    python3 - "$OUT" "$1" "$ROUNDS" <<'EOF'
import json, statistics, sys
out, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
print(int(statistics.median(json.load(open(f"{out}/{name}-{r}.json"))["throughput"] for r in range(1, rounds + 1))))
EOF
}
HALF_ECHO=$(($(median echo) / 2))
HALF_REPEATED=$(($(median repeated) / 2))
HALF_NOCACHE=$(($(median nocache) / 2))
for r in $(seq 1 "$ROUNDS"); do
    lg "echo_half-$r" "${ECHO_ARGS[@]}" --rate "$HALF_ECHO"
    lg "repeated_half-$r" --rate "$HALF_REPEATED"
    lg "nocache_half-$r" "${NOCACHE_ARGS[@]}" --rate "$HALF_NOCACHE"
done
RUN_WARM=0.5 RUN_DUR=60 lg fresh --tokens fresh --pool "$FRESH_POOL" --concurrency "$CONCURRENCY"
lg orders --target orders --concurrency "$CONCURRENCY" --metrics none
RUN_WARM=0 RUN_DUR=3 lg flood --tokens random-kid --pool 10000 --concurrency "$CONCURRENCY"

echo "== cargo bench -p clerk-grpc-auth-bench --bench verify_ratio" >&2
cargo bench --quiet -p clerk-grpc-auth-bench --bench verify_ratio 2>/dev/null | tee "$OUT/verify_ratio.txt" >&2
echo "== cargo bench -p clerk-grpc-auth-bench --bench verdict_memory" >&2
cargo bench --quiet -p clerk-grpc-auth-bench --bench verdict_memory 2>/dev/null | tee "$OUT/verdict_memory.txt" >&2

python3 - "$OUT" "$ROUNDS" <<'EOF'
import json, re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
load = lambda n: json.load(open(f"{out}/{n}.json"))
def med(name, key):
    return statistics.median(load(f"{name}-{r}")[key] for r in range(1, rounds + 1))
bench = open(f"{out}/verify_ratio.txt").read()
grab = lambda label: float(re.search(label + r"\s+([0-9.]+)", bench).group(1))
openssl, core = grab(r"openssl speed rsa2048 verify/s"), grab(r"verifier core verify/s")
echo = med("echo", "throughput")
print()
print(f"| measure | calls/s | p50 µs | p99 µs | ratio |")
print(f"|---|---:|---:|---:|---|")
print(f"| `openssl speed rsa2048` verify (one core) | {openssl:,.0f} | | | |")
print(f"| in-process verifier core, distinct tokens (one core) | {core:,.0f} | | | {core/openssl:.2f}× openssl (goal ≥ 0.90) |")
print(f"| bare tonic echo (ceiling), {rounds}-round median | {echo:,.0f} | {med('echo','p50_us'):.0f} | {med('echo','p99_us'):.0f} | 1.00 |")
rep, off = med("repeated", "throughput"), med("nocache", "throughput")
print(f"| VerifyToken, repeated tokens (verdict cache on) | {rep:,.0f} | {med('repeated','p50_us'):.0f} | {med('repeated','p99_us'):.0f} | {rep/echo:.2f}× echo (goal ≥ 0.85) |")
print(f"| VerifyToken, verdict cache off | {off:,.0f} | {med('nocache','p50_us'):.0f} | {med('nocache','p99_us'):.0f} | {off/echo:.2f}× echo (goal ≥ 0.55) |")
f = load("fresh")
print(f"| VerifyToken, fresh tokens (cache on, every call a miss) | {f['throughput']:,.0f} | {f['p50_us']} | {f['p99_us']} | {f['throughput']/echo:.2f}× echo |")
chk = med("check", "throughput")
print(f"| Envoy `Check`, repeated tokens, {rounds}-round median | {chk:,.0f} | {med('check','p50_us'):.0f} | {med('check','p99_us'):.0f} | {chk/echo:.2f}× echo (goal ≥ 0.80) |")
o = load("orders")
print(f"| Orders example through the in-process layer, repeated tokens | {o['throughput']:,.0f} | {o['p50_us']} | {o['p99_us']} | {o['throughput']/echo:.2f}× echo |")
for name, label in [("echo_half", "echo"), ("repeated_half", "VerifyToken, cache on"), ("nocache_half", "VerifyToken, cache off")]:
    mode = load(f"{name}-1")["mode"]
    stolen = ", ".join(f"{load(f'{name}-{r}')['p99_us']} µs ({open(f'{out}/{name}-{r}.steal').read().strip()} ms stolen)" for r in range(1, rounds + 1))
    print(f"| {label} at half its maximum ({mode}), {rounds}-round median | {med(name, 'throughput'):,.0f} | {med(name, 'p50_us'):.0f} | {med(name, 'p99_us'):.0f} | p99 goal ≤ 5000 µs; rounds: {stolen} |")
fl = load("flood")
print(f"| random-kid flood: {fl['calls']:,} calls over 10,000 unknown kids | {fl['throughput']:,.0f} | {fl['p50_us']} | {fl['p99_us']} | {fl['jwks_requests']} JWKS request(s) in {fl['seconds']:.1f} s (cooldown 10 s) |")
bad = {}
for n in ["fresh", "orders"] + [
        f"{p}-{r}" for p in ("echo", "repeated", "nocache", "check", "echo_half", "repeated_half", "nocache_half")
        for r in range(1, rounds + 1)]:
    for k, v in load(n)["outcomes"].items():
        if k != "OK":
            bad[f"{n}:{k}"] = v
if bad:
    print(f"\nerrors: {bad}")
mem = open(f"{out}/verdict_memory.txt").read()
entry = re.search(r"verdict-cache bytes per entry\s+([0-9]+)", mem).group(1)
print(f"\nverdict-cache entry: {entry} heap bytes (goal ≤ 1024)")
print(f"\nraw reports: {out}")
EOF
