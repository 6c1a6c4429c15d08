# Shared by the GPU serving scripts: start a server, wait for health, stop its process group.
# Needs: OUT (results folder), DEADLINE (epoch seconds), BASE (common launch flags).
left() { echo $((DEADLINE - $(date +%s))); }

# start_server NAME PORT BUDGET_S FLAGS...: sets SERVER_PID; returns 0 once /health answers.
# The first on a machine builds FlashInfer's JIT modules first (warm_jit.py says why).
start_server() {
  local name=$1 port=$2 budget=$3; shift 3
  if [ ! -f /tmp/mkv/jit_warm ]; then
    python3 benchmarks/serving/warm_jit.py | tee -a "$OUT/steps.txt" && touch /tmp/mkv/jit_warm
  fi
  echo "python3 -m sglang.launch_server $BASE --port $port $*" > "$OUT/cmd_$name.txt"
  local t=$(date +%s)
  setsid python3 -m sglang.launch_server $BASE --port $port "$@" > "$OUT/server_$name.log" 2>&1 &
  SERVER_PID=$!
  while [ $(( $(date +%s) - t )) -lt "$budget" ]; do
    kill -0 $SERVER_PID 2>/dev/null || { echo "$name: exited after $(( $(date +%s) - t ))s" | tee -a "$OUT/steps.txt"; return 1; }
    if curl -sf -m 5 "http://127.0.0.1:$port/health" > /dev/null; then
      echo "$name: started in $(( $(date +%s) - t ))s" | tee -a "$OUT/steps.txt"; return 0
    fi
    sleep 2
  done
  echo "$name: not healthy after ${budget}s" | tee -a "$OUT/steps.txt"; return 1
}

stop_server() {
  kill -TERM -- -$SERVER_PID 2>/dev/null
  for _ in $(seq 1 15); do kill -0 -- -$SERVER_PID 2>/dev/null || break; sleep 1; done
  kill -KILL -- -$SERVER_PID 2>/dev/null; sleep 2
}
