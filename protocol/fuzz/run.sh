#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20) and fails loudly on a
# crash. Usage: protocol/fuzz/run.sh [SECONDS]
#
# Only stable Rust is installed here: RUSTC_BOOTSTRAP=1 lets cargo-fuzz use
# the nightly-only sanitizer flags on stable. Set FUZZ_SANITIZER=none if the
# address sanitizer does not work on a machine.
set -euo pipefail
seconds="${1:-20}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$here/target}-fuzz}"
sanitizer="${FUZZ_SANITIZER:-address}"
targets=(frames text_lines json_payloads)

status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "fuzz: $t for ${seconds}s (sanitizer: $sanitizer)"
    # The corpus directory comes first so new inputs are kept there; seeds
    # are read-only starting points. -rss_limit_mb bounds memory per input.
    if ! cargo fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -max_len=8192 -print_final_stats=1 \
        >"run-$t.log" 2>&1; then
        echo "fuzz: $t FAILED; the last lines of fuzz/run-$t.log:" >&2
        tail -n 40 "run-$t.log" >&2
        ls artifacts/"$t"/ 2>/dev/null >&2 || true
        status=1
    else
        runs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "run-$t.log" | grep -Eo '[0-9]+$' || echo '?')"
        echo "fuzz: $t ok ($runs executions, no crash)"
    fi
done
exit "$status"
