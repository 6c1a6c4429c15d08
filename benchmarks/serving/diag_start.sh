#!/usr/bin/env bash
# Why does a mosaic server not get healthy? One device call on a staged machine:
#   OUT=/tmp/diag bash benchmarks/serving/diag_start.sh
# Starts the mosaic server at full size; if /health has not answered WAIT_S after
# Uvicorn is up, dumps every thread of the scheduler (py-spy when present, then
# faulthandler through SIGABRT). Then starts it again with a small pool (--max-total-tokens)
# to tell a cost that grows with the pool from one that does not.
set -uo pipefail
export PYTHONPATH=/tmp/mkv/site PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
OUT=${OUT:?}; mkdir -p "$OUT"; DEADLINE=$(( $(date +%s) + ${BUDGET_S:-420} ))
M=${MODEL:-/tmp/mkv/models/smollm2-135m-instruct}
BASE="--model-path $M --mem-fraction-static 0.5"
source benchmarks/serving/lib.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip.log 2>&1

probe() {  # NAME PORT FLAGS...
  local name=$1 port=$2; shift 2
  if start_server $name $port ${START_S:-100} "$@"; then
    curl -sf -m 60 "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
      -d "{\"model\":\"$M\",\"prompt\":\"$(printf 'word %.0s' $(seq 1 600))\",\"max_tokens\":8,\"temperature\":0}" \
      > $OUT/completion_$name.json; echo "$name: completion rc=$? at $(date +%T)" | tee -a $OUT/steps.txt
  else
    for pid in $(pgrep -g $SERVER_PID); do
      echo "== pid $pid $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-80)" >> $OUT/stacks_$name.txt
      command -v py-spy > /dev/null && py-spy dump --pid $pid >> $OUT/stacks_$name.txt 2>&1
    done
    pkill -ABRT -f "sglang::scheduler" ; sleep 5
  fi
  stop_server
}
probe mosaic_full 30001 --kv-compress mosaickv --kv-compress-config mosaic
probe mosaic_small 30002 --kv-compress mosaickv --kv-compress-config mosaic --max-total-tokens 131072
grep -h "MosaicKV\|Traceback\|File \"\|Thread 0x\|Current thread" $OUT/server_*.log | head -150
cat $OUT/steps.txt
