#!/usr/bin/env bash
# Coverage-guided fuzzing with cargo-fuzz (libFuzzer). Opt-in, not part of CI.
#   scripts/fuzz.sh                  # every target, 60 s each
#   scripts/fuzz.sh token_decode 600 # one target, 10 minutes
# A crash is saved under fuzz/artifacts/<target>/; turn it into a regression test.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# cargo-fuzz needs unstable compiler flags (sanitizers); allow them on the stable toolchain.
export RUSTC_BOOTSTRAP=1
targets=(token_decode jwks_parse webhook_verify check_policy check_request claims_agree)
secs="${2:-60}"
if [ $# -ge 1 ]; then targets=("$1"); fi
for t in "${targets[@]}"; do
  echo "== fuzzing $t for ${secs}s"
  cargo fuzz run "$t" -- -max_total_time="$secs" -max_len=20000 -rss_limit_mb=2048
done
