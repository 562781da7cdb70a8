#!/usr/bin/env bash
# The shipped judge head, end to end: mine labels on HumanEval's training half and verdict's own
# prompts (heads/train-prompts.jsonl), train, then evaluate the policies on the held-out half.
# Usage: bench/judge.sh [mine|train|eval] (default: all three). Outputs go to $OUT (default
# ./judge-run); the head is written to heads/ only by `train`. Takes ~45 min (mine at T = 0)
# + ~45 min (mine, the draft's draws at T = 1) + ~45 min (eval, the 82 held-out problems, two
# configurations) on a 2-core CPU.
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
  # The draft's draws at T = 1, 3 per prompt: more mismatches, and more unacceptable ones.
  t1="--draft-temperature 1 --seed 9 --max-per-prompt 3"
  "$verdict" judge mine --range 0..82 --rule tests --max-tokens 256 $t1 --out "$OUT/humaneval-t1.safetensors"
  "$verdict" judge mine --problems heads/train-prompts.jsonl --range 0..16 --rule tests --max-tokens 256 $t1 --out "$OUT/extra-t1.safetensors"
fi
if [[ $step == all || $step == train ]]; then
  data="$OUT/humaneval-train.safetensors,$OUT/extra.safetensors,$OUT/humaneval-t1.safetensors,$OUT/extra-t1.safetensors"
  "$verdict" judge train --data "$data" --precision 0.9 --weight-decay 0.01,0.1,1,10,100 --epochs 400 \
    --out heads/qwen2.5-coder-1.5b-instruct.judge.safetensors
fi
if [[ $step == all || $step == eval ]]; then
  "$verdict" eval humaneval --range 82..164 --limit "${PROBLEMS:-82}" --k 16 --max-tokens 256 \
    --configs "${CONFIGS:-strict;judge}" \
    --json "$OUT/eval.json" --svg "$OUT/judge-tradeoff.svg"
fi
