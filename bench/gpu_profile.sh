#!/usr/bin/env bash
# Where a decode step's time goes on the GPU: Nsight Systems' summary (kernels, CUDA API calls,
# memory copies) of `verdict generate --device cuda` on the 1.5B Q4_K_M layout with random
# weights. Runs on the lent GPU machine after `bench/gpu.sh pack`'s first carry (binary and
# headers in bench/out/gpu/1); prints the summary tables and writes them to $OUT/nsys.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/*/bin/nsys /usr/local/cuda*/nsight-systems*/bin/nsys 2>/dev/null | head -1)
[ -n "$nsys" ] || { echo "gpu_profile: no nsys on this machine"; exit 0; }
libs=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib 2>/dev/null | paste -sd:)
export LD_LIBRARY_PATH="$libs:/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
py=$(command -v python3)
[ -x /opt/torch/.venv/bin/python3 ] && py=/opt/torch/.venv/bin/python3
unxz() { "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1"; }
d=$(mktemp -d)
unxz bench/out/gpu/1/verdict.xz >"$d/verdict" && chmod +x "$d/verdict"
unxz bench/out/gpu/1/qwen2.5-coder-1.5b.hdr.xz >"$d/q15.hdr"
"$d/verdict" bench synth --from "$d/q15.hdr" --out "$d/q15.gguf"
timeout 150 "$nsys" profile -o "$d/decode" --force-overwrite=true --stats=true \
    "$d/verdict" generate --model "$d/q15.gguf" --device cuda --raw --prompt "def add(a, b):" \
    --max-tokens 64 --temperature 0 --stats >"$out/nsys.txt" 2>&1
echo "nsys rc=$?"
grep -v '^\s*$' "$out/nsys.txt" | cut -c1-200 | head -150
