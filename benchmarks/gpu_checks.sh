#!/usr/bin/env bash
# One device call on a staged machine (after .device/c5/stage.sh): the kernels' GPU tests,
# the pack and sealing benchmarks, then the mosaic server's cached-prefix fidelity and
# bench_serving (serve_gpu.sh with SKIP_NONE=1). Everything lands in $OUT/gpu_checks.tgz
# plus a summary on stdout.
#   T0=$(date +%s); T0=$T0 bash benchmarks/gpu_checks.sh
set -uo pipefail
export PYTHONPATH=/tmp/mkv/site PYTHONUNBUFFERED=1
T0=${T0:-$(date +%s)}; R=/tmp/gpu_checks; mkdir -p $R
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $R/pip.log 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_kernels_decode.py tests/test_kernels_extend.py \
  tests/test_kernels_pack.py > $R/kernels_pytest.txt 2>&1; echo "kernel tests rc=$?" | tee -a $R/steps.txt
timeout 90 python3 benchmarks/kernels/bench_pack.py --out $R > $R/bench_pack.log 2>&1; echo "bench_pack rc=$?" | tee -a $R/steps.txt
timeout 90 python3 benchmarks/sealing/bench_seal.py --threads 1 2 4 8 --json $R/sealing.json > $R/bench_seal.log 2>&1
echo "bench_seal rc=$?" | tee -a $R/steps.txt
T0=$T0 BUDGET_S=${BUDGET_S:-560} SKIP_NONE=1 RESERVE_MOSAIC=20 OUT=$R/serve bash benchmarks/serving/serve_gpu.sh > $R/serve_run.txt 2>&1
echo "serve rc=$?" | tee -a $R/steps.txt
tail -5 $R/kernels_pytest.txt; tail -3 $R/bench_pack.log; cat $R/sealing.json 2>/dev/null; tail -12 $R/serve_run.txt
tar czf $OUT/gpu_checks.tgz -C /tmp gpu_checks
