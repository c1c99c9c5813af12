#!/usr/bin/env bash
# CI for edgestream-protocol (called from .ci/run). Fails on the first problem.
#
#   FUZZ_SECONDS   seconds per fuzz target (default 20; 0 skips fuzzing)
#   CARGO_TARGET_DIR is honoured; the no_std check and the fuzz build use
#   sibling directories so their different flags do not evict the main build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
step() { printf '\n==> %s\n' "$*"; }

step "fmt"
cargo fmt -p edgestream-protocol -- --check

step "clippy (std, all targets)"
cargo clippy -p edgestream-protocol --all-targets -- -D warnings
step "clippy (no_std, no alloc)"
cargo clippy -p edgestream-protocol --no-default-features -- -D warnings
step "clippy (no_std + alloc)"
cargo clippy -p edgestream-protocol --no-default-features --features alloc -- -D warnings

step "tests (unit, property, golden, hostile stream, doc)"
cargo test -p edgestream-protocol

step "docs (broken intra-doc links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc -p edgestream-protocol --no-deps

# The benches are type-checked by clippy --all-targets above; building them
# would be a fat-LTO release build for no extra assurance.

# no_std proof: nostd-check is #![no_std] with its own panic handler, so a
# build fails with E0152 (duplicate lang item `panic_impl`) if anything in
# its dependency graph links std.
nostd_target="$target-nostd"
step "no_std build (no alloc)"
(cd "$here/nostd-check" && CARGO_TARGET_DIR="$nostd_target" cargo build --locked)
step "no_std build (alloc)"
(cd "$here/nostd-check" && CARGO_TARGET_DIR="$nostd_target" cargo build --locked --features alloc)
step "no_std negative control: linking std must fail with E0152"
if out="$(cd "$here/nostd-check" && CARGO_TARGET_DIR="$nostd_target" cargo build --locked --features std 2>&1)"; then
    echo "nostd-check built with std linked: the no_std proof is broken" >&2
    exit 1
elif ! grep -q "E0152" <<<"$out"; then
    echo "nostd-check failed with std for an unexpected reason:" >&2
    echo "$out" >&2
    exit 1
fi
echo "ok: std is detected, so the builds above are std-free"

seconds="${FUZZ_SECONDS:-20}"
if [ "$seconds" != "0" ]; then
    step "fuzz (${seconds}s per target)"
    FUZZ_TARGET_DIR="$target-fuzz" "$here/fuzz/run.sh" "$seconds"
fi
step "protocol CI passed"
