#!/usr/bin/env bash
# Device calls on a staged machine (after .device/c5/stage.sh), one PART per call (each
# fits the 10-minute limit); everything lands in $OUT/backend_gpu_PART.tgz (a call brings
# back at most 8 files), a summary on stdout.
#   PART=tests  bash benchmarks/backend_gpu.sh   # GPU tests of the backend's Triton path, compile warm-up and decode graphs
#                                                (TEST_FILES="tests/test_kernels_decode.py ...": only those files)
#   PART=parity bash benchmarks/backend_gpu.sh   # lossless (sdpa and kernels) against none and HF
#   PART=serve  bash benchmarks/backend_gpu.sh   # serve_gpu.sh: mosaic on the kernels, then none
set -uo pipefail
export PYTHONPATH=/tmp/mkv/site PYTHONUNBUFFERED=1
PART=${PART:?set PART=tests, parity or serve}
R=/tmp/backend_gpu_$PART; mkdir -p $R
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $R/pip.log 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
git rev-parse HEAD > $R/commit.txt 2>/dev/null || true
case $PART in
  tests)
    all="tests/test_kernels_knapsack.py tests/test_kernels_channel_pricing.py tests/test_sglang_attention.py tests/test_kernels_decode.py tests/test_kernels_graph_plan.py tests/test_sglang_decode_graph.py tests/test_plan_reuse.py tests/test_compress_on_device.py tests/test_packed_sealing.py tests/test_block_runs.py tests/test_uploads.py tests/test_sglang_decode_rows.py tests/test_query_stats_gpu.py tests/test_sync_census.py tests/test_sglang_radix_written.py tests/test_seal_thread.py"
    cmd="python3 -m pytest -m gpu -q -p no:cacheprovider -rA --durations=0 ${TEST_FILES:-$all}"
    echo "$cmd" > $R/cmd.txt
    timeout ${TESTS_S:-540} $cmd > $R/pytest.txt 2>&1; echo "tests rc=$?" | tee -a $R/steps.txt
    tail -30 $R/pytest.txt ;;
  parity)
    cmd="python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu_parity.py --basetemp $R/parity"
    echo "$cmd" > $R/cmd.txt
    timeout ${PARITY_S:-560} $cmd > $R/pytest.txt 2>&1; echo "parity rc=$?" | tee -a $R/steps.txt
    find $R/parity -name "*.pt" -delete 2>/dev/null
    tail -15 $R/pytest.txt ;;
  serve)
    T0=$T0 BUDGET_S=${BUDGET_S:-560} OUT=$R/serve bash benchmarks/serving/serve_gpu.sh > $R/serve_run.txt 2>&1
    echo "serve rc=$?" | tee -a $R/steps.txt
    grep -h "MosaicKV: .* attention kernel variants" $R/serve/server_*.log
    tail -12 $R/serve_run.txt ;;
  *) echo "PART=$PART is not one of tests, parity, serve"; exit 2 ;;
esac
tar czf $OUT/backend_gpu_$PART.tgz -C /tmp backend_gpu_$PART
