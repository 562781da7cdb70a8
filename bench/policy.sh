#!/usr/bin/env bash
# Policy host benchmark: ns per verify at k = 4, 8, 16 (top-K 8), instantiate time, swap time.
# Usage: bench/policy.sh [samples]   (release build; prints a Markdown table)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin verdict
target="${CARGO_TARGET_DIR:-target}"
"$target/release/verdict" policy bench --samples "${1:-101}"
