#!/usr/bin/env bash
# The device measurements behind docs/PERFORMANCE.md, in parts that each fit one 10-minute device call
# (results under $OUT, or ./device_out):
#
#   bash benchmarks/device_session.sh exactness   # fp32 smoke vs transformers, norm/rope kernel + executor tests, packed/MoE kernel tests (~6 min)
#   bash benchmarks/device_session.sh profile     # per-kernel decode profiles: bf16, fp8, fp8 incl. LM head (~5 min)
#   bash benchmarks/device_session.sh variants    # graphed decode step bf16 / fp8 / fp8 incl. LM head    (~4 min)
#   bash benchmarks/device_session.sh pdl         # graphed decode step bf16 / fp8, with and without PDL  (~5 min)
#   bash benchmarks/device_session.sh peers       # ds4c vs transformers eager / torch.compile, same run  (~5 min)
#   bash benchmarks/device_session.sh tune        # ds4c tune on the FP8 flash-slice: row kernels' K loop forms
#   bash benchmarks/device_session.sh kernels     # decode MoE tile sweep, LM-head and dense FP8 GEMVs     (~6 min)
#   bash benchmarks/device_session.sh rowloop     # graphed decode step, FP8 row kernels' K loop new vs old (~5 min)
#   bash benchmarks/device_session.sh topk        # indexer top-k forms alone; graphed step at ctx 32768 select vs bitonic (~7 min)
#   bash benchmarks/device_session.sh fusion      # graphed step: norm+rope apart / fused, both loaded,
#                                                 # timed in turn (5 rounds); the decode step's Inductor code kept (~7 min)
#   bash benchmarks/device_session.sh plan        # fp32 smoke vs transformers with the kernels backend's buffer plan (its
#                                                 # arenas per entry point), buffer plan + executor tests (~5 min)
#   bash benchmarks/device_session.sh planvariants  # graphed step, kernels backend with / without the buffer plan, one
#                                                 # stream and the stream schedule, + compiled; 3 rounds (~9 min)
#   bash benchmarks/device_session.sh keys        # stored vs live Triton keys per binary (tiny, fp32/bf16), fp32 smoke vs
#                                                 # transformers, then the whole GPU test suite (~9 min)
#   bash benchmarks/device_session.sh ab          # flash-slice compile/load/TTFT/decode, tree ./ab_old vs this tree, same
#                                                 # run (A: a commit, archived into ./ab_old first; ~6 min)
#   bash benchmarks/device_session.sh serving     # the Engine on the GPU (tiny --serving, fp32 / bf16): tokens vs CPU,
#                                                 # step times, memory over 200 requests; the serving kernels test (~5 min)
#   bash benchmarks/device_session.sh flash1      # the whole flash (MXFP4 experts, FP8 elsewhere) on one GPU with
#                                                 # --hbm-budget 120GB: compile, load, TTFT, 16 tokens vs host link (~9 min)
#   bash benchmarks/device_session.sh c1          # #26: concurrency 1 alone, TPOT / TTFT vs generate (~2.5 min)
#   bash benchmarks/device_session.sh stepprof    # #26: the engine's step with a 512-token prompt vs the dense prefill,
#                                                 # kernels grouped side by side (~3 min)
#   bash benchmarks/device_session.sh serve26     # #26: flash-slice --serving (bf16); TPOT at concurrency 1 vs generate;
#                                                 # 256 requests at saturation vs static batches; device memory over
#                                                 # 10,000 short requests (~9.5 min)
#   bash benchmarks/device_session.sh serve26b    # #26, after serve26 on the same machine: 16 requests vs transformers
#                                                 # generate; the auto policy's artifact, then steps of 8192 tokens
#                                                 # (bf16), on the 256-request trace (~9 min)
#   bash benchmarks/device_session.sh paged       # paged.*, rope.table, compress.rows, top-k kernels + the engine's tokens on the
#                                                 # GPU vs the reference; TPOT at concurrency 1 vs generate; long-row top-k (~5 min)
#   bash benchmarks/device_session.sh spec        # MTP speculation: verify k=1..3 vs decode at B=1/32 (flash-slice,
#                                                 # bf16), then the trained tiny's acceptance and tokens/s (~8 min)
#   bash benchmarks/device_session.sh prefix      # decode-bucket graphs test; flash-slice --serving (bf16), then #27's
#                                                 # multi-turn workload with and without the prefix cache, TPOT at
#                                                 # concurrency 1, a saturating trace vs static batches (~9 min)
#   bash benchmarks/device_session.sh first       # #29: flash-slice's first token after load vs steady (2048-token
#                                                 # prompt), Triton / Inductor compilations counted; then an Engine's
#                                                 # start (every bucket captured) and first request, compilations
#                                                 # counted apart (~5 min)
#   bash benchmarks/device_session.sh long        # #29: per-kernel profiles (compiled, bf16, B=1): prefill + decode at ctx 2048,
#                                                 # decode at ctx 65536 from a random state; graphed step device time (~6 min)
#   bash benchmarks/device_session.sh moetopk     # #29: top-k kernel tests; chunked top-k vs torch on long rows; the prefill
#                                                 # MoE's tile sweep vs its weight-read floor (~5 min)
#   bash benchmarks/device_session.sh batchab     # #26: the 256-request trace on flash-slice --serving (bf16) compiled for
#                                                 # max_running 64 (default), 128 and 256: does a bigger batch of
#                                                 # decodes per expert read pay for its padding? (~9 min)
#   bash benchmarks/device_session.sh ab26        # #26 A/B, tree ./ab_old vs this tree: flash-slice --serving (bf16) each,
#                                                 # concurrency 1 with and without the prefix cache, the 256-request
#                                                 # trace (~8 min)
#   bash benchmarks/device_session.sh pagedreads  # #26: the .rows kernels' tests on the GPU; flash-slice --serving (bf16,
#                                                 # ctx 65536) with keys read at their rows vs gathered copies
#                                                 # (--no-fuse-paged-reads): concurrency 1, then 64 long prompts (~8 min)
#
# TARGET (default h200) names the target record the artifacts are compiled for.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
case "${1:-}" in
  exactness|profile|variants|pdl|peers|tune|kernels|rowloop|topk|fusion|plan|planvariants|keys|ab|serving|prefix|flash1|spec|c1|stepprof|serve26|serve26b|paged|first|long|moetopk|pagedreads|batchab|ab26) ;;
  *) echo "usage: bash benchmarks/device_session.sh exactness|profile|variants|pdl|peers|tune|kernels|rowloop|topk|fusion|plan|planvariants|keys|ab|serving|prefix|flash1|spec|c1|stepprof|serve26|serve26b|paged|first|long|moetopk|pagedreads|batchab|ab26" >&2
     exit 2 ;;
esac
out="${OUT:-device_out}"
target="${TARGET:-h200}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$out/gpu.txt" 2>&1
head_table=benchmarks/tables/fp8_with_head.json
deadline=$((SECONDS + ${BUDGET_S:-570}))
left() { local t=$((deadline - SECONDS - 5)); [ "$t" -lt "$1" ] && echo "$t" || echo "$1"; }  # a timeout within the call
case "$1" in
  paged)
    timeout "$(left 150)" python -m pytest -q -p no:cacheprovider tests/backends/triton/test_paged_kernels.py \
      tests/backends/triton/test_serving_kernels.py tests/backends/triton/test_norm_mhc_rope_kernels.py::test_rope_table \
      tests/backends/triton/test_compress_kernels.py::test_compressor_rows_match_reference \
      tests/backends/triton/test_compress_kernels.py::test_top_indices_match_torch_topk \
      tests/backends/triton/test_compress_kernels.py::test_long_rows_take_the_chunked_select_and_agree_with_the_select \
      > "$out/pytest_paged.log" 2>&1; tail -2 "$out/pytest_paged.log" | cut -c1-200
    art=/tmp/fs_serving_$target.ds4
    timeout "$(left 200)" python -m ds4c.cli compile flash-slice --target "$target" --precision bf16 --serving \
      --max-context 8192 -o "$art" > "$out/compile.log" 2>&1; tail -1 "$out/compile.log" | cut -c1-200
    timeout "$(left 90)" python -m ds4c.cli bench serve "$art" --device cuda --state-budget 24GB --requests 4 \
      --concurrency 1 --prompt-len 512:512 --output-len 128:128 --compare static --static-batch 1 \
      --json "$out/serve_c1.json" > "$out/serve_c1.log" 2>&1; grep -iE "tpot|decode-only|│" "$out/serve_c1.log" | cut -c1-180
    timeout "$(left 60)" python benchmarks/topk_bench.py --target "$target" --shapes 1x528 1x8208 1x16400 1x65552 \
      32x16400 --out "$out/topk_long.json" > "$out/topk_long.log" 2>&1
    grep -v Warn "$out/topk_long.log" | cut -c1-400 ;;
  moetopk)
    timeout "$(left 100)" python -m pytest -q -p no:cacheprovider tests/backends/triton/test_compress_kernels.py \
      -k "top or chunked" > "$out/pytest_topk.log" 2>&1; tail -1 "$out/pytest_topk.log" | cut -c1-200
    timeout "$(left 100)" python benchmarks/topk_bench.py --target "$target" --shapes 1x528 1x16400 1x65552 32x16400 \
      --out "$out/topk_chunked.json" > "$out/topk_chunked.log" 2>&1
    grep -v Warn "$out/topk_chunked.log" | cut -c1-400
    timeout "$(left 300)" python benchmarks/moe_prefill_bench.py --target "$target" --out "$out/moe_prefill.json" \
      > "$out/moe_prefill.log" 2>&1
    grep -v Warn "$out/moe_prefill.log" | cut -c1-260 ;;
  long)
    for ctx in 2048 65536; do  # ctx 2048 prefills the prompt (the prefill's profile too); 65536 starts from a random state
      synth=$([ "$ctx" = 2048 ] || echo --synthetic-state)
      timeout "$(left 240)" python benchmarks/profile_step.py --backends compiled --target "$target" --prompt "$ctx" \
        $synth --out "$out/prof_ctx$ctx.json" > "$out/prof_ctx$ctx.log" 2>&1
      grep -v Warn "$out/prof_ctx$ctx.log" | head -60 | cut -c1-160
    done ;;
  batchab)  # #26: max_running 64 / 128 / 256 on the saturating trace, engine only, same machine
    for mr in 64 128 256; do
      art=/tmp/fs_serving_mr${mr}_$target.ds4
      timeout "$(left 100)" python -m ds4c.cli compile flash-slice --target "$target" --precision bf16 --serving \
        --max-context 8192 --serving-opt max_running=$mr -o "$art" > "$out/compile_mr$mr.log" 2>&1
      tail -1 "$out/compile_mr$mr.log" | cut -c1-120
      timeout "$(left 170)" python -m ds4c.cli bench serve "$art" --device cuda --requests 256 --rate 100 \
        --prompt-len 128:4096 --output-len 64:512 --compare none --json "$out/serve_rate_mr$mr.json" \
        > "$out/serve_rate_mr$mr.log" 2>&1; tail -6 "$out/serve_rate_mr$mr.log" | cut -c1-200
    done ;;
  pagedreads)  # #26: keys read at their page-table rows (fuse_paged_reads) vs the gathered copies, same machine
    timeout "$(left 120)" python -m pytest -q -p no:cacheprovider tests/backends/triton/test_attention_kernels.py \
      tests/backends/triton/test_compress_kernels.py tests/backends/triton/test_serving_kernels.py -k "rows or engine" \
      > "$out/pytest_rows.log" 2>&1; tail -1 "$out/pytest_rows.log" | cut -c1-200
    for form in rows copies; do
      art=/tmp/fs_serving_${form}_$target.ds4
      flag=$([ "$form" = copies ] && echo --no-fuse-paged-reads)
      timeout "$(left 110)" python -m ds4c.cli compile flash-slice --target "$target" --precision bf16 --serving \
        --max-context 65536 $flag -o "$art" > "$out/compile_$form.log" 2>&1; tail -1 "$out/compile_$form.log" | cut -c1-160
      timeout "$(left 90)" python -m ds4c.cli bench serve "$art" --device cuda --state-budget 24GB --requests 4 \
        --concurrency 1 --prompt-len 512:512 --output-len 128:128 --compare none --overlap \
        --json "$out/serve_c1_$form.json" > "$out/serve_c1_$form.log" 2>&1
      grep -iE "tpot|ttft|prompt chunks" "$out/serve_c1_$form.log" | head -6 | cut -c1-180
      timeout "$(left 120)" python -m ds4c.cli bench serve "$art" --device cuda --requests 64 --rate 100 \
        --prompt-len 2048:16384 --output-len 32:128 --compare none --json "$out/serve_long_$form.json" \
        > "$out/serve_long_$form.log" 2>&1; tail -8 "$out/serve_long_$form.log" | cut -c1-200
    done ;;
  c1)  # #26's concurrency 1 alone (~2.5 min): TPOT and TTFT (steps with prompt chunks) vs generate
    art=/tmp/fs_serving_$target.ds4
    timeout "$(left 110)" python -m ds4c.cli compile flash-slice --target "$target" --precision bf16 --serving \
      --max-context 8192 -o "$art" > "$out/compile.log" 2>&1; tail -1 "$out/compile.log" | cut -c1-200
    timeout "$(left 120)" python -m ds4c.cli bench serve "$art" --device cuda --state-budget 24GB --requests 4 \
      --concurrency 1 --prompt-len 512:512 --output-len 128:128 --compare static --static-batch 1 --overlap \
      --json "$out/serve_c1_overlap.json" > "$out/serve_c1_overlap.log" 2>&1
    grep -iE "tpot|ttft|overlap|prompt chunks|│" "$out/serve_c1_overlap.log" | head -12 | cut -c1-180 ;;
  stepprof)  # #26's TTFT at concurrency 1: the engine's step with a 512-token prompt vs the dense prefill, profiled
    timeout "$(left 300)" python benchmarks/profile_serving_step.py --target "$target" --prompt 512 \
      --out "$out/prof_serving_step.json" > "$out/prof_serving_step.log" 2>&1; echo "rc=$?"
    grep -vE "Warn|USDT" "$out/prof_serving_step.log" | tail -70 | cut -c1-160 ;;
  serve26)
    art=/tmp/fs_serving_$target.ds4
    static=$([ "$target" = h100 ] && echo 8 || echo 16)  # 16 padded prompts of up to 4096 tokens do not fit beside an H100's weights
    timeout "$(left 200)" python -m ds4c.cli compile flash-slice --target "$target" --precision bf16 --serving \
      --max-context 8192 -o "$art" > "$out/compile.log" 2>&1; tail -1 "$out/compile.log" | cut -c1-200
    bs=(--device cuda --state-budget 24GB)
    timeout "$(left 90)" python -m ds4c.cli bench serve "$art" "${bs[@]}" --requests 4 --concurrency 1 --prompt-len 512:512 \
      --output-len 128:128 --compare static --static-batch 1 --overlap --json "$out/serve_c1_overlap.json" \
      > "$out/serve_c1_overlap.log" 2>&1; grep -iE "tpot|ttft|overlap|prompt chunks" "$out/serve_c1_overlap.log" | head -8 | cut -c1-180
    timeout "$(left 260)" python -m ds4c.cli bench serve "$art" --device cuda --requests 256 --rate 100 --prompt-len 128:4096 \
      --output-len 64:512 --compare static --static-batch "$static" --json "$out/serve_rate.json" > "$out/serve_rate.log" 2>&1
    tail -14 "$out/serve_rate.log" | cut -c1-200
    timeout "$(left 150)" python -m ds4c.cli bench serve "$art" --device cuda --requests 10000 --concurrency 64 \
      --prompt-len 16:64 --output-len 4:16 --compare none --json "$out/serve_10k.json" > "$out/serve_10k.log" 2>&1
    tail -6 "$out/serve_10k.log" | cut -c1-240 ;;
  serve26b)  # after serve26 on the same machine (its artifact in /tmp): transformers, then the auto policy
    art=/tmp/fs_serving_$target.ds4
    test -f "$art" || timeout "$(left 200)" python -m ds4c.cli compile flash-slice --target "$target" --precision bf16 \
      --serving --max-context 8192 -o "$art" > "$out/compile.log" 2>&1
    timeout "$(left 300)" python -m ds4c.cli bench serve "$art" --device cuda --requests 16 --rate 100 --prompt-len 128:4096 \
      --output-len 64:512 --compare transformers --static-batch 16 --json "$out/serve_tf.json" > "$out/serve_tf.log" 2>&1
    tail -10 "$out/serve_tf.log" | cut -c1-200
    auto=/tmp/fs_serving_auto_$target.ds4
    timeout "$(left 150)" python -m ds4c.cli compile flash-slice --target "$target" --precision auto --serving \
      --max-context 8192 -o "$auto" > "$out/compile_auto.log" 2>&1; tail -1 "$out/compile_auto.log" | cut -c1-200
    timeout "$(left 200)" python -m ds4c.cli bench serve "$auto" --device cuda --requests 256 --rate 100 --prompt-len 128:4096 \
      --output-len 64:512 --compare none --json "$out/serve_rate_auto.json" > "$out/serve_rate_auto.log" 2>&1
    tail -8 "$out/serve_rate_auto.log" | cut -c1-200
    big=/tmp/fs_serving_8k_$target.ds4  # steps of 8192 tokens: a prefill chunk reads every expert once per 8192 tokens
    timeout "$(left 120)" python -m ds4c.cli compile flash-slice --target "$target" --precision bf16 --serving \
      --serving-opt max_step_tokens=8192 --serving-opt max_chunk=8192 --max-context 8192 -o "$big" \
      > "$out/compile_8k.log" 2>&1; tail -1 "$out/compile_8k.log" | cut -c1-200
    timeout "$(left 200)" python -m ds4c.cli bench serve "$big" --device cuda --requests 256 --rate 100 --prompt-len 128:4096 \
      --output-len 64:512 --compare none --json "$out/serve_rate_8k.json" > "$out/serve_rate_8k.log" 2>&1
    tail -8 "$out/serve_rate_8k.log" | cut -c1-200 ;;
  first)
    timeout "$(left 560)" python benchmarks/first_call.py --target "$target" --serving --out "$out/first_call.json" \
      > "$out/first_call.log" 2>&1; echo "rc=$?"; grep -v Warn "$out/first_call.log" | tail -30 | cut -c1-300 ;;
  spec)
    timeout 560 python benchmarks/speculative.py --target "$target" --out "$out/speculative.json" \
      > "$out/speculative.log" 2>&1; echo "rc=$?"; grep -v Warn "$out/speculative.log" | tail -8 | cut -c1-700 ;;
  flash1)
    timeout 570 python benchmarks/flash_one_gpu.py --target "$target" --budget 120GB --out "$out/flash_one_gpu.json" \
      > "$out/flash_one_gpu.log" 2>&1; echo "rc=$?"; grep -v Warn "$out/flash_one_gpu.log" | tail -6 | cut -c1-600 ;;
  keys)
    timeout 150 python benchmarks/aot_keys.py --target "$target" --precisions fp32,bf16 --out "$out/keys.json" \
      > "$out/keys.log" 2>&1; grep -E "binaries," "$out/keys.log"
    timeout 150 python benchmarks/gpu_smoke.py --out "$out/smoke.json" > "$out/smoke.log" 2>&1; tail -1 "$out/smoke.log" | cut -c1-300
    par=$(python -c "import xdist" 2>/dev/null && echo "-n 4 --dist loadscope")  # the image may lack pytest-xdist
    timeout 280 python -m pytest -q -p no:cacheprovider $par tests/backends/triton \
      --deselect tests/backends/triton/test_pdl.py::test_launch_options_of_the_interpreter_run_without_pdl \
      > "$out/pytest_triton.log" 2>&1; tail -3 "$out/pytest_triton.log" ;;
  prefix)
    timeout 150 python -m pytest -q -p no:cacheprovider tests/backends/triton/test_serving_kernels.py \
      -k "graphs or reference_tokens" > "$out/pytest_graphs.log" 2>&1; tail -3 "$out/pytest_graphs.log"
    art=device_out/flash_slice_serving_$target.ds4
    mkdir -p device_out
    [ -f "$art" ] || timeout 240 python -m ds4c.cli compile flash-slice --target "$target" --precision bf16 --serving \
      --max-context 8192 -o "$art" > "$out/compile.log" 2>&1; tail -2 "$out/compile.log" | cut -c1-300
    # TPOT at concurrency 1 against generate alone (static batches of 1: the graphed dense decode step)
    timeout 120 python -m ds4c.cli bench serve "$art" --device cuda --requests 4 --concurrency 1 --prompt-len 512:512 \
      --output-len 128:128 --compare static --static-batch 1 --json "$out/serve_c1.json" > "$out/serve_c1.log" 2>&1
    tail -8 "$out/serve_c1.log" | cut -c1-200
    # a saturating trace against static batches (#26's shape, 64 requests)
    timeout 200 python -m ds4c.cli bench serve "$art" --device cuda --requests 64 --rate 100 --prompt-len 128:4096 \
      --output-len 64:512 --compare static --static-batch "$static" --json "$out/serve_rate.json" > "$out/serve_rate.log" 2>&1
    tail -8 "$out/serve_rate.log" | cut -c1-200
    # the same shape, 16 requests, against transformers generate (grouped_mm) in one padded batch
    timeout 200 python -m ds4c.cli bench serve "$art" --device cuda --requests 16 --rate 100 --prompt-len 128:4096 \
      --output-len 64:512 --compare static,transformers --static-batch 16 --json "$out/serve_tf.json" \
      > "$out/serve_tf.log" 2>&1; tail -9 "$out/serve_tf.log" | cut -c1-200
    # #27: 64 sessions x 8 turns with and without the prefix cache
    timeout 400 python -m ds4c.cli bench serve "$art" --device cuda --requests 64 --turns 8 --shared-prefix 2048 \
      --prompt-len 64:256 --output-len 32:128 --concurrency 64 --compare nocache --json "$out/prefix_cache.json" \
      > "$out/prefix_cache.log" 2>&1; tail -14 "$out/prefix_cache.log" | cut -c1-200 ;;
  serving)
    timeout 300 python benchmarks/serving_smoke.py --target "$target" --out "$out/serving.json" > "$out/serving.log" 2>&1
    grep -E "^(fp32|bf16) " "$out/serving.log" | cut -c1-600; tail -2 "$out/serving.log" | cut -c1-300
    timeout 200 python -m pytest -q -p no:cacheprovider tests/backends/triton/test_serving_kernels.py \
      > "$out/pytest_serving.log" 2>&1; tail -2 "$out/pytest_serving.log" ;;
  ab)
    # ab_old must already hold tree A (git archive "$A" ds4c pyproject.toml | tar -x -C ab_old, on the
    # machine that has the repository: the device copy has no .git)
    test -d ab_old/ds4c || { echo "ab_old/ds4c missing: run git archive \$A ds4c pyproject.toml | tar -x -C ab_old first" >&2; exit 2; }
    timeout 580 python benchmarks/ab_commits.py --a ab_old --b . --target "$target" --rounds 1 --out "$out/ab.json" \
      > "$out/ab.log" 2>&1; tail -80 "$out/ab.log" | grep -E "b_over_a|next_token|error" ;;
  ab26)
    # #26 A/B on one machine: tree ./ab_old (A: git archive "$A" ds4c pyproject.toml | tar -x -C ab_old) vs this
    # tree (B), flash-slice --serving (bf16) each: TPOT / TTFT at concurrency 1 (512-token prompts) with and without
    # the prefix cache, then the 256-request trace (engine only, prefix cache on as bench serve's default)
    test -d ab_old/ds4c || { echo "ab_old/ds4c missing: run git archive \$A ds4c pyproject.toml | tar -x -C ab_old first" >&2; exit 2; }
    for side in a b; do
      dir=$([ "$side" = a ] && echo ab_old || echo .)
      art=/tmp/fs_serving_${side}_$target.ds4
      (cd "$dir" && timeout "$(left 150)" python -m ds4c.cli compile flash-slice --target "$target" --precision bf16 \
        --serving --max-context 8192 -o "$art" > "$out/ab26_compile_$side.log" 2>&1); echo "$side compile rc=$?"
      for pc in prefix-cache no-prefix-cache; do  # the first run of a side also compiles its kernels (bench serve
        # loads without --trust-binaries): a generous limit
        (cd "$dir" && timeout "$(left 150)" python -m ds4c.cli bench serve "$art" --device cuda --requests 4 --concurrency 1 \
          --prompt-len 512:512 --output-len 128:128 --compare none --overlap --"$pc" --json "$out/ab26_c1_${pc}_$side.json" \
          > "$out/ab26_c1_${pc}_$side.log" 2>&1); echo "$side c1 $pc"; grep -E "│ engine" "$out/ab26_c1_${pc}_$side.log" | cut -c1-120
      done
      (cd "$dir" && timeout "$(left 120)" python -m ds4c.cli bench serve "$art" --device cuda --requests 256 --rate 100 \
        --prompt-len 128:4096 --output-len 64:512 --compare none --json "$out/ab26_rate_$side.json" \
        > "$out/ab26_rate_$side.log" 2>&1); grep -E "│ engine|decode-only|prompt chunks" "$out/ab26_rate_$side.log" | cut -c1-160
    done ;;
  plan)
    timeout 200 python benchmarks/gpu_smoke.py --out "$out/smoke_plan.json" > "$out/smoke_plan.log" 2>&1
    tail -3 "$out/smoke_plan.log" | cut -c1-700
    timeout 200 python -m pytest -q -x -p no:cacheprovider tests/backends/triton/test_buffer_plan.py \
      tests/backends/triton/test_executor.py tests/backends/triton/test_streams.py > "$out/pytest_plan.log" 2>&1
    tail -3 "$out/pytest_plan.log" ;;
  planvariants)
    timeout 530 python benchmarks/decode_variants.py --preset flash-slice --target "$target" --precisions bf16,fp8 \
      --variants kernels+streams,kernels+streams-noplan,kernels,kernels-noplan,compiled --rounds 3 \
      --out "$out/variants_plan.json" > "$out/variants_plan.log" 2>&1
    tail -30 "$out/variants_plan.log" ;;
  exactness)
    timeout 200 python benchmarks/gpu_smoke.py --out "$out/smoke.json" > "$out/smoke.log" 2>&1; tail -3 "$out/smoke.log"
    timeout 120 python -m pytest -q -x -p no:cacheprovider tests/backends/triton/test_norm_mhc_rope_kernels.py \
      tests/backends/triton/test_executor.py -k "rope or fuse or match_reference" > "$out/pytest_rope.log" 2>&1
    tail -2 "$out/pytest_rope.log"
    timeout 300 python -m pytest -q -x -p no:cacheprovider tests/backends/triton/test_packed_kernels.py \
      tests/backends/triton/test_moe_kernels.py > "$out/pytest.log" 2>&1; tail -3 "$out/pytest.log" ;;
  profile)
    for p in bf16 fp8 "$head_table"; do
      n=$(basename "$p" .json)
      timeout 170 python benchmarks/profile_step.py --preset flash-slice --backends compiled --no-prefill \
        --target "$target" --precision "$p" --out "$out/prof_$n.json" > "$out/prof_$n.log" 2>&1
      grep -v Warn "$out/prof_$n.log" | head -20
    done
    rm -f "$out"/*trace.json ;;
  variants)
    timeout 500 python benchmarks/decode_variants.py --preset flash-slice --target "$target" \
      --precisions "bf16,fp8,$head_table" --variants compiled --out "$out/variants.json" > "$out/variants.log" 2>&1
    tail -22 "$out/variants.log" ;;
  pdl)
    timeout 500 python benchmarks/decode_variants.py --preset flash-slice --target "$target" \
      --precisions bf16,fp8 --variants compiled,compiled-nopdl --out "$out/variants_pdl.json" > "$out/variants_pdl.log" 2>&1
    tail -22 "$out/variants_pdl.log" ;;
  peers)
    timeout 540 python benchmarks/gpu_peers.py --preset flash-slice --target "$target" --peers eager,compile \
      --out "$out/peers.json" > "$out/peers.log" 2>&1
    tail -30 "$out/peers.log" ;;
  tune)
    art=/tmp/ds4c_tune_flash_slice_fp8.ds4
    timeout 200 python -m ds4c.cli compile flash-slice --target "$target" --precision fp8 --weights reference \
      --max-context 4096 -o "$art" > "$out/tune.log" 2>&1
    timeout 380 python -m ds4c.cli tune "$art" --only row_gemv.pipeline,row_gemv.row_sums,moe_decode.row_pipeline >> "$out/tune.log" 2>&1
    cp "$art.tune.json" "$out/" 2>/dev/null; tail -8 "$out/tune.log" ;;
  kernels)
    timeout 250 python benchmarks/moe_decode_bench.py --target "$target" --out "$out/moe_decode.json" \
      > "$out/moe_decode.log" 2>&1; tail -4 "$out/moe_decode.log" | cut -c1-600
    timeout 320 python benchmarks/fp8_gemm_bench.py --rows 1 --target "$target" --shapes 129280x4096 8192x4096 \
      4096x8192 --out "$out/fp8_gemv.json" > "$out/fp8_gemv.log" 2>&1; grep -v Warn "$out/fp8_gemv.log" | cut -c1-400 ;;
  rowloop)
    timeout 540 python benchmarks/decode_variants.py --preset flash-slice --target "$target" \
      --precisions "fp8,$head_table,bf16" --variants compiled,compiled-rowloop0 --out "$out/variants_rowloop.json" \
      > "$out/variants_rowloop.log" 2>&1
    tail -22 "$out/variants_rowloop.log" ;;
  topk)
    timeout 150 python benchmarks/topk_bench.py --target "$target" --out "$out/topk.json" > "$out/topk.log" 2>&1
    grep -v Warn "$out/topk.log" | cut -c1-300
    timeout 400 python -u benchmarks/decode_variants.py --preset flash-slice --target "$target" --prompt 32768 \
      --synthetic-state --precisions bf16,fp8 --variants compiled,compiled-topk0 --out "$out/variants_topk_32k.json" \
      > "$out/variants_topk_32k.log" 2>&1
    tail -12 "$out/variants_topk_32k.log" ;;
  fusion)
    export TORCHINDUCTOR_CACHE_DIR=/tmp/ds4c_inductor_cache
    timeout 480 python -u benchmarks/decode_variants.py --preset flash-slice --target "$target" \
      --precisions "bf16,$head_table" --variants compiled-nonormrope,compiled --rounds 5 \
      --out "$out/variants_fusion.json" > "$out/variants_fusion.log" 2>&1
    tail -14 "$out/variants_fusion.log"
    # the generated wrappers + kernels of the decode graphs (the files naming the ds4c::fused calls)
    grep -rl "ds4c.fused" "$TORCHINDUCTOR_CACHE_DIR" --include=*.py 2>/dev/null | head -12 | \
      tar czf "$out/inductor_code.tgz" -T - 2>/dev/null; ls -la "$out" ;;
esac
