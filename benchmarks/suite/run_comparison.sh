#!/usr/bin/env bash
# One serving comparison, one (model, workload) across methods, in one device call on a
# machine staged as in ../shared/device/README.md (SGLang under /tmp/mkv/site, SmolLM2 at
# /tmp/mkv/models/smollm2-135m-instruct):
#   T0=$(date +%s) MODEL=llama8b-random WORKLOAD=random32k METHODS="none fp8" bash benchmarks/suite/run_comparison.sh
# MODEL, WORKLOAD: names in benchmarks/suite/workloads.py. METHODS: run in this order, from
# none fp8 mosaic3 mosaic6. N (prompts), MEM_FRACTION, EXTRA_FLAGS (launch flags for every
# method) override the table; MOSAIC_FLAGS are launch flags of the mosaic methods alone
# (e.g. '--kv-compress-sealing device', which none and fp8 would refuse). T0 + BUDGET_S is the deadline: each method gets an equal share
# of what is left, at least MIN_METHOD_S, and is recorded as skipped when even that is gone.
# Resumable: records stay in /tmp/mkv/suite/TAG while the machine is warm, and a later call
# with the same settings keeps the methods that finished ("ok") unless FORCE=1. Every call
# writes all records so far to $OUT/suite_MODEL_WORKLOAD_TIME.json and the logs to a .tgz.
set -uo pipefail
export PYTHONPATH=${SITE:-/tmp/mkv/site} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/suite_out}; mkdir -p "$OUT"
T0=${T0:-$(date +%s)}; DEADLINE=$((T0 + ${BUDGET_S:-570}))
MODEL=${MODEL:-smollm2}; WORKLOAD=${WORKLOAD:-random8k}; METHODS=${METHODS:-none fp8 mosaic3 mosaic6}
MIN_METHOD_S=${MIN_METHOD_S:-120}; START_S=${START_S:-300}; RESERVE_S=${RESERVE_S:-25}
S=benchmarks/suite
PLAN=$(python3 $S/workloads.py plan "$MODEL" "$WORKLOAD" "${N:-}" "${MEM_FRACTION:-}" "${EXTRA_FLAGS:-}" "${MOSAIC_FLAGS:-}") || exit 2
eval "$PLAN"  # MODEL_PATH BUILD BASE BENCH_ARGS NUM_PROMPTS MAX_CONCURRENCY INPUT_LEN OUTPUT_LEN TAG
for m in $METHODS; do python3 $S/workloads.py flags "$m" "${MOSAIC_FLAGS:-}" > /dev/null || exit 2; done
CALL="MODEL=$MODEL WORKLOAD=$WORKLOAD METHODS='$METHODS'${N:+ N=$N}${MEM_FRACTION:+ MEM_FRACTION=$MEM_FRACTION}${EXTRA_FLAGS:+ EXTRA_FLAGS='$EXTRA_FLAGS'}${MOSAIC_FLAGS:+ MOSAIC_FLAGS='$MOSAIC_FLAGS'} bash $S/run_comparison.sh"
STATE_ROOT=${STATE_ROOT:-/tmp/mkv/suite}; STATE=$STATE_ROOT/$TAG; PIDFILE=$STATE_ROOT/server.pid
mkdir -p "$STATE"
source benchmarks/serving/lib.sh
step() { echo "$*" | tee -a "$STATE/steps.txt"; }
step "== $(date -u +%FT%TZ) $CALL ($TAG, $(left) s left)"

# A server of an earlier call that was cut off still holds the GPU (started with setsid).
stale=$(cat "$PIDFILE" 2>/dev/null)
if [ -n "$stale" ] && grep -qs sglang.launch_server "/proc/$stale/cmdline"; then
  step "stopping the server an earlier call left running (pid $stale)"; SERVER_PID=$stale; stop_server
fi
rm -f "$PIDFILE"; SERVER_PID=""
trap 'stop_server; exit 143' TERM INT

python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$STATE/pip.log" 2>&1 \
  || step "pip install -e . failed (the mosaic methods need its entry point): see pip.log"
if [ ! -f "$MODEL_PATH/config.json" ]; then
  [ -n "$BUILD" ] || { step "no model at $MODEL_PATH"; exit 2; }
  $BUILD > "$STATE/build.log" 2>&1; step "model build rc=$?: $(tail -1 "$STATE/build.log")"
fi
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)

gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1; }
wait_gpu_free() {  # a stopped server's memory can linger, and the next one sizes its pool from what is free
  local used
  for _ in $(seq 1 30); do used=$(gpu_used); { [ -z "$used" ] || [ "$used" -lt "${GPU_FREE_MIB:-2048}" ]; } && return; sleep 2; done
  step "GPU still holds ${used} MiB before the next server start"
}

run_method() {  # METHOD PORT METHODS_LEFT (this one included)
  local m=$1 port=$2 n_left=$3 status reason="" start_s="" rc
  if [ -z "${FORCE:-}" ] && python3 $S/collect.py done "$STATE" "$m"; then step "$m: kept from an earlier call"; return; fi
  local started; started=$(date -u +%FT%TZ)
  local avail=$(( $(left) - RESERVE_S )); local share=$(( avail / n_left ))
  [ $share -lt $MIN_METHOD_S ] && share=$MIN_METHOD_S; [ $share -gt $avail ] && share=$avail
  local bench_cmd="python3 -m sglang.bench_serving $BENCH_ARGS --port $port --output-file bench_$m.jsonl"
  if [ $avail -lt $MIN_METHOD_S ] && python3 $S/collect.py done "$STATE" "$m"; then
    step "$m: no time left to run it again ($(left) s); its earlier record stays"; return
  fi
  # Files of an earlier attempt must not pass for this one's.
  rm -f "$STATE"/{server_$m.log,cmd_$m.txt,client_$m.log,bench_$m.jsonl,info_${m}_start.json,info_${m}_end.json}
  if [ $avail -lt $MIN_METHOD_S ]; then
    status=skipped; reason="$(left) s left in the call: under MIN_METHOD_S=$MIN_METHOD_S + RESERVE_S=$RESERVE_S"
  else
    local t_end=$(( $(date +%s) + share )) start_budget=$(( share * 3 / 4 < START_S ? share * 3 / 4 : START_S ))
    wait_gpu_free
    local t; t=$(date +%s)
    if OUT=$STATE start_server "$m" $port $start_budget $(python3 $S/workloads.py flags "$m" "${MOSAIC_FLAGS:-}"); then
      echo $SERVER_PID > "$PIDFILE"; start_s=$(( $(date +%s) - t ))
      curl -sf -m 30 http://127.0.0.1:$port/server_info > "$STATE/info_${m}_start.json"
      local limit=$(( t_end - $(date +%s) - 15 )); [ $limit -lt 10 ] && limit=10
      timeout $limit python3 -m sglang.bench_serving $BENCH_ARGS --port $port --output-file "$STATE/bench_$m.jsonl" \
        > "$STATE/client_$m.log" 2>&1
      rc=$?
      curl -sf -m 30 http://127.0.0.1:$port/server_info > "$STATE/info_${m}_end.json"
      if ! kill -0 $SERVER_PID 2>/dev/null; then rc=died; fi
      case $rc in
        0) status=ok ;;
        died) status=server_died; reason="the server exited during the bench; last log line: $(tail -1 "$STATE/server_$m.log" | cut -c1-300)" ;;
        124) status=bench_timed_out; reason="bench_serving stopped at the method's ${limit} s limit" ;;
        *) status=bench_failed; reason="bench_serving exit $rc: $(grep -v '^\s*$' "$STATE/client_$m.log" | tail -1 | cut -c1-300)" ;;
      esac
    else
      echo $SERVER_PID > "$PIDFILE"
      status=server_failed; reason="$(tail -1 "$STATE/steps.txt"); last log line: $(tail -1 "$STATE/server_$m.log" | cut -c1-300)"
    fi
    stop_server; rm -f "$PIDFILE"
  fi
  python3 $S/collect.py method "$STATE" "$m" --status $status --reason "$reason" --device "$DEVICE" --started "$started" \
    --bench-command "$bench_cmd" --call-command "$CALL" --num-prompts $NUM_PROMPTS --input-len $INPUT_LEN --output-len $OUTPUT_LEN \
    ${MAX_CONCURRENCY:+--max-concurrency $MAX_CONCURRENCY} ${start_s:+--start-s $start_s} | tee -a "$STATE/steps.txt"
}

i=0; set -- $METHODS
for m in $METHODS; do run_method "$m" $((${PORT_BASE:-30000} + i)) $(( $# - i )); i=$((i + 1)); done

NAME=suite_${MODEL}_${WORKLOAD}_$(date -u +%Y%m%dT%H%M)
python3 $S/collect.py merge "$STATE" "$OUT/$NAME.json" --model "$MODEL" --workload "$WORKLOAD" --call-command "$CALL"
for f in "$STATE"/*.log; do  # keep each log's start (KV layout) and end under the 16 MB a returned file may have
  [ "$(stat -c%s "$f")" -gt 3000000 ] && { head -c 1000000 "$f"; echo "[... cut ...]"; tail -c 2000000 "$f"; } > "$f.t" && mv "$f.t" "$f"
done
tar czf "$OUT/${NAME}_logs.tgz" -C "$STATE" .
step "wrote $OUT/$NAME.json and ${NAME}_logs.tgz ($(left) s left)"
