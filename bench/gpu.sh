#!/usr/bin/env bash
# GPU checks for a session that is lent a GPU machine (no Rust, no network there): the step
# kernels against the CPU (tests/kernels.rs) and greedy `verdict generate --device cuda` on
# SmolLM2-135M against the same on CPU, as one table.
#
# Here (the build machine):
#   CARGO_TARGET_DIR=/work/target-cuda scripts/build-cuda tests   # the two binaries
#   CARGO_TARGET_DIR=/work/target-cuda bench/gpu.sh pack          # -> bench/out/gpu/
# The device tool carries the working tree plus at most 8 ignored paths, 64 MiB in all per call,
# and keeps ignored files on a warm machine between calls. The binaries (xz: 83 + 40 MB stripped,
# ~18 MB packed) and SmolLM2 (94 MiB) take two calls; `pack` prints both carry lists:
#   run 1: carry [binaries, model.part-aa], command "true"
#   run 2: carry [the other model parts], command "bash bench/gpu.sh", timeout_s 400
# run 2 right after run 1 (a machine idle for about 30 s is given back, with the files), then
# give the machine back. The table and the whole log come back as $OUT/gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=bench/out/gpu
model_src=${VERDICT_MODELS:-$HOME/.cache/verdict/models}/SmolLM2-135M-Instruct.Q4_1.gguf
prompt="Write a Python function that checks whether a number is prime."

if [ "${1:-}" = pack ]; then
    set -e
    gpu=${CARGO_TARGET_DIR:-target}/gpu
    mkdir -p "$dir"
    rm -f "$dir"/*.xz "$dir"/model.part-*
    for b in verdict kernels-test; do
        [ -f "$gpu/$b" ] || { echo "pack: no $gpu/$b (run scripts/build-cuda tests)" >&2; exit 1; }
        xz -6 -T2 -c "$gpu/$b" >"$dir/$b.xz"
    done
    # Run 1 carries the binaries and as much of the model as fits in 60 MiB.
    bin_mib=$(du -cm "$dir"/*.xz | tail -1 | cut -f1)
    split -b "$((60 - bin_mib))M" "$model_src" "$dir/model.part-"
    rest=$(ls "$dir"/model.part-* | tail -n +2)
    mib=$(du -cm $rest | tail -1 | cut -f1)
    [ "$mib" -le 60 ] || { echo "pack: run 2 would carry $mib MiB" >&2; exit 1; }
    echo "run 1 carry: [\"$dir/verdict.xz\", \"$dir/kernels-test.xz\", \"$dir/model.part-aa\"]"
    printf 'run 2 carry: [%s]\n' "$(for f in $rest; do printf '"%s", ' "$f"; done | sed 's/, $//')"
    exit 0
fi

out=${OUT:-/tmp}
log="$out/gpu.log"
mkdir -p "$out"
exec > >(tee "$log") 2>&1

# CUDA user-space libraries: the torch venv's wheels and the system CUDA (GPU.md, section 3).
libs=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib 2>/dev/null | paste -sd:)
export LD_LIBRARY_PATH="$libs:/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1

bin=$(mktemp -d)
unxz() { # xz, else python's lzma (the torch venv has one)
    if command -v xz >/dev/null; then xz -dc "$1"; else
        py=$(command -v python3 || echo /opt/torch/.venv/bin/python3)
        "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1"
    fi
}
for b in verdict kernels-test; do
    unxz "$dir/$b.xz" >"$bin/$b" && chmod +x "$bin/$b" || echo "missing $dir/$b.xz"
done
model=""
if ls "$dir"/model.part-* >/dev/null 2>&1; then
    model="$bin/SmolLM2-135M-Instruct.Q4_1.gguf"
    cat "$dir"/model.part-* >"$model"
fi

rows=()
row() { rows+=("$(printf '| %-40s | %-10s | %8s | %s |' "$1" "$2" "$3" "$4")"); }

# 1. kernels vs CPU
t0=$(date +%s%N)
timeout 180 "$bin/kernels-test" --test-threads=1 --nocapture >"$bin/kernels.out" 2>&1
rc=$?
t=$((($(date +%s%N) - t0) / 1000000))ms
cat "$bin/kernels.out"
if grep -q SKIPPED "$bin/kernels.out"; then
    row "step kernels vs CPU (tests/kernels)" SKIPPED "$t" "$(grep -m1 SKIPPED "$bin/kernels.out")"
else
    row "step kernels vs CPU (tests/kernels)" "$([ $rc = 0 ] && echo pass || echo "FAIL rc=$rc")" "$t" \
        "$(grep -m1 '^test result' "$bin/kernels.out")"
fi

# 2. greedy generation, GPU and CPU, same prompt
if [ -n "$model" ]; then
    ok=0
    for dev in cuda cpu; do
        timeout 150 "$bin/verdict" generate --model "$model" --device $dev --max-tokens 128 \
            --temperature 0 --stats --prompt "$prompt" >"$bin/$dev.txt" 2>"$bin/$dev.err"
        rc=$?
        stats=$(grep '^{' "$bin/$dev.err" | tail -1)
        tps=$(echo "$stats" | grep -o '"tokens_per_s":[0-9.]*' | cut -d: -f2)
        n=$(echo "$stats" | grep -o '"tokens":[0-9]*' | cut -d: -f2)
        [ $rc = 0 ] && ok=$((ok + 1)) || tail -5 "$bin/$dev.err"
        [ -z "$tps" ] || tps=$(printf '%.1f' "$tps")
        row "generate --device $dev (SmolLM2 greedy)" "$([ $rc = 0 ] && echo ok || echo "FAIL rc=$rc")" \
            "${tps:-?}" "tok/s over ${n:-?} tokens"
    done
    if [ $ok != 2 ]; then same="not compared"; elif cmp -s "$bin/cuda.txt" "$bin/cpu.txt"; then same="identical"; else
        same="differ from byte $(cmp "$bin/cuda.txt" "$bin/cpu.txt" 2>&1 | grep -o 'byte [0-9]*' | cut -d' ' -f2) (greedy parts at a near-tie; see texts below)"
    fi
    row "greedy text, cuda vs cpu" "$same" "" ""
    echo "--- cuda text:"; cat "$bin/cuda.txt"; echo; echo "--- cpu text:"; cat "$bin/cpu.txt"; echo
else
    row "generate --device cuda" "not run" "" "no $dir/model.part-* carried"
fi

echo
printf '| %-40s | %-10s | %8s | %s |\n' check result time/rate detail
printf '| %s | %s | %s | %s |\n' "$(printf -- '-%.0s' {1..40})" "----------" "--------" "------"
printf '%s\n' "${rows[@]}"
