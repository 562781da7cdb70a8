#!/usr/bin/env bash
# The shipped judge head, end to end: mine labels on HumanEval's training half and verdict's own
# prompts (heads/train-prompts.jsonl), train, then evaluate the policies on the held-out half.
# Usage: bench/judge.sh [mine|train|eval] (default: all three). Outputs go to $OUT (default
# ./judge-run); the head is written to heads/ only by `train`. Takes ~40 min (mine) + ~25 min
# (eval, 20 problems) on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-judge-run}
mkdir -p "$OUT"
cargo build --release
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
verdict="$target_dir/release/verdict"
step=${1:-all}
if [[ $step == all || $step == mine ]]; then
  "$verdict" judge mine --range 0..82 --rule tests --max-tokens 256 --out "$OUT/humaneval-train.safetensors"
  "$verdict" judge mine --problems heads/train-prompts.jsonl --range 0..16 --rule tests --max-tokens 256 --out "$OUT/extra.safetensors"
fi
if [[ $step == all || $step == train ]]; then
  "$verdict" judge train --data "$OUT/humaneval-train.safetensors,$OUT/extra.safetensors" \
    --precision 0.9 --weight-decay 100 --epochs 400 --out heads/qwen2.5-coder-1.5b-instruct.judge.safetensors
fi
if [[ $step == all || $step == eval ]]; then
  "$verdict" eval humaneval --range 82..164 --limit "${PROBLEMS:-20}" --k 16 --max-tokens 256 \
    --configs "${CONFIGS:-target;strict;judge;judge:threshold=0.9;judge:threshold=0;threshold:rule=0}" \
    --json "$OUT/eval.json" --svg "$OUT/judge-tradeoff.svg"
fi
