#!/usr/bin/env bash
# Benchmarks of issue 4 on the GPU machine, in one device call: install the carried wheels, make the random
# checkpoints in /tmp, run the chosen stages, and leave the results and the log under $OUT: results.jsonl
# (one JSON summary per run, appended), gpu_bench.log, correctness.json, serve_sweep.csv/.png (5 files at
# most: the device tool brings back 8).
#
#   scripts/gpu_bench.sh [STAGE ...]          (no stage: correctness)
#
# Through the device tool: run(command="scripts/gpu_bench.sh STAGES", carry=[".whl"], timeout_s=600), .whl made
# here by ../shared/tools/gpu-wheels.sh. Each run inside has its own time limit, so one stuck engine costs
# minutes, not the call. Estimates (not yet measured on a card; the engine's start-up dominates small stages):
#   correctness ~3-4 min, latency ~4-5, throughput-8b-prefill ~4-6, throughput-8b-decode ~4-6,
#   throughput-qwen3 ~4-5, serve ~5; so pair at most two short ones per call, and HF=0 saves 1-2 min a stage.
#
# Stages:
#   smoke                  scripts/gpu_smoke.py --quick: float32 greedy tokens equal transformers' (small random
#                          Llama, Qwen3), CUDA graphs and eager, overlapped steps on; smoke.json (~1.5 min)
#   attention              scripts/bench_attention.py: our attention kernels vs torch SDPA; attention.json; then
#                          decode time per split count (--decode-sweep, incl. an 8B TP=2 rank) to results.jsonl
#   attn-tiles             one GPU: decode attention's time per tile config (BLOCK_N, warps, stages) at 16-256
#                          sequences of 128-384 tokens, Llama-8B and its TP=2 rank, 1 split and the kernel's own
#   gemm-alt               one GPU: batch-64 matmuls (TP=2 and TP=1 slices): cuBLAS as the engine calls it, cuBLAS on
#                          weights stored [K, N], torch.compile max-autotune (inductor's Triton templates vs cuBLAS)
#   push-ab                2 GPUs: row-parallel matmuls pushing their rows into the fused all-reduce's slots: GPU tests,
#                          TP=2 bf16 greedy == TP=1, 8B TP=1 and TP=2 (push on / off) at batch 1 and 64 (~9 min)
#   push-tp1               2 GPUs: TP=2 float32 greedy == TP=1 (8B shape, 8 layers) through the push, the GEMV's tile rows
#                          at 17-32 rows, 8B TP=1 with the row-parallel GEMV on / off, TP=2 (~8 min)
#   push-small             2 GPUs: 8B TP=1 at batch 1, 16, 64 and TP=2 at 1, 16, 24, 64, the row-parallel GEMV on (and
#                          TP=2 at 16, 24 off) (~4 min)
#   gated-ab               2 GPUs: gate_up + SiLU-and-mul as one GEMV launch: GEMV GPU tests, sweep vs cuBLAS + activation,
#                          attention split counts at TP=2 batch 64, 8B TP=1 / TP=2 b1, 16, 64 gated on / off (~9 min)
#   gated-ab2              2 GPUs: gated_config's launches: gated GPU tests, 8B TP=2 / TP=1 b1, 16, 64 gated on / off, a TP=2
#                          batch-1 profile with it on (~8 min)
#   gated-final            2 GPUs: gated GPU tests, TP=2 float32 greedy == TP=1 through it, 8B batch-64 A/B alternating (~9 min)
#   reduce-ab              2 GPUs: o_proj / down_proj all-reducing their own rows: GPU tests, the matmul + all-reduce +
#                          norm paths timed over 2 GPUs, 8B TP=2 batch 64 A/B alternating, TP=1 batch 64 (~8.5 min)
#   qkv-rope-tp2           2 GPUs: GEMV / qkv + RoPE GPU tests, TP=2 float32 greedy == TP=1 through qkv_rope_gemv, 8B TP=2
#                          batch 64 with it on / off, twice (~7 min)
#   reduce-ab2             2 GPUs: TP=2 float32 greedy == TP=1 through it, 8B TP=2 batch 1 and 16 A/B (~6 min)
#   push-final             2 GPUs: TP=2 float32 greedy == TP=1 through the push, the all-reduce / GEMV GPU tests, 8B TP=1
#                          (row-parallel GEMV on / off) and TP=2 at batch 1, 16, 64 (~9 min)
#   gemm-kn                one GPU: cuBLAS on weights [N, K] (TN, the engine's) vs [K, N] (NN) at 1-256 rows, TP=1/2/4
#   kernels                the kernel tests on the GPU (tests/kernels, fused elementwise path, the sampler on
#                          its kernel; pytest from the carried .whl/), scripts/bench_elementwise.py and
#                          scripts/bench_sampling.py; kernels.txt
#   decode                 tests/kernels/test_decode_attention.py on the GPU and scripts/bench_gemv.py (K unsplit, split
#                          2 and 4 ways); kernels.txt
#   gemv                   test_gemv.py on the GPU, then Llama-8B batch 1 with cuBLAS / the GEMV / split-K 2 / 4
#   checkpoints            write full random safetensors checkpoints (Llama-3.1-8B, Qwen3-0.6B shapes, bf16);
#                          later stages of the same call then load them from disk. Without this stage both
#                          backends use random weights from config.json alone (--load-format dummy): speed
#                          does not depend on the values, and no 16 GB need be written.
#   correctness            greedy tokens of pagedserve vs transformers on small random checkpoints on the GPU:
#                          float32 (must be identical) and bfloat16 (where they part, our token must be in
#                          transformers' top 5: a near-tie); correctness.json
#   latency                batch 1, 128 in, 512 out: Llama-3.1-8B and Qwen3-0.6B, pagedserve and hf
#   pdl                    smoke with PAGEDSERVE_PDL=1 (float32 greedy == transformers; the GEMV takes only bf16 /
#                          fp16, so its check is tests/kernels/test_gemv.py in `kernels`), then batch-1 latency, HF not run: Llama-8B with PDL off / on / on + few-row GEMV /
#                          TORCH_BLAS_PREFER_CUBLASLT=1, Qwen3 off / on / on + GEMV, Llama off / on again (~9 min)
#   throughput-8b-prefill  1000 x (1024 in, 128 out), pagedserve; hf on 64 of them in one static batch
#   throughput-8b-decode   256 x (128 in, 1024 out), pagedserve; hf on 64 of them in one static batch
#   throughput-qwen3       256 x (uniform 100-1024 in and out) and 1000 x (1024, 128), pagedserve; hf on 64
#   serve                  bench_serve sweep over concurrency 1,4,16,64 (Llama-3.1-8B, 512 in, 128 out):
#                          pagedserve at every level, hf (one request at a time) at 1 and 4; CSV + PNG
#   tp-vs-vllm             2+ GPUs: GPU.md's vLLM TP=2 workloads (8B 256 x (128, 1024), 1000 x (1024, 128),
#                          batch 1; 70B 256 x (128, 512), batch 1 x 256 out) via bench_throughput / bench_latency
#   qwen3-ab               Qwen3 batch-1 latency: this tree, the tree in ./old (if carried), PDL off
#   tp-decode              the 8B TP=1 / TP=2 decode comparison of `tp` alone (tp2_8b.json)
#   tp-vs-vllm-8b          the 8B rows of tp-vs-vllm only
#   tp-ab                  2+ GPUs: tp-fused's checks, then this tree vs ./old: all-reduce tables, 8B TP=2 decode
#   tp-card                2+ GPUs: the fused all-reduce's GPU tests, TP=2 greedy == TP=1, all-reduce table, 8B
#                          decode TP=1 / TP=2 at batch 1, 64, 256 (for a second card kind)
#   tp-close               2+ GPUs: 8B-shaped float32 greedy TP=2 == TP=1, 8B decode TP=1 / TP=2 with / without prefetch
#   tp-prof                2+ GPUs: 8B decode TP=1 / TP=2 at batch 64, then both under the profiler (tables in the log)
#   pytest                 pytest $PYTEST_ARGS on the GPU machine (the carried wheels' pytest)
#   verify                 every kernel test, the symmetric all-reduce tests (2+ GPUs): the final tree's GPU tests
#   tp-trace               2+ GPUs: 8B TP=2 batch 64 profiled for 20 steps; both ranks' timelines to $OUT
#   prefetch-ab            2+ GPUs: the weight prefetch's GPU tests, 8B TP=1 / TP=2 with and without it, greedy check
#   lamport-ab             2+ GPUs: the fused all-reduce polling its rows (no flags) vs flags: tests, tables, 8B TP=2 b64
#   lamport-close          2+ GPUs: GPU tests of both protocols, 8B-shaped float32 greedy, 8B TP=1 / TP=2 b1 + b64, flags b64
#   embed-ab               2+ GPUs: the embedding fused with its all-reduce and norm vs ./old: tests, 8B TP=2 b64 A/B, TP=1 / TP=2
#   tp-sampled             2+ GPUs: 8B TP=1 / TP=2 decode at batch 1 and 64, greedy and sampled (temperature, top-p)
#   sampled-ab             2+ GPUs: the sampler without host syncs vs ./old: tests, bench_sampling, 8B TP=1 / TP=2 greedy + sampled
#   top-p                  2+ GPUs: the top-p search's tests, bench_sampling, 8B TP=1 / TP=2 greedy + sampled, sampled with the sort
#   race                   one GPU: the Gumbel-race draw vs ./old: sampling GPU tests, bench_sampling, 8B TP=1 greedy /
#                          top-p / temperature-alone decode A/B
#   tp2-ab                 2+ GPUs: 8B TP=2 decode b1 + b64 in each tree of AB_TREES (e.g. the graph-tail branch in ./gt)
#   greedy-ab              2+ GPUs: the greedy keys' GPU tests (+ the sampler's), small TP=2 float32 greedy == TP=1,
#                          8B TP=2 decode b1 + b64 vs ./old (AB_TREES), TP=1 here for the ratio
#   ar-ab                  2+ GPUs: the fused all-reduce's GPU tests, small TP=2 float32 greedy == TP=1, 8B TP=2 b64 vs
#                          ./old (AB_TREES, default "new old"), TP=1 b64, then this tree's TP=2 timeline (tp-trace)
#   rope-ab                2+ GPUs: RoPE + K/V write inside decode attention: GPU tests, smoke, 8B TP=1 b1 + b64 and
#                          TP=2 b64 with PAGEDSERVE_ROPE_IN_ATTENTION=1 / 0
#   rank-emu               one GPU: 8B TP=1 batch 64, then a TP=2 rank's slices as a whole model (8b-rank2) at batch 64
#                          twice: a TP=2 step without its collectives (~3.5 min)
#   attn-ab1               one GPU: decode attention tests, ./old vs this tree on 8b-rank2 b64 (x2) and 8B TP=1 b64 (~5 min)
#   smoke-wide             one GPU: float32 greedy of 32 prompts at once == transformers, hidden-2048 Llama / Qwen2 (~2.5 min)
#   rank-steps             one GPU: 8b-rank2 and 8B TP=1 b64 under the worker's step timer (GPU gap, CPU phases) (~2.5 min)
#   qkv-rope-ab1           one GPU: qkv + RoPE + K/V write in one launch: GPU tests, smoke-wide, 8B TP=1 b64 + b32 and
#                          8b-rank2 b64 with it on / off, twice (~9.5 min)
#   qkv-rope-rank          one GPU: 8b-rank2 b64 with the qkv + RoPE launch on / off, alternating, three pairs (~3.5 min)
#   rank-prof              one GPU: 8b-rank2 and 8B TP=1 at batch 64 under the profiler: per-kernel tables (~3 min)
#   reduce-one             one GPU: reduce_gemv on two streams of one GPU (its epilogue on real memory), sweep_gemv.py
#                          --reduce (cuBLAS + fused / push + poll / reduce + norm at world size 1) (~3 min)
#   rope-small             one GPU: 8B TP=1 b1 + b16 with PAGEDSERVE_ROPE_IN_ATTENTION=1 / 0
#   greedy-ab1             one GPU: 8B TP=1 decode b1 + b64 vs ./old (AB_TREES), then the top-p pivot table
#   top-p-pivots           one GPU: the top-p search's time at 16 / 8 / 4 / 2 pivots a pass (bench_top_p.py)
#   tp4-close              4 GPUs: symmetric all-reduce GPU tests (2 and 4 ranks), TP=4 greedy == TP=1, 70B TP=4, 8B TP=1 / TP=2
#   gemm64                 2+ GPUs: the GEMV over 16 rows: GPU tests, bench_gemm vs cuBLAS, 8B TP=1 / TP=2 batch 64
#   gemm-tunable           bench_gemm.py (cuBLAS / cuBLASLt / TunableOp), 8B TP=1 / TP=2 batch 64 with TunableOp off / on
#   tp-final               4 GPUs: tp-fused's tests and 8B rows, 70B TP=4 256 x (128, 512), a TP=2 batch-64 profile
#   tp-fused               2+ GPUs: the fused all-reduce + RMSNorm's GPU tests, TP=2 float32 greedy == TP=1,
#                          per-call timings next to one-shot + norm, 8B decode TP=1 / TP=2 unfused / fused
#   tp                     a multi-GPU kind only: the symmetric-memory all-reduce GPU test, TP=2 greedy vs
#                          TP=1 (small Llama, float32), 8B decode TP=1 / TP=2 NCCL / TP=2 symmetric memory
#                          at batch 1, 64, 256 (tp2_8b.json), and with 4+ GPUs the Llama-3.1-70B shape at
#                          TP=4 through bench_throughput, 256 x (128, 512) (~5 min in all on 4 x H200)
# Environment: OUT (results; default /tmp/gpu_bench_out), PYTHON (default python3), HF=0 skips the hf runs,
# PS=0 skips the pagedserve runs (to put the hf baselines after all pagedserve runs of a call),
# BUDGET_S (seconds all runs must end within, default 560: later runs are cut short or skipped),
# ENGINE_ARGS (extra flags for every pagedserve run, e.g. "--enforce-eager --attention-backend torch").
# The engine's own switches pass through too: PAGEDSERVE_STEP_TIMING=1 (per-step timing in the log),
# PAGEDSERVE_TORCH_PROFILER_DIR=$OUT/prof (per-kernel profile of steps 100-149 in the log and there).
set -uo pipefail  # no -e: a failed run is logged and the next one still runs

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-/tmp/gpu_bench_out}"
RUNS=/tmp/pb_runs  # one JSON per run; each is also appended to $OUT/results.jsonl
mkdir -p "$OUT" "$RUNS"
exec > >(tee -a "$OUT/gpu_bench.log") 2>&1
PY="${PYTHON:-python3}"
HF="${HF:-1}"
PS="${PS:-1}"
ENGINE_ARGS="${ENGINE_ARGS:-}"
LOAD=dummy
LLAMA="${LLAMA:-/tmp/pb_llama-3.1-8b}"
QWEN="${QWEN:-/tmp/pb_qwen3-0.6b}"
COMMON="--dtype bfloat16 --max-model-len 4096 --max-num-seqs 256 --gpu-memory-utilization 0.9"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if ! "$PY" -c "import msgspec, zmq" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "pyzmq/msgspec missing and no .whl/ carried (run ../shared/tools/gpu-wheels.sh here, carry .whl)"; exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$root:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

# Every run must end by the deadline, so the call (10 minutes at most) still ends with its summary.
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-560} ))

# run SECONDS CMD...: one logged command under a time limit; a failure is reported, not fatal.
run() {
  local limit=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 30 ]; then echo "!! SKIPPED (BUDGET_S spent): $*"; return 0; fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "+ [$(date +%T)] (limit ${limit}s) $*"
  timeout -k 15 "$limit" "$@"
  local rc=$?
  [ $rc -eq 0 ] || echo "!! FAILED (exit $rc): $*"
  return 0
}

# /tmp/pb_old_py ARGS...: python in the tree extracted to ./old, from inside it: the engine's child processes of that
# tree (`python -m` before the spawn fix) import from the working directory first, so run from here they
# would load this tree's code.
# (A script, not a function: `run` hands its command to timeout.)
printf '#!/usr/bin/env bash\ncd "%s/old" && PYTHONPATH="%s/old:/tmp/site" exec "%s" "$@"\n' "$root" "$root" "$PY" > /tmp/pb_old_py
# /tmp/pb_tree_py DIR ARGS...: the same in any tree extracted to ./DIR
printf '#!/usr/bin/env bash\nd="%s/$1"; shift\ncd "$d" && PYTHONPATH="$d:/tmp/site" exec "%s" "$@"\n' "$root" "$PY" > /tmp/pb_tree_py
chmod +x /tmp/pb_old_py /tmp/pb_tree_py

collect() {  # collect NAME: append the run's JSON summary to $OUT/results.jsonl
  [ -f "$RUNS/$1.json" ] && sed "s/^{/{\"run\": \"$1\", /" "$RUNS/$1.json" >> "$OUT/results.jsonl"
  return 0
}

# model ARCH DIR: a checkpoint dir to benchmark (config + tokenizer, or full weights after the checkpoints stage).
model() {
  local arch=$1 dir=$2
  if [ "$LOAD" = auto ] && ! ls "$dir"/*.safetensors >/dev/null 2>&1; then
    run 300 "$PY" scripts/make_random_checkpoint.py --arch "$arch" --out "$dir"
  elif [ ! -f "$dir/config.json" ]; then
    run 120 "$PY" scripts/make_random_checkpoint.py --arch "$arch" --out "$dir" --config-only
  fi
}

tp() {  # tp NAME BACKEND ARGS...: bench_throughput with the common flags, JSON to $OUT/NAME.json
  local name=$1 backend=$2; shift 2
  [ "$backend" = hf ] && [ "$HF" = 0 ] && return 0
  [ "$backend" = pagedserve ] && [ "$PS" = 0 ] && return 0
  local extra=""; [ "$backend" = pagedserve ] && extra="$ENGINE_ARGS"
  # shellcheck disable=SC2086
  run 420 "$PY" scripts/bench_throughput.py --backend "$backend" --load-format "$LOAD" $COMMON $extra \
    --disable-tqdm --output-json "$RUNS/$name.json" "$@"
  collect "$name"
}

lat() {  # lat NAME BACKEND MODEL ARGS...
  local name=$1 backend=$2 dir=$3; shift 3
  [ "$backend" = hf ] && [ "$HF" = 0 ] && return 0
  [ "$backend" = pagedserve ] && [ "$PS" = 0 ] && return 0
  local extra=""; [ "$backend" = pagedserve ] && extra="$ENGINE_ARGS"
  # shellcheck disable=SC2086
  run 300 "$PY" scripts/bench_latency.py --backend "$backend" --model "$dir" --load-format "$LOAD" --dtype bfloat16 \
    --input-len 128 --output-len 512 $extra --output-json "$RUNS/$name.json" "$@"
  collect "$name"
}

stage_smoke() {
  run 240 "$PY" scripts/gpu_smoke.py "$OUT" --quick
}

stage_attention() {
  run 150 "$PY" scripts/bench_attention.py --output-json "$OUT/attention.json"
  run 150 "$PY" scripts/bench_attention.py --decode-sweep --output-json "$RUNS/attention_sweep.json"
  collect attention_sweep
}

stage_attn-tiles() {  # one GPU: decode attention's tile configs at batch-64-like shapes, 1 split (~3 min)
  run 300 "$PY" scripts/bench_attention.py --decode-sweep --sweep-splits auto 1 \
    --sweep-cases 16x256 32x256 64x128 64x256 64x384 128x256 256x256 \
    --sweep-configs 32,4,2 64,4,1 64,4,2 64,8,2 64,4,3 128,4,1 128,8,1 128,4,2 128,8,2 256,8,1 \
    --output-json "$RUNS/attention_tiles.json"
  collect attention_tiles
}

stage_gemm-alt() {  # one GPU: batch-64 matmuls through cuBLAS (TN), cuBLAS on [K, N] weights (NN), inductor max-autotune
  run 480 "$PY" scripts/bench_gemm.py --rows 64 --tp 2 1 --backends cublas kn inductor 2>&1 \
    | grep -v "^\s*$" | grep -E "^ *[0-9]|^tp|AUTOTUNE|triton_mm|mm [0-9]|Error|error" | head -120
}

stage_gemm-kn() {  # one GPU: cuBLAS on [N, K] weights (TN, as the engine calls it) vs [K, N] (NN), 1-256 rows
  run 300 "$PY" scripts/bench_gemm.py --rows 1 16 64 128 256 --tp 1 2 4 --backends cublas kn kn cublas
}

stage_kernels() {
  run 240 "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/gpu_workers/test_elementwise.py \
    tests/gpu_workers/test_sampler_triton.py 2>&1 \
    | tail -25 | tee -a "$OUT/kernels.txt"
  run 120 "$PY" scripts/bench_elementwise.py 2>&1 | tee -a "$OUT/kernels.txt"
  run 120 "$PY" scripts/bench_sampling.py 2>&1 | tee -a "$OUT/kernels.txt"
}

stage_decode() {  # the decode attention GPU tests and the few-row GEMV vs cuBLAS per projection (~1 min)
  run 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py 2>&1 | tail -5 | tee -a "$OUT/kernels.txt"
  run 120 "$PY" scripts/bench_gemv.py --split-k 2 4 2>&1 | tee -a "$OUT/kernels.txt"
}

stage_gemv() {  # batch-1 Llama-8B: cuBLAS (the default) vs the GEMV with K unsplit / split 2 / 4 ways (~4 min)
  model llama-3.1-8b "$LLAMA"
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  lat latency_llama8b_cublas pagedserve "$LLAMA" --num-iters 3
  PAGEDSERVE_SMALL_GEMV=1 lat latency_llama8b_gemv pagedserve "$LLAMA" --num-iters 3
  PAGEDSERVE_SMALL_GEMV=1 PAGEDSERVE_GEMV_SPLIT_K=2 lat latency_llama8b_gemv_split2 pagedserve "$LLAMA" --num-iters 3
  PAGEDSERVE_SMALL_GEMV=1 PAGEDSERVE_GEMV_SPLIT_K=4 lat latency_llama8b_gemv_split4 pagedserve "$LLAMA" --num-iters 3
}

stage_checkpoints() {
  LOAD=auto
  model llama-3.1-8b "$LLAMA"
  model qwen3-0.6b "$QWEN"
}

stage_correctness() {
  local f32=/tmp/pb_check_smollm2_f32 q3=/tmp/pb_check_qwen3_f32 l8=/tmp/pb_check_llama8b_2l
  [ -f $f32/model.safetensors ] || run 120 "$PY" scripts/make_random_checkpoint.py --arch smollm2-135m --num-layers 4 \
    --dtype float32 --init-std 0.1 --out $f32
  [ -f $q3/model.safetensors ] || run 120 "$PY" scripts/make_random_checkpoint.py --arch qwen3-0.6b --num-layers 2 \
    --dtype float32 --init-std 0.08 --out $q3
  [ -f $l8/model.safetensors ] || run 120 "$PY" scripts/make_random_checkpoint.py --arch llama-3.1-8b --num-layers 2 \
    --dtype bfloat16 --init-std 0.05 --out $l8
  # shellcheck disable=SC2086
  run 420 "$PY" - "$OUT/correctness.json" $f32 $q3 $l8 <<'EOF'
"""pagedserve vs transformers, greedy, on the GPU. float32: identical tokens. bfloat16: tokens may part at a
near-tie, as in vLLM's tests: where they first differ, ours must be in transformers' top 5 there."""
import json, sys, torch
from frontend import LLM, SamplingParams
from transformers import AutoModelForCausalLM
out_path, paths = sys.argv[1], sys.argv[2:]
NEW, LENS = 32, [5, 40, 200, 700]  # prompt lengths: one block, several, and a chunk-sized one
results, ok = {}, True
for path in paths:
    vocab = json.load(open(f"{path}/config.json"))["vocab_size"]
    prompts = [torch.randint(3, min(vocab, 30000), (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in LENS]
    for dtype in ("float32", "bfloat16"):
        with LLM(path, dtype=dtype, max_model_len=1024, gpu_memory_utilization=0.4) as llm:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).cuda().eval()
        prefix, ranks = [], []
        for p, o in zip(prompts, outs):
            ids, ours = torch.tensor([p], device="cuda"), list(o.outputs[0].token_ids)
            with torch.inference_mode():
                g = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                                do_sample=False, output_scores=True, return_dict_in_generate=True)
            ref = g.sequences[0, len(p):].tolist()
            n = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), NEW)
            prefix.append(n)
            if n < NEW:  # rank of our token among transformers' logits at the first difference
                ranks.append(int((g.scores[n][0] > g.scores[n][0, ours[n]]).sum()))
        del hf; torch.cuda.empty_cache()
        passed = all(n == NEW for n in prefix) if dtype == "float32" else all(r < 5 for r in ranks)
        ok &= passed
        key = f"{path.split('/')[-1]}/{dtype}"
        results[key] = {"matching_prefix_per_prompt": prefix, "of": NEW, "prompt_lens": LENS,
                        "rank_of_ours_at_first_difference": ranks, "pass": passed}
        print(f"{key:34s} matching prefix {prefix} of {NEW}, our rank where they part {ranks}: "
              f"{'PASS' if passed else 'FAIL'}", flush=True)
json.dump({"card": torch.cuda.get_device_name(), "results": results, "pass": ok}, open(out_path, "w"), indent=1)
sys.exit(0 if ok else 1)
EOF
}

stage_latency() {
  model llama-3.1-8b "$LLAMA"
  model qwen3-0.6b "$QWEN"
  lat latency_llama8b_pagedserve pagedserve "$LLAMA" --num-iters 3
  lat latency_llama8b_hf hf "$LLAMA" --num-iters 1 --warmup-output-len 8
  lat latency_qwen3_pagedserve pagedserve "$QWEN" --num-iters 3
  lat latency_qwen3_hf hf "$QWEN" --num-iters 1 --warmup-output-len 8
}

stage_pdl() {  # batch-1 knobs: programmatic dependent launch, the few-row GEMV, torch's cuBLASLt path
  model llama-3.1-8b "$LLAMA"
  model qwen3-0.6b "$QWEN"
  PAGEDSERVE_PDL=1 run 240 "$PY" scripts/gpu_smoke.py "$OUT" --quick
  PAGEDSERVE_PDL=0 lat latency_llama8b_pdl0 pagedserve "$LLAMA" --num-iters 3
  PAGEDSERVE_PDL=1 lat latency_llama8b_pdl1 pagedserve "$LLAMA" --num-iters 3
  PAGEDSERVE_PDL=1 PAGEDSERVE_SMALL_GEMV=1 lat latency_llama8b_pdl1_gemv pagedserve "$LLAMA" --num-iters 3
  TORCH_BLAS_PREFER_CUBLASLT=1 lat latency_llama8b_cublaslt pagedserve "$LLAMA" --num-iters 3
  PAGEDSERVE_PDL=0 lat latency_qwen3_pdl0 pagedserve "$QWEN" --num-iters 3
  PAGEDSERVE_PDL=1 lat latency_qwen3_pdl1 pagedserve "$QWEN" --num-iters 3
  PAGEDSERVE_PDL=1 PAGEDSERVE_SMALL_GEMV=1 lat latency_qwen3_pdl1_gemv pagedserve "$QWEN" --num-iters 3
  PAGEDSERVE_PDL=0 lat latency_llama8b_pdl0 pagedserve "$LLAMA" --num-iters 3  # a second round, budget allowing
  PAGEDSERVE_PDL=1 lat latency_llama8b_pdl1 pagedserve "$LLAMA" --num-iters 3
}

stage_throughput-8b-prefill() {
  model llama-3.1-8b "$LLAMA"
  tp tput_llama8b_1000x1024x128_pagedserve pagedserve --model "$LLAMA" --num-prompts 1000 --input-len 1024 --output-len 128
  tp tput_llama8b_1000x1024x128_hf64 hf --model "$LLAMA" --num-prompts 64 --hf-batch-size 64 --input-len 1024 --output-len 128
}

stage_throughput-8b-decode() {
  model llama-3.1-8b "$LLAMA"
  tp tput_llama8b_256x128x1024_pagedserve pagedserve --model "$LLAMA" --num-prompts 256 --input-len 128 --output-len 1024
  tp tput_llama8b_256x128x1024_hf64 hf --model "$LLAMA" --num-prompts 64 --hf-batch-size 64 --input-len 128 --output-len 1024
}

stage_throughput-qwen3() {
  model qwen3-0.6b "$QWEN"
  local uniform=(--input-len-range 100 1024 --output-len-range 100 1024)
  tp tput_qwen3_256xuniform_pagedserve pagedserve --model "$QWEN" --num-prompts 256 "${uniform[@]}"
  tp tput_qwen3_1000x1024x128_pagedserve pagedserve --model "$QWEN" --num-prompts 1000 --input-len 1024 --output-len 128
  tp tput_qwen3_256xuniform_hf64 hf --model "$QWEN" --num-prompts 64 --hf-batch-size 64 "${uniform[@]}"
}

stage_serve() {
  model llama-3.1-8b "$LLAMA"
  local backends=pagedserve; [ "$HF" = 0 ] || backends=pagedserve,hf
  # shellcheck disable=SC2086
  run 480 "$PY" scripts/bench_serve.py --backend $backends --model "$LLAMA" --input-len 512 --output-len 128 \
    --num-prompts 32 --sweep-concurrency 1,4,16,64 --hf-num-prompts 4 --hf-sweep-concurrency 1,4 \
    --server-arg=--load-format=$LOAD --server-arg=--dtype=bfloat16 --server-arg=--max-model-len=4096 \
    $(for a in $ENGINE_ARGS; do printf -- '--server-arg=%s ' "$a"; done) \
    --server-log "$RUNS/serve_server.log" --output-json "$RUNS/serve_sweep.json" \
    --sweep-csv "$OUT/serve_sweep.csv" --sweep-png "$OUT/serve_sweep.png"
  collect serve_sweep
}

stage_tp-vs-vllm() {  # 2+ GPUs: the workloads of GPU.md's vLLM tensor-parallel table, at TP=2 (~6 min)
  model llama-3.1-8b "$LLAMA"
  model llama-3.1-70b /tmp/pb_llama-3.1-70b
  tp tput_llama8b_tp2_256x128x1024_pagedserve pagedserve --model "$LLAMA" --tensor-parallel-size 2 \
    --num-prompts 256 --input-len 128 --output-len 1024
  tp tput_llama8b_tp2_1000x1024x128_pagedserve pagedserve --model "$LLAMA" --tensor-parallel-size 2 \
    --num-prompts 1000 --input-len 1024 --output-len 128
  lat latency_llama8b_tp2_pagedserve pagedserve "$LLAMA" --num-iters 3 --tensor-parallel-size 2
  tp tput_llama70b_tp2_256x128x512_pagedserve pagedserve --model /tmp/pb_llama-3.1-70b --tensor-parallel-size 2 \
    --num-prompts 256 --input-len 128 --output-len 512
  lat latency_llama70b_tp2_pagedserve pagedserve /tmp/pb_llama-3.1-70b --num-iters 2 --output-len 256 \
    --tensor-parallel-size 2
}

stage_qwen3-ab() {  # batch-1 Qwen3 latency, this tree vs an older one extracted to ./old (git archive REV | tar -x -C old)
  model qwen3-0.6b "$QWEN"
  lat latency_qwen3_pagedserve pagedserve "$QWEN" --num-iters 3
  if [ -d old/scripts ]; then
    run 300 /tmp/pb_old_py scripts/bench_latency.py --backend pagedserve --model "$QWEN" \
      --load-format "$LOAD" --dtype bfloat16 --input-len 128 --output-len 512 --num-iters 3 --output-json "$RUNS/latency_qwen3_old.json"
    collect latency_qwen3_old
  fi
  PAGEDSERVE_PDL=0 lat latency_qwen3_pdl0 pagedserve "$QWEN" --num-iters 3
}

tp_checks() {  # 2+ GPUs: the symmetric all-reduce's GPU tests, then TP=2 float32 greedy == TP=1 (small Llama)
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_symm_all_reduce.py 2>&1 | tail -5
  run 120 "$PY" scripts/gpu_tp_check.py --size small --tp 2 --skip-throughput --dtype float32 \
    --out "$OUT/tp2_small_greedy.json"
}

ar_bench() {  # 2+ GPUs: one all-reduce's time per path and message size (tp2_ar_bench.json)
  run 100 "$PY" scripts/gpu_tp_check.py --tp 2 --all-reduce-bench --skip-greedy --skip-throughput --out "$OUT/tp2_ar_bench.json"
}

stage_tp-decode() {  # 8B decode TP=1 vs TP=2 (the default all-reduce) at batch 1, 64, 256 (~3 min)
  PAGEDSERVE_STEP_TIMING=1 run 200 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --output-len 256 \
    --budget-s 160 --out "$OUT/tp2_8b.json"
}

stage_tp-vs-vllm-8b() {  # the 8B rows of tp-vs-vllm: 256 x (128, 1024), batch 1, 1000 x (1024, 128) at TP=2
  model llama-3.1-8b "$LLAMA"
  tp tput_llama8b_tp2_256x128x1024_pagedserve pagedserve --model "$LLAMA" --tensor-parallel-size 2 \
    --num-prompts 256 --input-len 128 --output-len 1024
  lat latency_llama8b_tp2_pagedserve pagedserve "$LLAMA" --num-iters 3 --tensor-parallel-size 2
  tp tput_llama8b_tp2_1000x1024x128_pagedserve pagedserve --model "$LLAMA" --tensor-parallel-size 2 \
    --num-prompts 1000 --input-len 1024 --output-len 128
}

stage_tp-fused() {  # 2+ GPUs: the fused all-reduce + RMSNorm: GPU tests, TP=2 float32 greedy == TP=1, per-call
  # timings, then 8B decode TP=1 / TP=2 reduce-then-norm / TP=2 fused at batch 1, 64, 256 (~9 min)
  tp_checks
  ar_bench
  PAGEDSERVE_STEP_TIMING=1 run 290 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --compare-fused \
    --output-len 256 --budget-s 220 --out "$OUT/tp2_8b.json"
}

stage_tp-ab() {  # 2+ GPUs: the tp-fused checks, then this tree against ./old (git archive REV | tar -x -C old, carried):
  # the all-reduce table of each, and 8B decode TP=1 / TP=2 at batch 1 and 64 here, TP=2 at 64 there (~9 min)
  tp_checks
  ar_bench
  [ -d old/scripts ] && run 90 /tmp/pb_old_py scripts/gpu_tp_check.py --tp 2 --all-reduce-bench \
    --skip-greedy --skip-throughput --workdir /tmp/gpu_tp_check_old --out "$OUT/tp2_ar_bench_old.json"
  PAGEDSERVE_STEP_TIMING=1 run 170 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 1 64 \
    --output-len 256 --budget-s 150 --out "$OUT/tp2_8b.json"
  [ -d old/scripts ] && PAGEDSERVE_STEP_TIMING=1 run 100 /tmp/pb_old_py scripts/gpu_tp_check.py \
    --size 8b --tp 2 --skip-greedy --skip-tp1 --batch-sizes 64 --output-len 256 --budget-s 80 \
    --workdir /tmp/gpu_tp_check_old --out "$OUT/tp2_8b_old.json"
}

stage_tp-card() {  # 2+ GPUs: the issue-5 rows on whatever card this is: the fused all-reduce's GPU tests, TP=2
  # float32 greedy == TP=1, the all-reduce table, 8B decode TP=1 / TP=2 at batch 1, 64, 256 (~6 min)
  tp_checks
  ar_bench
  PAGEDSERVE_STEP_TIMING=1 run 200 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --output-len 256 \
    --budget-s 180 --out "$OUT/tp2_8b.json"
}

stage_tp-close() {  # 2+ GPUs: what issue 5 still needs on an H200: TP=2 float32 greedy == TP=1 on the Llama-8B shape
  # (8 layers) through the fused all-reduce and its prefetch, and 8B decode TP=1 / TP=2 at batch 1 and 64 with
  # the prefetch (the default) and without it (~8 min)
  run 200 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --num-layers 8 --skip-throughput --dtype float32 \
    --out "$OUT/tp2_8b_greedy.json"
  PAGEDSERVE_STEP_TIMING=1 run 170 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 1 64 \
    --output-len 256 --budget-s 150 --out "$OUT/tp2_8b.json"
  PAGEDSERVE_PREFETCH_MB=0 run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 64 \
    --output-len 256 --budget-s 100 --out "$OUT/tp2_8b_noprefetch.json"
}

stage_tp-prof() {  # 2+ GPUs: 8B decode TP=1 / TP=2 at batch 64, then both again under the profiler (steps
  # 100-149 of each engine; the per-kernel tables land in the log) (~4 min)
  PAGEDSERVE_STEP_TIMING=1 run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 64 \
    --output-len 256 --budget-s 100 --out "$OUT/tp2_8b.json"
  PAGEDSERVE_TORCH_PROFILER_DIR=/tmp/prof run 150 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy \
    --batch-sizes 64 --output-len 256 --budget-s 130 --out /tmp/tp2_prof.json
}

stage_pytest() {  # pytest on the GPU machine with the carried wheels: PYTEST_ARGS="tests/... -k ..." (kernels.txt)
  run 540 "$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:?set PYTEST_ARGS} 2>&1 | tail -25 | tee -a "$OUT/kernels.txt"
}

stage_verify() {  # the final tree's GPU tests: every kernel test, the symmetric all-reduce tests (2+ GPUs), the
  # fused elementwise path and the sampler kernel (over 5 min on 2 x H200: 238 of 249 ran in 286 s; the
  # end-to-end check is `smoke`, ~2.5 min, in a call of its own)
  run 560 "$PY" -m pytest -q -p no:cacheprovider tests/kernels tests/gpu_workers/test_symm_all_reduce.py \
    tests/gpu_workers/test_elementwise.py tests/gpu_workers/test_sampler_triton.py 2>&1 | tail -25 | tee -a "$OUT/kernels.txt"
}

stage_tp-trace() {  # 2+ GPUs: 8B TP=2 batch 64 under the profiler for 20 steps; both ranks' timelines
  # (*.trace.json.gz) to $OUT (~2.5 min)
  rm -rf /tmp/prof
  PAGEDSERVE_TORCH_PROFILER_DIR=/tmp/prof PAGEDSERVE_TORCH_PROFILER_STEPS=100,20 run 150 "$PY" scripts/gpu_tp_check.py \
    --size 8b --tp 2 --skip-greedy --skip-tp1 --batch-sizes 64 --output-len 256 --out /tmp/tp2_prof.json
  cp /tmp/prof/*.trace.json.gz "$OUT"/
  if [ "${TRACE_TP1:-0}" = 1 ]; then  # TP=1's timeline too, as tp1-*.trace.json.gz
    rm -rf /tmp/prof1
    PAGEDSERVE_TORCH_PROFILER_DIR=/tmp/prof1 PAGEDSERVE_TORCH_PROFILER_STEPS=100,20 run 150 "$PY" \
      scripts/gpu_tp_check.py --size 8b --tp 1 --skip-tp1 --skip-greedy --batch-sizes 64 --output-len 256 --out /tmp/tp1_prof.json
    for f in /tmp/prof1/*.trace.json.gz; do cp "$f" "$OUT/tp1-$(basename "$f")"; done
  fi
}

stage_prefetch-ab() {  # 2+ GPUs: the weight prefetch (kernels/prefetch.py): the fused all-reduce's and decode
  # attention's GPU tests, 8B decode TP=1 / TP=2 at batch 1 and 64 with it, at 64 without it, TP=2 float32
  # greedy == TP=1 (~7 min)
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_symm_all_reduce.py \
    tests/kernels/test_decode_attention.py 2>&1 | tail -5
  PAGEDSERVE_STEP_TIMING=1 run 170 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 1 64 \
    --output-len 256 --budget-s 150 --out "$OUT/tp2_8b.json"
  PAGEDSERVE_PREFETCH_MB=0 PAGEDSERVE_STEP_TIMING=1 run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy \
    --batch-sizes 64 --output-len 256 --budget-s 100 --out "$OUT/tp2_8b_noprefetch.json"
  run 120 "$PY" scripts/gpu_tp_check.py --size small --tp 2 --skip-throughput --dtype float32 \
    --out "$OUT/tp2_small_greedy.json"
}

stage_lamport-ab() {  # 2+ GPUs: the fused all-reduce's flag-free protocol (the default) against the flags
  # ($PAGEDSERVE_FUSED_ALL_REDUCE_LAMPORT=0): its GPU tests, the all-reduce table of each, 8B decode TP=2 batch
  # 64 alternating, TP=1 once, TP=2 float32 greedy == TP=1 (~8 min)
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_symm_all_reduce.py 2>&1 | tail -3 \
    | tee -a "$OUT/kernels.txt"
  PAGEDSERVE_FUSED_ALL_REDUCE_LAMPORT=0 ar_bench
  run 100 "$PY" scripts/gpu_tp_check.py --tp 2 --all-reduce-bench --skip-greedy --skip-throughput \
    --out "$OUT/tp2_ar_bench_lamport.json"
  local lamport
  for lamport in 0 1 0 1; do
    echo "== PAGEDSERVE_FUSED_ALL_REDUCE_LAMPORT=$lamport"
    PAGEDSERVE_FUSED_ALL_REDUCE_LAMPORT=$lamport run 80 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy \
      --skip-tp1 --batch-sizes 64 --output-len 256 --out "/tmp/tp2_lamport$lamport.json"
  done
  run 120 "$PY" scripts/gpu_tp_check.py --size small --tp 2 --skip-throughput --dtype float32 \
    --out "$OUT/tp2_small_greedy.json"
  run 90 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 64 --output-len 256 \
    --budget-s 70 --out "$OUT/tp2_8b.json"
}

stage_lamport-close() {  # 2+ GPUs: the flag-free protocol as the default: the symmetric all-reduce's GPU tests
  # (both protocols), 8B-shaped float32 greedy TP=2 == TP=1, 8B decode TP=1 / TP=2 at batch 1 and 64, TP=2 batch
  # 64 with flags (~8 min)
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_symm_all_reduce.py 2>&1 | tail -3 \
    | tee -a "$OUT/kernels.txt"
  run 200 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --num-layers 8 --skip-throughput --dtype float32 \
    --out "$OUT/tp2_8b_greedy.json"
  run 170 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 1 64 --output-len 256 \
    --budget-s 150 --out "$OUT/tp2_8b.json"
  PAGEDSERVE_FUSED_ALL_REDUCE_LAMPORT=0 run 80 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy \
    --skip-tp1 --batch-sizes 64 --output-len 256 --out "$OUT/tp2_8b_flags.json"
}

stage_embed-ab() {  # 2+ GPUs: the embedding's lookup + all-reduce + first norm fused (this tree) against the tree in
  # ./old (git archive REV | tar -x -C old, carried): the symmetric all-reduce's GPU tests, 8B TP=2 batch 64
  # alternating, TP=1 / TP=2 at batch 1 and 64 here, TP=2 float32 greedy == TP=1, batch 64 without prefetch (~9 min)
  # AB_ONLY=1: the alternating runs alone (AB_TREES, default "new old new old")
  [ "${AB_ONLY:-0}" = 1 ] || run 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_symm_all_reduce.py \
    2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  local tree
  for tree in ${AB_TREES:-new old new old}; do
    echo "== tree $tree"
    if [ "$tree" = new ]; then
      run 80 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --skip-tp1 --batch-sizes 64 --output-len 256 \
        --out "/tmp/tp2_embed_new.json"
    elif [ -d old/scripts ]; then
      run 80 /tmp/pb_old_py scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy \
        --skip-tp1 --batch-sizes 64 --output-len 256 --workdir /tmp/gpu_tp_check_old --out "/tmp/tp2_embed_old.json"
    fi
  done
  [ "${AB_ONLY:-0}" = 1 ] && return 0
  run 170 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 1 64 --output-len 256 \
    --budget-s 150 --out "$OUT/tp2_8b.json"
  run 120 "$PY" scripts/gpu_tp_check.py --size small --tp 2 --skip-throughput --dtype float32 \
    --out "$OUT/tp2_small_greedy.json"
  PAGEDSERVE_PREFETCH_MB=0 run 80 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --skip-tp1 \
    --batch-sizes 64 --output-len 256 --out "$OUT/tp2_8b_noprefetch.json"
}

stage_gemm64() {  # 2+ GPUs: the GEMV over 16 rows (autotuned, PDL prefetch): its GPU tests, per projection against
  # cuBLAS, then 8B decode TP=1 / TP=2 at batch 64 with cuBLAS and with it (~8 min)
  run 200 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  run 150 "$PY" scripts/bench_gemm.py --rows 16 32 64 --tp 1 2 --backends cublas gemv 2>&1 | tee -a "$OUT/kernels.txt"
  PAGEDSERVE_STEP_TIMING=1 run 110 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 64 \
    --output-len 256 --budget-s 90 --out "$OUT/tp2_8b.json"
  PAGEDSERVE_SMALL_GEMV=1 PAGEDSERVE_SMALL_GEMV_ROWS=64 PAGEDSERVE_STEP_TIMING=1 run 160 "$PY" scripts/gpu_tp_check.py \
    --size 8b --tp 2 --skip-greedy --batch-sizes 64 --output-len 256 --budget-s 140 --out "$OUT/tp2_8b_gemv64.json"
}

stage_gemm-tunable() {  # decode-sized matmuls per GEMM back-end, then 8B decode TP=1 / TP=2 at batch 64 with and
  # without TunableOp (tuned in the engine's warm-up, before each graph capture) (~7 min)
  run 150 "$PY" scripts/bench_gemm.py --rows 1 64 256 --tp 1 2 2>&1 | tee -a "$OUT/kernels.txt"
  PAGEDSERVE_STEP_TIMING=1 run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 64 \
    --output-len 256 --budget-s 100 --out "$OUT/tp2_8b.json"
  PYTORCH_TUNABLEOP_ENABLED=1 PYTORCH_TUNABLEOP_TUNING=1 PYTORCH_TUNABLEOP_MAX_TUNING_DURATION_MS=20 \
    PYTORCH_TUNABLEOP_FILENAME=/tmp/tunableop%d.csv PAGEDSERVE_STEP_TIMING=1 run 200 "$PY" scripts/gpu_tp_check.py \
    --size 8b --tp 2 --skip-greedy --batch-sizes 64 --output-len 256 --budget-s 180 --out "$OUT/tp2_8b_tunable.json"
  head -c 3000 /tmp/tunableop0.csv 2>/dev/null | tee -a "$OUT/kernels.txt"
}

stage_tp-final() {  # 4 GPUs: tp-fused's checks (2 and 4 ranks), then 70B TP=4 throughput and a TP=2 profile (~9 min)
  tp_checks
  PAGEDSERVE_STEP_TIMING=1 run 200 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --compare-fused \
    --output-len 256 --budget-s 150 --out "$OUT/tp2_8b.json"
  model llama-3.1-70b /tmp/pb_llama-3.1-70b
  tp tput_llama70b_tp4_256x128x512_pagedserve pagedserve --model /tmp/pb_llama-3.1-70b --tensor-parallel-size 4 \
    --num-prompts 256 --input-len 128 --output-len 512
  ar_bench
  PAGEDSERVE_TORCH_PROFILER_DIR=/tmp/prof run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --skip-tp1 \
    --batch-sizes 64 --output-len 256 --out /tmp/tp2_prof.json
}

stage_tp-sampled() {  # 2+ GPUs: 8B decode TP=1 / TP=2 at batch 1 and 64, greedy and with temperature 0.8 and
  # top-p 0.95 (the full logits all-gathered, the sampler kernel) (~5 min)
  run 330 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 1 64 --output-len 256 \
    --sampled --budget-s 250 --out "$OUT/tp2_8b_sampled.json"
}

stage_sampled-ab() {  # the sampler queued without host syncs (this tree) against the tree in ./old: the sampler's
  # GPU tests here, the no-sync test in ./old too (copy it there: old must fail it), bench_sampling at Llama-3's
  # vocabulary, then 8B TP=1 / TP=2 decode at batch 1 and 64, greedy and sampled, in each tree (~8 min)
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_sampler.py tests/gpu_workers/test_sampler_triton.py \
    2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  [ -d old/tests ] && (cd old && PYTHONPATH="$root/old:/tmp/site" run 100 "$PY" -m pytest -q -p no:cacheprovider \
    tests/gpu_workers/test_sampler.py -k queued 2>&1 | tail -3 | tee -a "$OUT/kernels.txt")
  run 120 "$PY" scripts/bench_sampling.py --vocab 128256 --batch-sizes 1 64
  run 150 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 1 64 --output-len 256 \
    --sampled --budget-s 130 --out "$OUT/tp2_8b_sampled.json"
  [ -d old/scripts ] && run 150 /tmp/pb_old_py scripts/gpu_tp_check.py --size 8b --tp 2 \
    --skip-greedy --batch-sizes 1 64 --output-len 256 --sampled --budget-s 130 --workdir /tmp/gpu_tp_check_old \
    --out "$OUT/tp2_8b_sampled_old.json"
}

stage_top-p() {  # top-p's threshold by kernels/top_p.py's search: its GPU tests and the sampler's, bench_sampling at
  # Llama-3's vocabulary (sort / search / Triton kernel), 8B TP=1 / TP=2 decode greedy and sampled (temperature 0.8,
  # top-p 0.95), then sampled with the sort (PAGEDSERVE_TOP_P_SEARCH=0) at batch 64 (~8 min)
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_top_p.py tests/gpu_workers/test_sampler.py \
    tests/gpu_workers/test_sampler_triton.py 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  run 150 "$PY" scripts/bench_sampling.py --vocab 128256 --batch-sizes 1 64 256 --iters 30 2>&1 | tee -a "$OUT/kernels.txt"
  run 150 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 1 64 --output-len 256 \
    --sampled --budget-s 130 --out "$OUT/tp2_8b_sampled.json"
  PAGEDSERVE_TOP_P_SEARCH=0 run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 64 \
    --output-len 256 --sampled --budget-s 100 --out "$OUT/tp2_8b_sampled_sort.json"
}

stage_race() {  # one GPU: the draw by kernels/gumbel.py (the torch path's default on CUDA) against the tree in ./old:
  # the sampling tests on the GPU, bench_sampling (4 paths), 8B TP=1 decode at batch 1 and 64, greedy, temperature 0.8 +
  # top-p 0.95, temperature 1 alone, and top-p with a seed per request, in each tree of AB_TREES (default "new old
  # new"; each older tree gets this tree's gpu_tp_check.py first; RACE_BATCHES: the batch sizes, default "1 64";
  # RACE_BENCH=0: no tests, no bench) (~9 min)
  if [ "${RACE_BENCH:-1}" = 1 ]; then
    run 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gumbel.py tests/gpu_workers/test_sampler.py \
      tests/gpu_workers/test_sampler_triton.py tests/kernels/test_top_p.py 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
    run 150 "$PY" scripts/bench_sampling.py --vocab 128256 --batch-sizes 1 64 256 --iters 30 2>&1 | tee -a "$OUT/kernels.txt"
  fi
  ab_decode 1 "${RACE_BATCHES:-1 64}" --sampled
}

# ab_decode TP "BATCHES" [FLAGS...]: 8B decode (gpu_tp_check.py --skip-tp1 --skip-greedy, 256 tokens) at tensor-
# parallel size TP in each tree of AB_TREES (default "new old new"): "new" is this tree, any other name the tree
# extracted to ./NAME (git archive REV | tar -x -C NAME, carried), run from inside it with this tree's
# gpu_tp_check.py, so every tree times the same settings.
ab_decode() {
  local tp=$1 batches=$2 tree i=0; shift 2
  for tree in ${AB_TREES:-new old new}; do
    i=$((i + 1))
    echo "== tree $tree"
    if [ "$tree" = new ]; then
      run 150 "$PY" scripts/gpu_tp_check.py --size 8b --tp "$tp" --skip-tp1 --skip-greedy --batch-sizes $batches \
        --output-len 256 --budget-s 140 --out "$OUT/tp${tp}_8b_$i$tree.json" "$@"
    elif [ -d "$tree/scripts" ]; then
      cp scripts/gpu_tp_check.py "$tree/scripts/gpu_tp_check.py"
      run 150 /tmp/pb_tree_py "$tree" scripts/gpu_tp_check.py --size 8b --tp "$tp" --skip-tp1 --skip-greedy \
        --batch-sizes $batches --output-len 256 --budget-s 140 --workdir "/tmp/gpu_tp_check_$tree" \
        --out "$OUT/tp${tp}_8b_$i$tree.json" "$@"
    fi
  done
}

stage_tp2-ab() {  # 2+ GPUs: 8B TP=2 decode at batch 1 and 64 in each tree of AB_TREES (e.g. AB_TREES="new gt new gt"
  # with the graph-tail branch in ./gt: git archive graph-tail | tar -x -C gt), then TP=1 here for the ratio (~7 min)
  ab_decode 2 "1 64"
  run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 1 --skip-tp1 --skip-greedy --batch-sizes 1 64 --output-len 256 \
    --budget-s 110 --out "$OUT/tp1_8b.json"
}

stage_greedy-ab() {  # 2+ GPUs: kernels/greedy.py's keys vs ./old (the torch argmax pick): GPU tests, TP=2 greedy
  # == TP=1, 8B TP=2 decode at batch 1 and 64 in each tree of AB_TREES, then TP=1 here for the ratio (~9 min)
  PYTEST_ARGS="tests/kernels/test_greedy.py tests/kernels/test_gumbel.py tests/gpu_workers/test_sampler.py" stage_pytest
  run 100 "$PY" scripts/gpu_tp_check.py --size small --tp 2 --skip-throughput --dtype float32 \
    --out "$OUT/tp2_small_greedy.json"
  ab_decode 2 "1 64"
  run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 1 --skip-tp1 --skip-greedy --batch-sizes 1 64 --output-len 256 \
    --budget-s 110 --out "$OUT/tp1_8b.json"
}

stage_ar-ab() {  # 2+ GPUs: the fused all-reduce's symmetric-memory GPU tests, TP=2 float32 greedy == TP=1, 8B TP=2
  # decode at batch 64 in each tree of AB_TREES (default "new old"), TP=1 here for the ratio, then this tree's TP=2
  # timeline (tp-trace; read it with scripts/trace_tp.py) (~8 min)
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_symm_all_reduce.py \
    tests/kernels/test_all_reduce_rms_norm.py 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  run 100 "$PY" scripts/gpu_tp_check.py --size small --tp 2 --skip-throughput --dtype float32 \
    --out "$OUT/tp2_small_greedy.json"
  AB_TREES="${AB_TREES:-new old}" ab_decode 2 "64"
  run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 1 --skip-tp1 --skip-greedy --batch-sizes 64 --output-len 256 \
    --budget-s 110 --out "$OUT/tp1_8b.json"
  stage_tp-trace
}

# rope_onoff TP "BATCHES" LIMIT NAME: 8B decode at tensor-parallel size TP with PAGEDSERVE_ROPE_IN_ATTENTION=1, then 0
rope_onoff() {
  local tp=$1 batches=$2 limit=$3 name=$4 rope
  for rope in 1 0; do
    echo "== PAGEDSERVE_ROPE_IN_ATTENTION=$rope"
    PAGEDSERVE_ROPE_IN_ATTENTION=$rope run "$limit" "$PY" scripts/gpu_tp_check.py --size 8b --tp "$tp" --skip-tp1 \
      --skip-greedy --batch-sizes $batches --output-len 256 --budget-s $((limit - 10)) --out "$OUT/${name}_rope$rope.json"
  done
}

stage_rope-ab() {  # 2+ GPUs: RoPE + K/V write inside decode attention: its GPU tests, the smoke test (float32 greedy
  # == transformers, graphs and eager), then 8B TP=1 (batch 1, 64) and TP=2 (batch 64) with it on / off (~9 min)
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py \
    tests/kernels/test_decode_attention_rope.py tests/kernels/test_triton_backend.py tests/gpu_workers/test_elementwise.py \
    2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  stage_smoke
  rope_onoff 1 "1 64" 120 tp1_8b
  rope_onoff 2 "64" 110 tp2_8b
}

stage_push-ab() {  # 2 GPUs: the row-parallel matmuls on the GEMV, pushing their rows (PAGEDSERVE_ROW_PARALLEL_GEMV): the symmetric
  # all-reduce GPU tests (2 ranks, flag-free: pushed calls eager and in graphs) and the GEMV's, TP=2 bf16 greedy == TP=1
  # (small), 8B TP=1 at batch 1 / 64, then TP=2 at batch 1 / 64 with the push on / off (~9 min)
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_symm_all_reduce.py tests/kernels/test_gemv.py \
    -k "not 4-1 and not 2-0" 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  run 100 "$PY" scripts/gpu_tp_check.py --size small --tp 2 --skip-throughput --out "$OUT/tp2_small_greedy.json"
  run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 1 --skip-tp1 --skip-greedy --batch-sizes 1 64 --output-len 256 \
    --budget-s 110 --out "$OUT/tp1_8b.json"
  local push
  for push in 1 0; do
    echo "== PAGEDSERVE_ROW_PARALLEL_GEMV=$push"
    PAGEDSERVE_ROW_PARALLEL_GEMV=$push run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-tp1 --skip-greedy \
      --batch-sizes 1 64 --output-len 256 --budget-s 110 --out "$OUT/tp2_8b_push$push.json"
  done
}

stage_push-tp1() {  # 2 GPUs: TP=2 float32 greedy == TP=1 on the Llama-8B shape (8 layers) with the row-parallel GEMV
  # pushing, the GEMV's tile rows at 17-32 token rows (sweep_gemv.py), 8B TP=1 at batch 1 / 64 with
  # PAGEDSERVE_ROW_PARALLEL_GEMV=1 / 0, then TP=2 (~8 min)
  run 200 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --num-layers 8 --skip-throughput --dtype float32 \
    --out "$OUT/tp2_8b_greedy.json"
  run 90 "$PY" scripts/sweep_gemv.py --rows 24 32 --tp 2 1 --configs "32,128,4,6,1;32,128,4,6,2;64,128,4,6,1" \
    --block-m 0 64 --top 6 2>&1 | grep -v "^  (" | tee -a "$OUT/kernels.txt"
  local on
  for on in 1 0; do
    echo "== PAGEDSERVE_ROW_PARALLEL_GEMV=$on"
    PAGEDSERVE_ROW_PARALLEL_GEMV=$on run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 1 --skip-tp1 --skip-greedy \
      --batch-sizes 1 64 --output-len 256 --budget-s 110 --out "$OUT/tp1_8b_gemv$on.json"
  done
  run 120 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-tp1 --skip-greedy --batch-sizes 1 64 --output-len 256 \
    --budget-s 110 --out "$OUT/tp2_8b.json"
}

stage_push-final() {  # 2 GPUs: the row-parallel GEMV's checks and numbers: TP=2 float32 greedy == TP=1 (8B shape,
  # 8 layers, pushing), the symmetric all-reduce and GEMV GPU tests, 8B TP=1 with PAGEDSERVE_ROW_PARALLEL_GEMV=1 / 0
  # and TP=2, at batch 1, 16 and 64 (~9 min)
  run 170 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --num-layers 8 --skip-throughput --dtype float32 \
    --out "$OUT/tp2_8b_greedy.json"
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_symm_all_reduce.py tests/kernels/test_gemv.py \
    -k "not 4-1 and not 2-0" 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  local on
  for on in 1 0; do
    echo "== PAGEDSERVE_ROW_PARALLEL_GEMV=$on"
    PAGEDSERVE_ROW_PARALLEL_GEMV=$on run 75 "$PY" scripts/gpu_tp_check.py --size 8b --tp 1 --skip-tp1 --skip-greedy \
      --batch-sizes 1 16 64 --output-len 256 --budget-s 70 --out "$OUT/tp1_8b_gemv$on.json"
  done
  run 75 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-tp1 --skip-greedy --batch-sizes 1 16 64 --output-len 256 \
    --budget-s 70 --out "$OUT/tp2_8b.json"
}

stage_push-small() {  # 2 GPUs: the row-parallel GEMV under 32 rows (TP > 1, pushing only): 8B TP=1 at batch 1, 16, 64
  # (the GEMV at 64 only), TP=2 at batch 1, 16, 24, 64 with PAGEDSERVE_ROW_PARALLEL_GEMV=1, then at 16, 24 with 0 (~4 min)
  run 70 "$PY" scripts/gpu_tp_check.py --size 8b --tp 1 --skip-tp1 --skip-greedy --batch-sizes 1 16 64 --output-len 256 \
    --budget-s 65 --out "$OUT/tp1_8b.json"
  local on
  for on in 1 0; do
    echo "== PAGEDSERVE_ROW_PARALLEL_GEMV=$on"
    PAGEDSERVE_ROW_PARALLEL_GEMV=$on run 70 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-tp1 --skip-greedy \
      --batch-sizes $([ $on = 1 ] && echo "1 16 24 64" || echo "16 24") --output-len 256 --budget-s 65 \
      --out "$OUT/tp2_8b_gemv$on.json"
  done
}

stage_gated-ab() {  # 2 GPUs: gate_up + SiLU-and-mul in one GEMV launch (PAGEDSERVE_GATED_GEMV): the GEMV's GPU tests,
  # the gated launch swept against cuBLAS + silu_and_mul (TP=2 / TP=1 slices, 1-64 rows), decode attention's split
  # counts at the TP=2 batch-64 shape, then 8B TP=1 and TP=2 at batch 1, 16, 64 with the gated launch on / off (~9 min)
  run 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  run 120 "$PY" scripts/sweep_gemv.py --gated --rows 64 32 16 1 --tp 2 1 --top 4 \
    --configs "16,128,4,6,1;16,256,4,4,1;32,128,4,6,1;32,128,4,4,1;32,64,4,6,1;32,256,4,3,1;64,128,8,4,1" \
    2>&1 | grep -v "^  (" | tee -a "$OUT/kernels.txt"
  run 90 "$PY" scripts/bench_attention.py --decode-sweep --sweep-splits auto 1 2 3 --sweep-cases 64x256 64x384 \
    --sweep-configs 128,4,2 64,4,2 64,4,1 128,4,1 64,8,2 --output-json "$RUNS/attention_splits.json" \
    2>&1 | tee -a "$OUT/kernels.txt"
  local on
  for on in 1 0; do
    gated_run $on 1
    gated_run $on 2
  done
}

gated_run() {  # gated_run ON TP: 8B decode at batch 1, 16, 64 with PAGEDSERVE_GATED_GEMV=ON, to tpTP_8b_gatedON.json
  echo "== TP=$2 PAGEDSERVE_GATED_GEMV=$1"
  PAGEDSERVE_GATED_GEMV=$1 run 75 "$PY" scripts/gpu_tp_check.py --size 8b --tp "$2" --skip-tp1 --skip-greedy \
    --batch-sizes 1 16 64 --output-len 256 --budget-s 70 --out "$OUT/tp${2}_8b_gated${1}.json"
}

stage_gated-ab2() {  # 2 GPUs: gated_config's launches (one wave at <= 16 rows): the gated GEMV GPU tests, 8B TP=2 and
  # TP=1 at batch 1, 16, 64 with PAGEDSERVE_GATED_GEMV=1 / 0, then TP=2 batch 1 gated under the profiler (~8 min)
  run 60 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py -k gated 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  local on
  for on in 1 0; do
    gated_run $on 2
    gated_run $on 1
  done
  PAGEDSERVE_GATED_GEMV=1 PAGEDSERVE_TORCH_PROFILER_DIR=/tmp/prof run 100 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 \
    --skip-tp1 --skip-greedy --batch-sizes 1 --output-len 256 --budget-s 90 --out /tmp/tp2_prof.json
}

stage_gated-final() {  # 2 GPUs: the gated GEMV's checks and its batch-64 A/B: its GPU tests, TP=2 float32 greedy == TP=1
  # (8B shape, 8 layers, PAGEDSERVE_GATED_GEMV=1 so its 4 prompts take it), then 8B batch 64 with the default (gated)
  # and PAGEDSERVE_GATED_GEMV=0, alternating: TP=1 on / off, TP=2 on / off, TP=1 on / off (~9 min)
  run 40 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py -k gated 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  PAGEDSERVE_GATED_GEMV=1 run 170 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --num-layers 8 --skip-throughput \
    --dtype float32 --out "$OUT/tp2_8b_greedy.json"
  local tp on i=0
  for tp in 1 1 2 2 1 1; do
    on=$(( 1 - i % 2 )); i=$(( i + 1 ))
    echo "== TP=$tp PAGEDSERVE_GATED_GEMV=$on"
    PAGEDSERVE_GATED_GEMV=$([ $on = 1 ] && echo "" || echo 0) run 60 "$PY" scripts/gpu_tp_check.py --size 8b --tp $tp \
      --skip-tp1 --skip-greedy --batch-sizes 64 --output-len 256 --budget-s 55 --out "$OUT/tp${tp}_b64_gated$on.$i.json"
  done
}

stage_reduce-ab() {  # 2 GPUs: row-parallel matmuls all-reducing their own rows (kernels.gemv.reduce_gemv): the symmetric
  # all-reduce GPU tests (2 ranks, reduce_gemv eager and in graphs), the three matmul + all-reduce + norm paths timed
  # over 2 GPUs, 8B TP=2 batch 64 with PAGEDSERVE_REDUCE_IN_MATMUL=1 / 0 alternating, TP=1 batch 64 (~8.5 min)
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_symm_all_reduce.py \
    tests/kernels/test_gemv.py tests/kernels/test_all_reduce_rms_norm.py \
    -k "(sums_like and 2-1) or reducing_matmul or sharing" 2>&1 | tail -5 | tee -a "$OUT/kernels.txt"
  run 120 "$PY" scripts/gpu_tp_check.py --tp 2 --matmul-reduce-bench --skip-greedy --skip-throughput \
    --out "$OUT/matmul_reduce_bench.json" 2>&1 | tee -a "$OUT/kernels.txt"
  local on i=0
  for on in 1 0 1 0; do
    i=$(( i + 1 ))
    echo "== TP=2 b64 PAGEDSERVE_REDUCE_IN_MATMUL=$on"
    PAGEDSERVE_REDUCE_IN_MATMUL=$on run 60 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 \
      --skip-tp1 --skip-greedy --batch-sizes 64 --output-len 256 --budget-s 55 --out "$OUT/tp2_b64_reduce$on.$i.json"
  done
  run 60 "$PY" scripts/gpu_tp_check.py --size 8b --tp 1 --skip-tp1 --skip-greedy --batch-sizes 64 --output-len 256 \
    --budget-s 55 --out "$OUT/tp1_b64.json"
}

stage_reduce-ab2() {  # 2 GPUs: TP=2 float32 greedy == TP=1 through reduce_gemv (forced at every row count), then 8B
  # TP=2 batch 1 and 16 with PAGEDSERVE_REDUCE_IN_MATMUL=1 / 0 (~6 min)
  PAGEDSERVE_REDUCE_IN_MATMUL=1 run 170 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --num-layers 8 --skip-throughput \
    --dtype float32 --out "$OUT/tp2_8b_greedy.json"
  local on
  for on in 1 0; do
    echo "== TP=2 b1 b16 PAGEDSERVE_REDUCE_IN_MATMUL=$on"
    PAGEDSERVE_REDUCE_IN_MATMUL=$on run 70 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 \
      --skip-tp1 --skip-greedy --batch-sizes 1 16 --output-len 256 --budget-s 65 --out "$OUT/tp2_small_reduce$on.json"
  done
}

stage_qkv-rope-tp2() {  # 2 GPUs: the GEMV / qkv + RoPE GPU tests (after the gemv.py split), TP=2 float32 greedy == TP=1
  # with every step's qkv through qkv_rope_gemv (forced at every row count, RoPE kept out of decode attention), then 8B
  # TP=2 batch 64 with PAGEDSERVE_QKV_ROPE_GEMV unset / 0, alternating, twice (~7 min)
  run 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py tests/kernels/test_qkv_rope.py \
    tests/gpu_workers/test_elementwise.py 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  PAGEDSERVE_QKV_ROPE_GEMV=1 PAGEDSERVE_ROPE_IN_ATTENTION=0 run 150 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 \
    --num-layers 8 --skip-throughput --dtype float32 --out "$OUT/tp2_8b_greedy_rope.json"
  local on i
  for i in 1 2; do
    for on in "" 0; do
      PAGEDSERVE_QKV_ROPE_GEMV=$on run 60 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-tp1 --skip-greedy \
        --batch-sizes 64 --output-len 256 --budget-s 55 --out "$OUT/tp2_b64_rope${on:-on}.$i.json"
    done
  done
}

stage_rank-emu() {  # one GPU: 8B TP=1 batch 64, then one TP=2 rank's slices as a whole model (--size 8b-rank2:
  # a TP=2 step's work without its collectives) at batch 64, twice (~3.5 min)
  run 70 "$PY" scripts/gpu_tp_check.py --size 8b --tp 1 --skip-tp1 --skip-greedy --batch-sizes 64 --output-len 256 \
    --budget-s 60 --out "$OUT/tp1_b64.json"
  local i
  for i in 1 2; do
    run 65 "$PY" scripts/gpu_tp_check.py --size 8b-rank2 --tp 1 --skip-tp1 --skip-greedy --batch-sizes 64 \
      --output-len 256 --budget-s 55 --out "$OUT/rank2_b64.$i.json"
  done
}

stage_attn-ab1() {  # one GPU: decode attention GPU tests, then ./old against this tree: one TP=2 rank's work (8b-rank2)
  # at batch 64 alternating, and Llama-8B TP=1 at batch 64 (~5 min)
  run 90 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py 2>&1 | tail -2 | tee -a "$OUT/kernels.txt"
  AB_TREES="new old new old" ab_decode 1 64 --size 8b-rank2 --budget-s 50
  AB_TREES="new old" ab_decode 1 64
}

stage_smoke-wide() {  # one GPU: float32 greedy of 32 prompts at once == transformers on hidden-2048 checkpoints (the
  # decode step's GEMV launches at 32 rows; gpu_smoke.py --wide) (~2.5 min: 150 s on one H200, session 20)
  run 240 "$PY" scripts/gpu_smoke.py "$OUT/smoke" --wide
}

stage_rank-steps() {  # one GPU: 8b-rank2 and 8B TP=1 at batch 64 with the worker's step timer (GPU step, GPU gap,
  # CPU phases; the summary lines land in the log) (~2.5 min)
  local size
  for size in 8b-rank2 8b; do
    PAGEDSERVE_STEP_TIMING=1 run 75 "$PY" scripts/gpu_tp_check.py --size $size --tp 1 --skip-tp1 --skip-greedy \
      --batch-sizes 64 --output-len 512 --budget-s 70 --out "$OUT/steps_$size.json"
  done
}

stage_qkv-rope-ab1() {  # one GPU: qkv with RoPE and the K/V write in its epilogue (PAGEDSERVE_QKV_ROPE_GEMV): its GPU
  # tests, float32 greedy at 32 rows == transformers through it (smoke-wide), then 8B TP=1 b64 + b32 and 8b-rank2 b64
  # with it on (unset) / off (0), twice (~9.5 min)
  run 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py tests/gpu_workers/test_elementwise.py \
    -k "rope" 2>&1 | tail -3 | tee -a "$OUT/kernels.txt"
  stage_smoke-wide
  local on i
  for i in 1 2; do
    for on in "" 0; do
      PAGEDSERVE_QKV_ROPE_GEMV=$on run 60 "$PY" scripts/gpu_tp_check.py --size 8b --tp 1 --skip-tp1 --skip-greedy \
        --batch-sizes 64 32 --output-len 256 --budget-s 55 --out "$OUT/tp1_8b_rope${on:-on}.$i.json"
      PAGEDSERVE_QKV_ROPE_GEMV=$on run 45 "$PY" scripts/gpu_tp_check.py --size 8b-rank2 --tp 1 --skip-tp1 \
        --skip-greedy --batch-sizes 64 --output-len 256 --budget-s 40 --out "$OUT/rank2_rope${on:-on}.$i.json"
    done
  done
}

stage_qkv-rope-rank() {  # one GPU: 8b-rank2 b64 with PAGEDSERVE_QKV_ROPE_GEMV unset / 0, alternating, three pairs (~3.5 min)
  local on i
  for i in 1 2 3; do
    for on in "" 0; do
      PAGEDSERVE_QKV_ROPE_GEMV=$on run 45 "$PY" scripts/gpu_tp_check.py --size 8b-rank2 --tp 1 --skip-tp1 \
        --skip-greedy --batch-sizes 64 --output-len 256 --budget-s 40 --out "$OUT/rank2_rope${on:-on}.$i.json"
    done
  done
}

stage_rank-prof() {  # one GPU: one TP=2 rank's work (8b-rank2) and Llama-8B TP=1 at batch 64 under the profiler
  # (steps 100-149; the per-kernel tables land in the log) (~3 min)
  local size
  for size in 8b-rank2 8b; do
    PAGEDSERVE_TORCH_PROFILER_DIR=/tmp/prof run 90 "$PY" scripts/gpu_tp_check.py --size $size --tp 1 --skip-tp1 \
      --skip-greedy --batch-sizes 64 --output-len 256 --budget-s 80 --out "$OUT/prof_$size.json"
  done
}

stage_reduce-one() {  # one GPU: reduce_gemv's epilogue on real GPU memory (two ranks on two streams of one GPU), the
  # reducing GEMV's GPU tests, then the three matmul + all-reduce + norm paths timed at world size 1 (~3 min)
  run 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_all_reduce_rms_norm.py tests/kernels/test_gemv.py \
    -k "sharing or reducing_matmul or reduce_their" 2>&1 | tail -5 | tee -a "$OUT/kernels.txt"
  run 150 "$PY" scripts/sweep_gemv.py --reduce --rows 1 16 32 64 --tp 2 1 2>&1 | tee -a "$OUT/kernels.txt"
}

stage_rope-small() {  # one GPU: 8B TP=1 decode at batch 1 and 16 with PAGEDSERVE_ROPE_IN_ATTENTION=1 / 0 (~4 min)
  rope_onoff 1 "1 16" 110 tp1_8b_small
}

stage_greedy-ab1() {  # one GPU: the greedy keys at TP=1: 8B decode at batch 1 and 64 in each tree of AB_TREES,
  # then the top-p search's pivot table (~6 min)
  ab_decode 1 "1 64"
  stage_top-p-pivots
}

stage_top-p-pivots() {  # one GPU: kernels/top_p.py's search at 16 / 8 / 4 / 2 pivots a pass (bench_top_p.py) (~1 min)
  run 150 "$PY" scripts/bench_top_p.py 2>&1 | tee -a "$OUT/kernels.txt"
}

stage_tp4-close() {  # 4 GPUs: the final tree's TP=4 checks: the symmetric all-reduce's GPU tests (2 and 4 ranks,
  # both protocols), TP=4 float32 greedy == TP=1, 70B TP=4 256 x (128, 512), then 8B TP=1 / TP=2 at batch 1 and 64 (~8 min)
  run 200 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_symm_all_reduce.py 2>&1 | tail -3 \
    | tee -a "$OUT/kernels.txt"
  run 120 "$PY" scripts/gpu_tp_check.py --size small --tp 4 --skip-throughput --dtype float32 \
    --out "$OUT/tp4_small_greedy.json"
  model llama-3.1-70b /tmp/pb_llama-3.1-70b
  tp tput_llama70b_tp4_256x128x512_pagedserve pagedserve --model /tmp/pb_llama-3.1-70b --tensor-parallel-size 4 \
    --num-prompts 256 --input-len 128 --output-len 512
  run 170 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --batch-sizes 1 64 --output-len 256 \
    --budget-s 150 --out "$OUT/tp2_8b.json"
}

stage_tp() {
  run 110 "$PY" -m pytest -q -p no:cacheprovider tests/gpu_workers/test_symm_all_reduce.py
  run 90 "$PY" scripts/gpu_tp_check.py --size small --tp 2 --skip-throughput --dtype float32 \
    --out "$OUT/tp2_small_greedy.json"
  # step timing on: its log line shows whether the GPU waits on the host between TP=2 steps (gpu_gap)
  PAGEDSERVE_STEP_TIMING=1 run 230 "$PY" scripts/gpu_tp_check.py --size 8b --tp 2 --skip-greedy --compare-all-reduce --output-len 256 \
    --budget-s 190 --out "$OUT/tp2_8b.json"
  if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
    model llama-3.1-70b /tmp/pb_llama-3.1-70b
    tp tput_llama70b_tp4_256x128x512_pagedserve pagedserve --model /tmp/pb_llama-3.1-70b --tensor-parallel-size 4 \
      --num-prompts 256 --input-len 128 --output-len 512
  fi
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(correctness)
for s in "${stages[@]}"; do
  declare -F "stage_$s" >/dev/null || { echo "unknown stage $s; see the header of $0"; exit 2; }
done
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
start=$(date +%s)
for s in "${stages[@]}"; do
  echo "=== stage $s ($(( $(date +%s) - start )) s elapsed)"
  "stage_$s"
done
echo "=== done in $(( $(date +%s) - start )) s; results:"
"$PY" - "$OUT/results.jsonl" <<'EOF'
import json, os, sys
lines = open(sys.argv[1]).read().splitlines() if os.path.exists(sys.argv[1]) else []
for r in map(json.loads, lines):
    name, kind = r["run"], r["benchmark"]
    if kind == "throughput":
        print(f"{name:45s} {r['elapsed_s']:7.1f} s {r['output_tokens_per_s']:9.0f} out tok/s "
              f"{r['total_tokens_per_s']:9.0f} total tok/s  {r['card']}")
    elif kind == "latency":
        print(f"{name:45s} {r['decode_ms_per_token']:7.2f} ms/token, first {r['first_token_ms']:6.1f} ms, floor "
              f"{r['floor_ms_per_token']:.2f} ms ({100 * r['fraction_of_floor']:.0f}%)  {r['card']}")
    elif kind == "serve":
        print(f"{name:20s} {r['backend']:10s} c={r['max_concurrency']!s:4s} {r['output_throughput']:9.0f} out tok/s, "
              f"TTFT p50 {r['median_ttft_ms']:7.1f} ms, TPOT p50 {r['median_tpot_ms']:6.2f} ms  {r['card']}")
EOF
