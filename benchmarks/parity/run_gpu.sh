#!/usr/bin/env bash
# HF vs SGLang parity and lossless == none, in one device call after .device/c5/stage.sh:
#   T0=$(date +%s); bash .device/c5/stage.sh && T0=$T0 bash benchmarks/parity/run_gpu.sh
# Every step is its own process with its own time limit; the comparisons run on whatever finished.
set -uo pipefail
export PYTHONPATH=/tmp/mkv/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/parity_out}; mkdir -p "$OUT"; W=/tmp/parity; mkdir -p $W
T0=${T0:-$(date +%s)}; DEADLINE=$((T0 + ${BUDGET_S:-580}))
M=${MODEL:-/tmp/mkv/models/smollm2-135m-instruct}
P="python3 benchmarks/parity/parity.py"
left() { echo $((DEADLINE - $(date +%s))); }
step() {  # name reserve_s command...: run with what is left minus the reserve for later steps
  local name=$1 reserve=$2; shift 2; local t=$(( $(left) - reserve ))
  if [ $t -lt 20 ]; then echo "$name skipped ($t s)" | tee -a $OUT/steps.txt; return; fi
  local s=$(date +%s); timeout $t "$@" > $OUT/$name.log 2>&1; local rc=$?
  echo "$name rc=$rc ${t}s-limit took $(( $(date +%s) - s ))s" | tee -a $OUT/steps.txt
}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/device.txt
step hf_fp32 420 $P hf --model $M --dtype float32 --hooks --out $W/hf_fp32.pt
step hf_bf16 400 $P hf --model $M --dtype bfloat16 --out $W/hf_bf16.pt
step sgl_dump 300 $P sglang --model $M --dump $W/dump --out $W/sgl_dump.pt
step sgl_lossless 220 $P sglang --model $M --out $W/sgl_lossless.pt \
  --engine '{"kv_compress": "mosaickv", "kv_compress_config": "lossless", "disable_radix_cache": false}'
step sgl_default 60 $P sglang --model $M --out $W/sgl_default.pt
for pair in "hf_fp32 hf_bf16" "hf_fp32 sgl_dump" "hf_bf16 sgl_dump" "hf_fp32 sgl_default" "hf_bf16 sgl_default" \
            "sgl_dump sgl_lossless" "sgl_default sgl_lossless" "hf_bf16 sgl_lossless" "sgl_dump sgl_default"; do
  set -- $pair
  [ -f $W/$1.pt ] && [ -f $W/$2.pt ] || continue
  dump=""; [ "$2" = sgl_dump ] && [ "$1" = hf_fp32 -o "$1" = hf_bf16 ] && dump="--dump $W/dump"
  $P compare --hf $W/$1.pt --sglang $W/$2.pt $dump --json $OUT/parity_${1}_vs_${2}.json >> $OUT/compare.txt 2>&1
done
cat $OUT/steps.txt $OUT/compare.txt
for f in $OUT/*.log; do tail -c 300000 $f > $f.t && mv $f.t $f; done
