#!/usr/bin/env bash
# Runs the rule-parser fuzz target for a bounded time: ./run.sh SECONDS
# Exits non-zero, loudly, if libFuzzer finds a crash, a timeout or a memory blow-up.
#
# Only stable Rust is installed here; cargo-fuzz needs nightly flags, which
# RUSTC_BOOTSTRAP=1 unlocks on stable. Install cargo-fuzz with
# `cargo install cargo-fuzz --locked` if it is missing.
set -euo pipefail

secs="${1:?usage: $0 SECONDS}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/target}"

mkdir -p corpus/parse artifacts/parse
cp -n seeds/* corpus/parse/ 2>/dev/null || true

set +e
cargo fuzz run parse corpus/parse -- \
    -max_total_time="$secs" -max_len=8192 -timeout=10 -rss_limit_mb=1024 \
    -dict=parse.dict -artifact_prefix=artifacts/parse/ -print_final_stats=1
status=$?
set -e

if [ "$status" -ne 0 ]; then
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    echo "FUZZ FAILURE (exit $status): crashing inputs are in $here/artifacts/parse/" >&2
    ls -l artifacts/parse/ >&2 || true
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    exit "$status"
fi
echo "fuzz: no crash in ${secs}s"
