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
  local s=$(date +%s); timeout $t "$@" > $W/$name.log 2>&1; local rc=$?
  echo "$name rc=$rc ${t}s-limit took $(( $(date +%s) - s ))s" | tee -a $OUT/steps.txt
  [ $rc = 0 ] || { echo "=== $name (rc=$rc)"; grep -v "^\s*$" $W/$name.log | tail -40; } >> $OUT/failures.txt
}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $W/pip.log 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $OUT/steps.txt
[ -f $W/hf_fp32.pt ] || step hf_fp32 420 $P hf --model $M --dtype float32 --hooks --out $W/hf_fp32.pt
[ -f $W/hf_bf16.pt ] || step hf_bf16 400 $P hf --model $M --dtype bfloat16 --out $W/hf_bf16.pt
# Stock runs use torch_native: fa3 (SGLang's H100 default) is not in the staged sgl-kernel, and
# flashinfer's JIT plus graph capture outlast a device call (16 s per captured batch size seen).
rm -rf $W/dump; step sgl_dump 180 $P sglang --model $M --dump $W/dump --out $W/sgl_dump.pt --prompts 1 --new 1 \
  --engine '{"attention_backend": "torch_native"}'
step sgl_none 40 $P sglang --model $M --out $W/sgl_none.pt \
  --engine '{"attention_backend": "torch_native", "disable_radix_cache": false}'
[ -f $W/sgl_lossless.pt ] || step sgl_lossless 5 $P sglang --model $M --out $W/sgl_lossless.pt \
  --engine '{"kv_compress": "mosaickv", "kv_compress_config": "lossless", "disable_radix_cache": false}'
for pair in "hf_fp32 hf_bf16" "hf_fp32 sgl_dump" "hf_bf16 sgl_dump" "hf_fp32 sgl_none" "hf_bf16 sgl_none" \
            "sgl_none sgl_lossless" "hf_bf16 sgl_lossless"; do
  set -- $pair
  [ -f $W/$1.pt ] && [ -f $W/$2.pt ] || continue
  dump=""; [ "$2" = sgl_dump ] && [ "$1" = hf_fp32 -o "$1" = hf_bf16 ] && dump="--dump $W/dump"
  $P compare --hf $W/$1.pt --sglang $W/$2.pt $dump --json $OUT/parity_${1}_vs_${2}.json >> $OUT/compare.txt 2>&1
done
cat $OUT/steps.txt $OUT/compare.txt
