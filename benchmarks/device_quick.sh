#!/usr/bin/env bash
# One device call (#26/#28): the GPU tests of the speculative graphs and overlapped steps, the
# speculative benchmark, and TPOT at concurrency 1 with and without overlapped decode steps.
#   TARGET=h100 bash benchmarks/device_quick.sh     (results under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
out="${OUT:-device_out}"; target="${TARGET:-h200}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
timeout 200 python -m pytest -q -p no:cacheprovider tests/backends/triton/test_serving_kernels.py \
  -k "speculation or step_buckets" > "$out/pytest_spec.log" 2>&1; tail -3 "$out/pytest_spec.log" | cut -c1-300
TARGET=$target OUT=$out bash benchmarks/device_session.sh spec
art=/tmp/fs_serving_$target.ds4
[ -f "$art" ] || timeout 150 python -m ds4c.cli compile flash-slice --target "$target" --precision bf16 --serving \
  --max-context 8192 -o "$art" > "$out/compile.log" 2>&1
for mode in overlap no-overlap; do
  timeout 100 python -m ds4c.cli bench serve "$art" --device cuda --requests 4 --concurrency 1 --prompt-len 512:512 \
    --output-len 128:128 --compare static --static-batch 1 --state-budget 8GB --$mode --json "$out/serve_c1_$mode.json" \
    > "$out/serve_c1_$mode.log" 2>&1
  echo "$mode"; grep -iE "tpot|overlap" "$out/serve_c1_$mode.log" | head -4 | cut -c1-160
done
