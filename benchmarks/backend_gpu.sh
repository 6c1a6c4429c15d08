#!/usr/bin/env bash
# One device call on a staged machine (after .device/c5/stage.sh): the GPU tests of the
# kernels and of the SGLang backend's Triton path (against its PyTorch reference path),
# then the parity tests (lossless through the kernels against --kv-compress none, token
# for token). Everything lands in $OUT/backend_gpu.tgz, a summary on stdout.
#   bash benchmarks/backend_gpu.sh
set -uo pipefail
export PYTHONPATH=/tmp/mkv/site PYTHONUNBUFFERED=1
R=/tmp/backend_gpu; mkdir -p $R
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $R/pip.log 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $R/device.txt
echo "python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_kernels_decode.py tests/test_kernels_extend.py tests/test_kernels_pack.py tests/test_sglang_attention.py" > $R/cmd_kernels.txt
timeout ${KERNEL_S:-200} python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_kernels_decode.py \
  tests/test_kernels_extend.py tests/test_kernels_pack.py tests/test_sglang_attention.py > $R/kernels_pytest.txt 2>&1
echo "kernel and backend tests rc=$?" | tee -a $R/steps.txt
echo "python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu_parity.py --basetemp $R/parity" > $R/cmd_parity.txt
timeout ${PARITY_S:-360} python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu_parity.py \
  --basetemp $R/parity > $R/parity_pytest.txt 2>&1
echo "parity tests rc=$?" | tee -a $R/steps.txt
find $R/parity -name "*.pt" -delete 2>/dev/null
tail -15 $R/kernels_pytest.txt; tail -12 $R/parity_pytest.txt
tar czf $OUT/backend_gpu.tgz -C /tmp backend_gpu
