#!/usr/bin/env bash
# none vs mosaickv (mosaic, 3x) on the real server, one device call on a staged machine:
#   T0=$(date +%s); T0=$T0 [WITH_HEADS=1 RESERVE_MOSAIC=450] [SKIP_NONE=1] [MOSAIC_EXTRA=--kv-compress-cuda-graph] \
#     bash benchmarks/serving/serve_gpu.sh
# (SKIP_NONE: compare against a fidelity_none.json kept from an earlier call, on the host;
# MOSAIC_EXTRA: more flags for the mosaic server.)
# Per server: token capacity (/get_server_info), next-token fidelity on text whose prefix
# sits in the radix cache (fidelity_client.py), then bench_serving generated-shared-prefix.
set -uo pipefail
export PYTHONPATH=/tmp/mkv/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/serve_out}; mkdir -p "$OUT"
T0=${T0:-$(date +%s)}; DEADLINE=$((T0 + ${BUDGET_S:-580}))
M=${MODEL:-/tmp/mkv/models/smollm2-135m-instruct}
BASE="--model-path $M --mem-fraction-static 0.5"
GSP=${GSP:-"--gsp-num-groups 4 --gsp-prompts-per-group 4 --gsp-system-prompt-len 512 --gsp-question-len 32 --gsp-output-len 16"}
FID=${FID:-"--texts 4 --prefix 1536 --total 2048"}
source benchmarks/serving/lib.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1

measure() {  # NAME PORT START_BUDGET RESERVE FLAGS...
  local name=$1 port=$2 budget=$3 reserve=$4; shift 4
  local t=$(( $(left) - reserve )); [ $t -lt $budget ] && budget=$t
  [ $budget -lt 30 ] && { echo "$name: skipped" | tee -a $OUT/steps.txt; return; }
  if start_server $name $port $budget "$@"; then
    curl -sf -m 30 http://127.0.0.1:$port/get_server_info > $OUT/info_${name}_start.json
    timeout $(( $(left) - reserve > 20 ? $(left) - reserve : 20 )) \
      python3 benchmarks/serving/fidelity_client.py run $port $M $OUT/fidelity_$name.json $FID >> $OUT/client_$name.log 2>&1
    echo "$name: fidelity rc=$?" | tee -a $OUT/steps.txt
    curl -sf -m 30 http://127.0.0.1:$port/get_server_info > $OUT/info_${name}_prebench.json
    echo "python3 -m sglang.bench_serving --backend sglang --port $port --model $M --dataset-name generated-shared-prefix $GSP --output-file bench_$name.jsonl" > $OUT/cmd_bench_$name.txt
    timeout $(( $(left) - reserve > 20 ? $(left) - reserve : 20 )) \
      python3 -m sglang.bench_serving --backend sglang --port $port --model $M --dataset-name generated-shared-prefix \
      $GSP --output-file $OUT/bench_$name.jsonl >> $OUT/client_$name.log 2>&1
    echo "$name: bench rc=$?" | tee -a $OUT/steps.txt
    curl -sf -m 30 http://127.0.0.1:$port/get_server_info > $OUT/info_${name}_end.json
  fi
  stop_server
}

measure mosaic 30001 150 ${RESERVE_MOSAIC:-250} --kv-compress mosaickv --kv-compress-config mosaic ${MOSAIC_EXTRA:-}
[ -n "${WITH_HEADS:-}" ] && measure mosaic_heads 30002 150 250 --kv-compress mosaickv --kv-compress-config mosaic_heads
# torch_native: no JIT and no graph capture to wait for (see benchmarks/parity/run_gpu.sh).
[ -z "${SKIP_NONE:-}" ] && measure none 30000 200 20 --attention-backend torch_native
for other in mosaic mosaic_heads; do
  [ -f $OUT/fidelity_none.json ] && [ -f $OUT/fidelity_$other.json ] && \
    python3 benchmarks/serving/fidelity_client.py compare $OUT/fidelity_none.json $OUT/fidelity_$other.json $OUT/fidelity_${other}_vs_none.json
done
python3 - $OUT <<'PY'
import json, os, sys
out = sys.argv[1]
for name in ("none", "mosaic", "mosaic_heads"):
    p = os.path.join(out, f"info_{name}_end.json")
    if os.path.exists(p):
        info = json.load(open(p))
        st = (info.get("internal_states") or [{}])[0]
        print(name, "max_total_num_tokens", info.get("max_total_num_tokens"), "kv_compress_info", st.get("kv_compress_info"))
    b = os.path.join(out, f"bench_{name}.jsonl")
    if os.path.exists(b):
        r = json.loads(open(b).read().splitlines()[-1])
        print(name, {k: r.get(k) for k in ("completed", "total_output_tokens", "output_throughput", "median_ttft_ms", "median_tpot_ms", "duration")})
PY
cat $OUT/steps.txt
for f in $OUT/*.log; do tail -c 300000 $f > $f.t && mv $f.t $f; done
