#!/usr/bin/env bash
# Replays the Dockerfile without a Docker engine (for machines that have none), as closely as
# the machine allows:
#   build stage   — the same COPY/RUN steps in a scratch directory: dependency-only build on
#                   stub sources, then the real build, both `--locked`;
#   runtime stage — a root filesystem made of the Debian 12 packages that distroless
#                   `cc-debian12` is built from (glibc, libgcc, libstdc++, libgomp, libssl,
#                   CA certificates, tzdata, netbase, base-files) plus the `nonroot` user, the
#                   binary copied in, then the image's ENTRYPOINT/CMD run under `chroot` as uid
#                   65532 with the image's ENV (listen addresses moved to 127.0.0.1, as
#                   `docker run -e` would), against the emulator.
# Checks: both builds succeed; the binary needs no library beyond the runtime filesystem; the
# service runs as non-root, loads keys (`/readyz` 200) and verifies a token.
# Needs root (chroot) and Debian's package mirror. About 6 minutes (a cold release build).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
# REUSE=<a previous run's directory> skips the build stage (its binary is reused).
WORK=${REUSE:-$(mktemp -d /tmp/clerk-container.XXXXXX)}
# The host-side helpers: the emulator and the load generator (as a gRPC client).
cargo build --release --quiet --bin clerk-grpc-auth --example loadgen
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
step() { echo "== $*"; }

# --- build stage -------------------------------------------------------------------------
BIN=$WORK/src/target/release/clerk-grpc-auth
if [ -n "${REUSE:-}" ] && [ -x "$BIN" ]; then
    step "build stage: reusing $BIN"
else
step "build stage in $WORK/src"
mkdir -p "$WORK/src"
cd "$WORK/src"
cp "$REPO/Cargo.toml" "$REPO/Cargo.lock" "$REPO/build.rs" .
cp -r "$REPO/proto" proto
mkdir -p bench && cp "$REPO/bench/Cargo.toml" bench/
# The Dockerfile's dependency-caching RUN, verbatim in effect.
mkdir -p src examples/common bench/src bench/benches
echo 'fn main() {}' >src/main.rs && touch src/lib.rs bench/src/lib.rs
for b in verify verify_ratio layer; do echo 'fn main() {}' >"bench/benches/$b.rs"; done
cargo build --release --locked --bin clerk-grpc-auth 2>"$WORK/stub-build.log" \
    || echo "   (stub build failed, as the Dockerfile tolerates: see $WORK/stub-build.log)"
rm -rf src examples
cp -r "$REPO/src" src
cp -r "$REPO/examples" examples
touch src/main.rs src/lib.rs
cargo build --release --locked --bin clerk-grpc-auth
fi

# --- runtime stage -----------------------------------------------------------------------
step "runtime filesystem from Debian 12 packages (distroless cc-debian12's contents)"
ROOT=$WORK/rootfs
rm -rf "$ROOT" "$WORK/debs"
mkdir -p "$WORK/debs" "$ROOT"
cd "$WORK/debs"
apt-get download -qq base-files netbase tzdata ca-certificates libc6 libgcc-s1 libgomp1 \
    libstdc++6 libssl3 >/dev/null
for deb in ./*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
# ca-certificates ships the certificates; distroless ships the bundle they make.
mkdir -p "$ROOT/etc/ssl/certs"
cat "$ROOT"/usr/share/ca-certificates/*/*.crt >"$ROOT/etc/ssl/certs/ca-certificates.crt"
# distroless's users: root and nonroot (65532).
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    >"$ROOT/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$ROOT/etc/group"
mkdir -p "$ROOT/home/nonroot" "$ROOT/tmp" "$ROOT/proc" "$ROOT/dev"
chmod 1777 "$ROOT/tmp"
# COPY --from=build … /usr/local/bin/clerk-grpc-auth
install -D -m 0755 "$BIN" "$ROOT/usr/local/bin/clerk-grpc-auth"
if [ -e "$ROOT/bin" ] && [ -e "$ROOT/bin/sh" ]; then
    echo "   note: the package set brought a shell; distroless has none"
fi

step "every library the binary needs is in the runtime filesystem"
missing=0
for lib in $(ldd "$BIN" | awk '/=>/ {print $1}'); do
    if ! find "$ROOT/lib" "$ROOT/usr/lib" -name "$lib" 2>/dev/null | grep -q .; then
        echo "   missing: $lib"
        missing=1
    fi
done
[ "$missing" = 0 ] || exit 1
echo "   ok: $(ldd "$BIN" | awk '/=>/ {print $1}' | tr '\n' ' ')"

# --- run the image -----------------------------------------------------------------------
step "the image's ENTRYPOINT/CMD as its USER, against the emulator"
eval "$(python3 - "$REPO/Dockerfile" <<'EOF'
import json, shlex, sys
lines, cur = [], ""
for raw in open(sys.argv[1]):
    line = raw.rstrip("\n")
    if line.strip().startswith("#") and not cur:
        continue
    if line.endswith("\\"):
        cur += line[:-1] + " "
        continue
    lines.append(cur + line)
    cur = ""
stage = []
for l in lines:
    if l.upper().startswith("FROM "):
        stage = []
    stage.append(l)
env, entry, cmd, user = {}, [], [], ""
for l in stage:
    word, _, rest = l.partition(" ")
    word = word.upper()
    if word == "ENV":
        for kv in shlex.split(rest):
            k, _, v = kv.partition("=")
            env[k] = v
    elif word == "ENTRYPOINT":
        entry = json.loads(rest)
    elif word == "CMD":
        cmd = json.loads(rest)
    elif word == "USER":
        user = rest.strip()
print("IMAGE_ENV=" + shlex.quote(" ".join(f"{k}={v}" for k, v in env.items())))
print("IMAGE_ARGV=" + shlex.quote(" ".join(entry + cmd)))
print("IMAGE_USER=" + shlex.quote(user))
EOF
)"
echo "   USER $IMAGE_USER; ENV $IMAGE_ENV; runs: $IMAGE_ARGV"
[ "$IMAGE_USER" = "nonroot:nonroot" ] || { echo "the image does not run as nonroot" >&2; exit 1; }

"$REPO/target/release/clerk-grpc-auth" emulator --listen 127.0.0.1:18787 >"$WORK/emulator.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "sk_test_" "$WORK/emulator.log" 2>/dev/null && break; sleep 0.1; done
SECRET=$(grep -o 'sk_test_[A-Za-z0-9]*' "$WORK/emulator.log" | head -1)
[ -n "$SECRET" ] || { echo "the emulator printed no secret key" >&2; exit 1; }

# shellcheck disable=SC2086
env -i $IMAGE_ENV \
    CLERK_AUTH_LISTEN=127.0.0.1:15051 CLERK_AUTH_HTTP_LISTEN=127.0.0.1:18081 \
    CLERK_SECRET_KEY="$SECRET" CLERK_API_URL=http://127.0.0.1:18787 \
    "$(command -v chroot)" --userspec=65532:65532 "$ROOT" $IMAGE_ARGV >"$WORK/service.log" 2>&1 &
SVC=$!
PIDS+=($SVC)
ready=0
for _ in $(seq 100); do
    if curl -fsS http://127.0.0.1:18081/readyz >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.1
done
[ "$ready" = 1 ] || { echo "not ready; log:" >&2; cat "$WORK/service.log" >&2; exit 1; }
# env and chroot exec the service: it keeps their process id.
uid=$(awk '/^Uid:/ {print $2}' "/proc/$SVC/status")
echo "   ready; runs as uid $uid"
[ "$uid" = 65532 ] || { echo "running as uid $uid, not 65532" >&2; exit 1; }
"$REPO/target/release/examples/loadgen" run --target verify --addr http://127.0.0.1:15051 \
    --emulator http://127.0.0.1:18787 --metrics http://127.0.0.1:18081/metrics \
    --pool 20 --concurrency 4 --connections 1 --warmup 0 --duration 1 | tee "$WORK/verify.txt"
grep -q '"OK"' "$WORK/verify.txt" && ! grep -q 'Unauthenticated\|Unavailable' "$WORK/verify.txt" \
    || { echo "verification inside the replayed image failed" >&2; exit 1; }
head -c 300 "$WORK/service.log" | grep -q '"level"' && echo "   logs are JSON (CLERK_AUTH_LOG_FORMAT=json)"
step "container replay passed ($WORK)"
