#!/usr/bin/env bash
# Sealing and extend measurements for one GPU of a staged machine (../shared/device/README.md),
# each result JSON in DIR (default $OUT), the benchmarks' output in DIR/logs.tgz (a device
# call brings back at most 8 files):
#   CUDA_VISIBLE_DEVICES=1 bash benchmarks/sealing/gpu_sealing.sh [DIR]
set -uo pipefail
D=${1:-$OUT}; L=$(mktemp -d); mkdir -p "$D"
export PYTHONUNBUFFERED=1
run() { local name=$1 limit=$2; shift 2; echo "== $name: $*"; timeout "$limit" "$@" > "$L/$name.txt" 2>&1; echo "$name rc=$?"; tail -c 600 "$L/$name.txt"; echo; }
run pricing_ops 120 python3 benchmarks/sealing/bench_pricing_ops.py --json "$D/sealing_kernels.json"
run seal 240 python3 benchmarks/sealing/bench_seal.py --device cuda --layers 32 --kv-heads 8 --head-dim 128 \
  --segments 256 --batch 32 64 128 --profile 32 --json "$D/sealing_batched.json"
run seal_no_lowrank 120 python3 benchmarks/sealing/bench_seal.py --device cuda --policy benchmarks/sealing/mosaic_no_lowrank.yaml \
  --layers 32 --kv-heads 8 --head-dim 128 --segments 128 --batch 32 --profile 32 --json "$D/sealing_no_lowrank.json"
run seal_smollm2 120 python3 benchmarks/sealing/bench_seal.py --device cuda --layers 30 --kv-heads 3 --head-dim 64 \
  --segments 364 --batch 32 182 --json "$D/sealing_smollm2.json"
run extend 200 python3 benchmarks/kernels/bench_extend.py --json "$D/extend.json" --tiles 32x32 64x32 64x64
tar czf "$D/logs.tgz" -C "$L" .
