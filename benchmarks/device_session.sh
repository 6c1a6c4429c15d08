#!/usr/bin/env bash
# The next device run's calls on a 2-GPU machine (kind nvidia-h200-x2), one PART per call,
# each inside the 10-minute limit, one job per GPU side by side. Send them back to back
# after staging c1..c4 (../shared/device/README.md): the machine is released ~30 s after a
# call ends. Every PART leaves at most 8 files under $OUT (a call brings back no more).
# The tree with .device/c1 carried is over the 64 MiB a call takes (since the eleventh run):
# move benchmarks/results out of the tree for the c1..c4 calls and back before any PART
# (decode_step_host.py and the diag read policy reports there).
#   PART=first     bash benchmarks/device_session.sh   # carry .device/c5: stage, GPU tests | 8B model, sealing
#   PART=profile   bash benchmarks/device_session.sh   # carry .whl: decode profile | mosaic3 at 32k (prefill pace)
#   PART=profile_8b bash benchmarks/device_session.sh  # carry .whl: 8B-shaped prefill profiles, 8k | 32k prompts
#   PART=census    bash benchmarks/device_session.sh   # carry .whl: where the scheduler waits for the GPU
#                                                       (MOSAICKV_SYNC_CENSUS=1): 8B prefill at 8k | SmolLM2 decode, 240 running
#   PART=eq        bash benchmarks/device_session.sh   # none | mosaic3 at equal batch (TPOT; BUDGET_S, 540 unless set)
#   PART=admission bash benchmarks/device_session.sh   # SmolLM2 random8k, four methods | mosaic6 at 32k, 80 prompts
#                                                       (BUDGET_S: seconds for it, 560 unless less device time is left)
#   PART=stage_eq  bash benchmarks/device_session.sh   # carry .device/c5: stage, 8B model, then eq (a restaged machine)
#   PART=smollm2   bash benchmarks/device_session.sh   # SmolLM2 random8k: none, fp8 | mosaic3, mosaic6 (BUDGET_S as above)
#   PART=rows MODEL=M WORKLOAD=W [N=n] bash benchmarks/device_session.sh   # the same for any model and workload of
#                                                       benchmarks/suite/workloads.py (e.g. smollm2 gsp, llama8b-random random8k;
#                                                       a missing model is built first); GPU0_METHODS / GPU1_METHODS
#                                                       choose each GPU's methods (e.g. mosaic3 | mosaic6: a call each),
#                                                       GPU0_FLAGS / GPU1_FLAGS each GPU's MosaicKV flags (e.g. mosaic3
#                                                       with --kv-compress-sealing device | device-thread);
#                                                       MOSAICKV_KNAPSACK=ops before the command seals with the
#                                                       knapsack's PyTorch ops (server info: knapsack_on_gpu)
#   PART=kernels   bash benchmarks/device_session.sh   # ncu: the server's tiles, one block per tile, 64-token tiles,
#                                                       (DIAG_SETTINGS="0 18": only those rows of the diag's settings)
#                                                       eight warps | diag_formats at 32-token segments (the presets'
#                                                       mixes, dense), then the host's decode step at SmolLM2's shape
#                                                       (on one GPU, no ncu: bench_decode.py against FlashInfer after)
#   PART=stage_kernels bash benchmarks/device_session.sh   # carry .device/c5: stage; diag_formats at 32, bench_decode |
#                                                       8B model, GPU tests (a restaged machine, then eq and smollm2)
#   PART=stage_host bash benchmarks/device_session.sh   # carry .device/c5 and .whl: stage; SmolLM2 sealing at 32 and
#                                                       182 a call, the host's decode step on the GPU (240 and 512
#                                                       requests, graph and eager), a prefill profile of mosaic3
#                                                       at 8k (PHASE=decode: a decode step's at 240 running) | GPU tests
#   PART=stage_smollm2 bash benchmarks/device_session.sh   # carry .device/c5: stage, then smollm2 (BUDGET_S, 480)
#   PART=one_first bash benchmarks/device_session.sh   # one GPU (kind nvidia-h200), carry .device/c5: stage, then the
#                                                       GPU tests (after the sealing benches they ran out of the call
#                                                       in the fifteenth run). On one GPU, kernels skips ncu and rows
#                                                       runs GPU0_METHODS alone
#   PART=ncu       bash benchmarks/device_session.sh   # Nsight Compute over the decode launches (NCU_SETTINGS, default
#                                                       "0 38"), in a call of its own on one GPU (since the nineteenth run)
#   PART=sealing   bash benchmarks/device_session.sh   # sealing at SmolLM2's and the 8B's shape (profiled), the knapsack
#                                                       as ops beside, channel pricing and knapsack tiles (no staging)
#   PART=accuracy  bash benchmarks/device_session.sh   # the accuracy suite on GPU 1, or 0 of one (ACC_METHODS, SAMPLES 4, PARALLEL 4,
#                                                       MosaicKV methods sealing on the device: ACC_FLAGS) | with
#                                                       GPU0_METHODS set, one suite comparison on GPU 0 (MODEL, WORKLOAD)
# Record the session's commit yourself: the machine's git log is stale.
set -uo pipefail
PART=${PART:?set PART=first, profile, eq or admission}
case $PART in one_first|ncu|sealing|first|profile|profile_8b|census|eq|admission|stage_eq|smollm2|rows|kernels|stage_kernels|stage_host|stage_smollm2|accuracy) ;; *) echo "PART=$PART is not one of one_first, ncu, first, profile, profile_8b, census, eq, admission, stage_eq, smollm2, rows, kernels, stage_kernels, stage_host, stage_smollm2, accuracy, sealing"; exit 2 ;; esac
OUT=${OUT:?the device call sets OUT}
T0=$(date +%s)
export PYTHONPATH=/tmp/mkv/site PYTHONUNBUFFERED=1
MOSAIC_FLAGS=${MOSAIC_FLAGS:---kv-compress-sealing device --kv-compress-cuda-graph}
LOG=$(mktemp -d)
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG/steps.txt"; }

# One suite comparison on one GPU: GPU, port base, budget, then run_comparison.sh's settings.
# GPU0_FLAGS / GPU1_FLAGS, if set, replace MOSAIC_FLAGS on that GPU (e.g. the two sealing modes side by side).
suite() {
  local gpu=$1 port=$2 budget=$3; shift 3
  local flags_var=GPU${gpu}_FLAGS
  env CUDA_VISIBLE_DEVICES=$gpu STATE_ROOT=/tmp/mkv/suite$gpu PORT_BASE=$port T0=$T0 BUDGET_S=$budget \
    OUT=$OUT/gpu$gpu MOSAIC_FLAGS="${!flags_var:-$MOSAIC_FLAGS}" "$@" bash benchmarks/suite/run_comparison.sh \
    > "$LOG/suite_gpu$gpu.txt" 2>&1
  say "suite on GPU $gpu: rc=$? ($*)"
}

stage() {
  bash .device/c5/stage.sh > "$LOG/stage.txt" 2>&1
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$LOG/pip.txt" 2>&1
  say "staged"
}
# SmolLM2's sealing at 32 and 182 segments a call, and where an 8B-shaped sealing call's
# time goes (the thirteenth run: 32.3 ms a call of 32, half kernels, half the host), with
# the knapsack in one launch and as PyTorch ops: kernels, launches and waits, into the session's tgz.
sealing() {
  timeout 120 python3 benchmarks/sealing/bench_seal.py --device cuda --layers 30 --kv-heads 3 --head-dim 64 \
    --segments 364 --batch 32 182 --profile 182 --json "$OUT/sealing_smollm2.json" > "$LOG/seal_smollm2.txt" 2>&1
  say "bench_seal SmolLM2 rc=$?"
  timeout 120 python3 benchmarks/sealing/bench_seal.py --device cuda --layers 32 --kv-heads 8 --head-dim 128 \
    --segments 64 --batch 32 --profile 32 --json "$LOG/sealing_8b.json" > "$LOG/seal_8b.txt" 2>&1
  say "bench_seal 8B rc=$?"
  # The same with the knapsack as PyTorch ops (the thirteenth run's sealer) instead of one launch.
  MOSAICKV_KNAPSACK=ops timeout 120 python3 benchmarks/sealing/bench_seal.py --device cuda --layers 32 --kv-heads 8 \
    --head-dim 128 --segments 64 --batch 32 --profile 32 --json "$LOG/sealing_8b_knapsack_ops.json" > "$LOG/seal_8b_ops.txt" 2>&1
  say "bench_seal 8B, knapsack ops rc=$?"
  # Per-vector channel pricing and the knapsack, each by its ops and by its one launch, at an 8B call's size.
  timeout 90 python3 benchmarks/sealing/bench_pricing_ops.py --only channels knapsack --json "$LOG/pricing_ops.json" \
    > "$LOG/pricing_ops.txt" 2>&1
  say "bench_pricing_ops --only channels knapsack rc=$?"
}
eq() {
  suite 0 30000 "$1" MODEL=llama8b-random WORKLOAD=random32k_eq METHODS=none MIN_METHOD_S=100 &
  suite 1 30010 "$1" MODEL=llama8b-random WORKLOAD=random32k_eq METHODS=mosaic3 MIN_METHOD_S=100
  wait
}

case $PART in
  ncu)
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$LOG/pip.txt" 2>&1
    timeout 540 bash benchmarks/kernels/ncu_decode.sh "$OUT/ncu" > "$LOG/ncu.txt" 2>&1
    say "ncu_decode rc=$?: $(grep -c 'profiled run' "$OUT/ncu/ncu_decode.txt" 2>/dev/null) runs profiled" ;;
  sealing)
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$LOG/pip.txt" 2>&1
    sealing ;;
  one_first)
    stage
    TESTS_S=$(( 575 - $(date +%s) + T0 )) OUT=$OUT PART=tests bash benchmarks/backend_gpu.sh > "$LOG/tests.txt" 2>&1
    say "tests: $(grep -E '^[0-9]+ (passed|failed)|passed|failed' /tmp/backend_gpu_tests/pytest.txt | tail -1)" ;;
  first)
    stage
    (export CUDA_VISIBLE_DEVICES=1
     (python3 benchmarks/serving/warm_jit.py && touch /tmp/mkv/jit_warm) > "$LOG/jit.txt" 2>&1 &
     python3 benchmarks/suite/make_random_model.py --out /tmp/mkv/models/llama8b-random > "$LOG/model.txt" 2>&1
     say "8B model rc=$?"
     timeout $(( 560 - $(date +%s) + T0 )) bash benchmarks/sealing/gpu_sealing.sh "$OUT/sealing" > "$LOG/sealing.txt" 2>&1
     say "sealing rc=$?"; wait) &
    CUDA_VISIBLE_DEVICES=0 TESTS_S=$(( 560 - $(date +%s) + T0 )) OUT=$OUT PART=tests bash benchmarks/backend_gpu.sh \
      > "$LOG/tests.txt" 2>&1
    say "tests: $(grep -E '^[0-9]+ (passed|failed)' /tmp/backend_gpu_tests/pytest.txt | tail -1)"
    wait ;;
  profile)
    (CUDA_VISIBLE_DEVICES=0 T0=$T0 BUDGET_S=470 OUT=$OUT/profile PHASE=decode MODEL=/tmp/mkv/models/llama8b-random \
       INPUT=32768 OUTPUT=1024 N=8 MOSAIC_EXTRA="$MOSAIC_FLAGS" bash benchmarks/serving/profile_gpu.sh \
       > "$LOG/profile.txt" 2>&1; say "profile rc=$?") &
    suite 1 30010 560 MODEL=llama8b-random WORKLOAD=random32k N=48 METHODS=mosaic3
    wait ;;
  profile_8b)
    # Where an 8B-shaped prefill's time goes beyond sealing (0.90 s a prompt against none's
    # 0.27 at 8k in the ninth run, 0.36 of it sealing): py-spy on the scheduler, 8k | 32k.
    [ -e /tmp/mkv/models/llama8b-random ] || { python3 benchmarks/suite/make_random_model.py \
      --out /tmp/mkv/models/llama8b-random > "$LOG/model.txt" 2>&1; say "8B model rc=$?"; }
    for gpu in 0 1; do
      if [ $gpu = 0 ]; then shape="INPUT=8192 N=32"; else shape="INPUT=32768 N=8"; fi
      (sleep $((gpu * 20))  # profile_gpu.sh installs the project first: not both at once
       env CUDA_VISIBLE_DEVICES=$gpu T0=$T0 BUDGET_S=${BUDGET_S:-560} OUT=$OUT/prefill_8b_gpu$gpu PHASE=prefill OUTPUT=64 $shape \
         PORT=$((30021 + gpu)) MODEL=/tmp/mkv/models/llama8b-random MOSAIC_EXTRA="$MOSAIC_FLAGS" \
         bash benchmarks/serving/profile_gpu.sh > "$LOG/profile_gpu$gpu.txt" 2>&1; say "8B prefill profile GPU $gpu rc=$?") &
    done
    wait ;;
  census)
    # Every synchronizing op of the scheduler process by call site (sglang_patch/sync_census.py),
    # from the server info at the end, beside a py-spy profile of the same run.
    [ -e /tmp/mkv/models/llama8b-random ] || { python3 benchmarks/suite/make_random_model.py \
      --out /tmp/mkv/models/llama8b-random > "$LOG/model.txt" 2>&1; say "8B model rc=$?"; }
    for gpu in 0 1; do
      if [ $gpu = 0 ]; then run="prefill_8b PHASE=prefill MODEL=/tmp/mkv/models/llama8b-random INPUT=8192 OUTPUT=64 N=16"
      else run="decode_smollm2 PHASE=decode INPUT=3072 OUTPUT=1024 N=240"; fi
      name=${run%% *}
      (sleep $((gpu * 20))  # profile_gpu.sh installs the project first: not both at once
       env CUDA_VISIBLE_DEVICES=$gpu T0=$T0 BUDGET_S=${BUDGET_S:-560} OUT=$OUT/$name PORT=$((30021 + gpu)) \
         MOSAICKV_SYNC_CENSUS=1 MOSAIC_EXTRA="$MOSAIC_FLAGS" ${run#* } bash benchmarks/serving/profile_gpu.sh \
         > "$LOG/census_$name.txt" 2>&1
       say "census $name rc=$?"
       # A call brings back 8 files: steps.txt is in profile.tgz too, and the torch profile ran under the census.
       rm -f "$OUT/$name/steps.txt" "$OUT/$name/torch_summary.json"
       mkdir -p "$LOG/$name" && tar xzf "$OUT/$name/profile.tgz" -C "$LOG/$name" ./info_end.json 2>/dev/null \
         && python3 -c "import json, sys
info = json.load(open(sys.argv[1]))['internal_states'][0]['kv_compress_info']
json.dump({'run': sys.argv[2], 'sync_census': info.get('sync_census')}, open(sys.argv[3], 'w'), indent=1)" \
         "$LOG/$name/info_end.json" "$name" "$OUT/$name/census.json"; say "census $name: $(head -c 300 "$OUT/$name/census.json")") &
    done
    wait ;;
  eq)
    eq "${BUDGET_S:-540}" ;;
  smollm2|rows|stage_smollm2)
    model=${MODEL:-smollm2}; workload=${WORKLOAD:-random8k}
    if [ "$PART" = stage_smollm2 ]; then stage; BUDGET_S=${BUDGET_S:-480}; fi
    if [ "$PART" != rows ]; then model=smollm2; workload=random8k; fi
    # A model that is not staged (the 8B) is built once here, not by both GPUs' suites at once.
    eval "$(python3 benchmarks/suite/workloads.py plan "$model" "$workload" | grep -E '^(MODEL_PATH|BUILD)=')"
    if [ ! -e "$MODEL_PATH" ] && [ -n "$BUILD" ]; then $BUILD > "$LOG/model.txt" 2>&1; say "model $model rc=$?"; fi
    suite 0 30000 "${BUDGET_S:-560}" MODEL=$model WORKLOAD=$workload ${N:+N=$N} METHODS="${GPU0_METHODS:-none fp8}" &
    [ "$NGPU" -gt 1 ] && suite 1 30010 "${BUDGET_S:-560}" MODEL=$model WORKLOAD=$workload ${N:+N=$N} \
      METHODS="${GPU1_METHODS:-mosaic3 mosaic6}"
    wait ;;
  stage_host)
    stage
    (export CUDA_VISIBLE_DEVICES=1
     TESTS_S=$(( 570 - $(date +%s) + T0 )) OUT=$OUT PART=tests bash benchmarks/backend_gpu.sh > "$LOG/tests.txt" 2>&1
     say "tests: $(grep -E '^[0-9]+ (passed|failed)|passed|failed' /tmp/backend_gpu_tests/pytest.txt | tail -1)") &
    export CUDA_VISIBLE_DEVICES=0
    sealing
    timeout 150 python3 benchmarks/host/decode_step_host.py --device cuda --requests 240 512 --segments 247 --layers 30 \
      --kv-heads 3 --head-dim 64 --group 3 --repeat 5 --policy-formats benchmarks/results/eval_dense_values_2k_segment.json \
      --policy mosaic_dense_values_3x --profile --json "$OUT/host_decode_step_smollm2_cuda.json" > "$LOG/host_step.txt" 2>&1
    say "decode_step_host rc=$?"
    # Where a prefill's (PHASE=prefill, the default) or a decode step's (PHASE=decode: 240
    # running, as the random8k rows) time goes: mosaic 3x on SmolLM2, 8k-token prompts.
    # SmolLM2's context is 8,192 tokens: prompt and output within it (the tenth run's 7,936 + 1,024 were refused).
    if [ "${PHASE:-prefill}" = decode ]; then shape="INPUT=7040 OUTPUT=1024 N=240"; else shape="INPUT=7936 OUTPUT=256 N=48"; fi
    env T0=$T0 BUDGET_S=565 OUT=$OUT/profile PHASE=${PHASE:-prefill} $shape MOSAIC_EXTRA="$MOSAIC_FLAGS" \
      bash benchmarks/serving/profile_gpu.sh > "$LOG/profile.txt" 2>&1
    say "${PHASE:-prefill} profile rc=$?"
    wait ;;
  kernels)
    # On one GPU, ncu would share it with the timings below: left out.
    [ "$NGPU" -gt 1 ] && (CUDA_VISIBLE_DEVICES=0 timeout 540 bash benchmarks/kernels/ncu_decode.sh "$OUT/ncu" > "$LOG/ncu.txt" 2>&1
     say "ncu_decode rc=$?") &
    export CUDA_VISIBLE_DEVICES=$(( NGPU > 1 ? 1 : 0 ))
    # The server's 32-token segments: the presets' real mixes and dense, every setting
    # (0: the server's tiles; 10: sparse keys unpacked; 13: runs cut per format pair;
    # 14: a GQA group's sparse-key gathers unrolled).
    mkdir -p "$OUT/diag32"
    timeout 400 python3 benchmarks/kernels/diag_formats.py --segment 32 --out "$OUT/diag32" ${DIAG_SETTINGS:+--settings $DIAG_SETTINGS} \
      --formats mosaic_dense_values_3x mosaic_dense_values_6x dense_8and32 dense > "$LOG/diag32.txt" 2>&1
    say "diag_formats --segment 32 rc=$?"
    # The host's decode step at SmolLM2's shape with the pool on the GPU, as a server's
    # (240 requests: the seventh run's serving batch; this CPU's figures in results/).
    timeout $(( 580 - $(date +%s) + T0 )) python3 benchmarks/host/decode_step_host.py --device cuda \
      --requests 240 --segments 247 --layers 30 --kv-heads 3 --head-dim 64 --group 3 --max-programs 1056 --repeat 3 \
      --policy-formats benchmarks/results/eval_dense_values_2k_segment.json --policy mosaic_dense_values_3x \
      --json "$OUT/host_decode_step_smollm2_240_cuda.json" > "$LOG/host_step.txt" 2>&1
    say "decode_step_host rc=$?"
    # Issue 4's benchmark (copy bandwidth, FlashInfer's dense decode, ours over the policy's
    # mixes) in what is left of the call, when the GPU is not shared with ncu.
    if [ "$NGPU" -eq 1 ]; then
      mkdir -p "$OUT/bench_decode"
      timeout $(( 585 - $(date +%s) + T0 )) python3 benchmarks/kernels/bench_decode.py --out "$OUT/bench_decode" \
        --budget-s $(( 540 - $(date +%s) + T0 )) --policy-formats benchmarks/results/eval_dense_values_2k_segment.json \
        > "$LOG/bench_decode.txt" 2>&1
      say "bench_decode rc=$?"
    fi
    wait ;;
  stage_kernels)
    stage
    (export CUDA_VISIBLE_DEVICES=1
     python3 benchmarks/suite/make_random_model.py --out /tmp/mkv/models/llama8b-random > "$LOG/model.txt" 2>&1
     say "8B model rc=$?"
     TESTS_S=$(( 560 - $(date +%s) + T0 )) OUT=$OUT PART=tests bash benchmarks/backend_gpu.sh > "$LOG/tests.txt" 2>&1
     say "tests: $(grep -E '^[0-9]+ (passed|failed)|passed|failed' /tmp/backend_gpu_tests/pytest.txt | tail -1)") &
    mkdir -p "$OUT/diag32" "$OUT/bench_decode"
    (export CUDA_VISIBLE_DEVICES=0
     timeout 330 python3 benchmarks/kernels/diag_formats.py --segment 32 --out "$OUT/diag32" > "$LOG/diag32.txt" 2>&1
     say "diag_formats rc=$?"
     timeout $(( 570 - $(date +%s) + T0 )) python3 benchmarks/kernels/bench_decode.py --out "$OUT/bench_decode" \
       --budget-s $(( 520 - $(date +%s) + T0 )) --policy-formats benchmarks/results/eval_dense_values_2k_segment.json \
       > "$LOG/bench_decode.txt" 2>&1
     say "bench_decode rc=$?")
    wait
    grep -E "^(mosaic_dense_values_3x|dense_8and32|mix3x) " "$LOG/diag32.txt" ;;
  accuracy)
    # The twelfth run shared one call between accuracy and two suite comparisons on one GPU:
    # the 8B server missed its share and the gsp benches were cut. One comparison per GPU.
    (env CUDA_VISIBLE_DEVICES=$(( NGPU > 1 ? 1 : 0 )) T0=$T0 BUDGET_S=${BUDGET_S:-560} OUT=$OUT/accuracy PORT=30200 \
       METHODS="${ACC_METHODS:-none mosaic_heads3 mosaic_heads6 mosaic_heads14_3}" SAMPLES=${SAMPLES:-4} \
       PARALLEL=${PARALLEL:-4} MOSAIC_FLAGS="${ACC_FLAGS:---kv-compress-sealing device}" \
       bash benchmarks/suite/accuracy_gpu.sh > "$LOG/accuracy.txt" 2>&1
     say "accuracy rc=$?: $(grep -E 'healthy|accuracy rc' "$OUT/accuracy/steps.txt" | tr '\n' ';')") &
    if [ -n "${GPU0_METHODS:-}" ] && [ "$NGPU" -gt 1 ]; then
      sleep 20  # both install the project first: not at once
      suite 0 30000 "${BUDGET_S:-560}" MODEL=${MODEL:-smollm2} WORKLOAD=${WORKLOAD:-gsp} METHODS="$GPU0_METHODS"
    fi
    wait ;;
  stage_eq)
    stage
    python3 benchmarks/suite/make_random_model.py --out /tmp/mkv/models/llama8b-random > "$LOG/model.txt" 2>&1
    say "8B model rc=$?"
    eq 470
    # The decode-step GPU tests in what is left (before eq they took 134 s of its budget).
    CUDA_VISIBLE_DEVICES=1 timeout $(( 580 - $(date +%s) + T0 )) python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_sglang_decode_rows.py tests/test_sglang_decode_graph.py tests/test_plan_reuse.py \
      > "$OUT/gpu_tests_decode_step.txt" 2>&1
    say "decode-step GPU tests: $(tail -1 "$OUT/gpu_tests_decode_step.txt")" ;;
esac
tail -n 4 "$LOG"/*.txt
tar czf "$OUT/session_$PART.tgz" -C "$LOG" .
