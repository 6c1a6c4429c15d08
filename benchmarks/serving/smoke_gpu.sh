#!/usr/bin/env bash
# First end-to-end GPU smoke run of the MosaicKV SGLang plugin (one combined device call).
# Run from the repo root on the GPU machine after .device/c5/stage.sh (see docs/sglang.md):
#   T0=$(date +%s); bash .device/c5/stage.sh && T0=$T0 bash benchmarks/serving/smoke_gpu.sh
# Servers: SmolLM2-135M-Instruct, --kv-compress mosaickv lossless / mosaickv (mosaic) / none
# (torch_native and triton attention); greedy texts compared. Everything goes to $OUT; summary in $OUT/sglang_smoke_h100.json.
set -uo pipefail
export PYTHONPATH=/tmp/mkv/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/smoke_out}; mkdir -p "$OUT"
T0=${T0:-$(date +%s)}; DEADLINE=$((T0 + ${SMOKE_BUDGET_S:-575}))
MODEL=/tmp/mkv/models/smollm2-135m-instruct
left() { echo $((DEADLINE - $(date +%s))); }
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/pip.txt" 2>&1; echo "pip rc=$?" >> "$OUT/pip.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>&1
python3 -c "import importlib.metadata as m; print([e.value for e in m.entry_points(group='sglang.srt.plugins')])" >> "$OUT/device.txt" 2>&1
BASE="--model-path $MODEL --sampling-backend pytorch --disable-cuda-graph --mem-fraction-static 0.5"

run_mode() {  # name port reserve_s extra flags...
  local name=$1 port=$2 reserve=$3; shift 3
  local log="$OUT/server_$name.log" st="$OUT/mode_$name.status"
  local budget=$(( $(left) - reserve )); [ $budget -gt 200 ] && budget=200
  if [ $budget -lt 45 ]; then echo "skipped: $budget s left" > "$st"; return; fi
  echo "python3 -m sglang.launch_server $BASE --port $port $*" > "$st.cmd"
  local t=$(date +%s)
  setsid python3 -m sglang.launch_server $BASE --port $port "$@" > "$log" 2>&1 &
  local pid=$! ok=0
  while [ $(( $(date +%s) - t )) -lt $((budget - 30)) ]; do
    if ! kill -0 $pid 2>/dev/null; then break; fi
    if curl -sf -m 5 "http://127.0.0.1:$port/health" > /dev/null; then ok=1; break; fi
    sleep 2
  done
  local ready=$(( $(date +%s) - t ))
  if [ $ok = 1 ]; then
    echo "started in ${ready}s" > "$st"
    timeout $(( budget - ready > 20 ? budget - ready : 20 )) python3 benchmarks/serving/smoke_client.py $port "$OUT/mode_$name.json" >> "$log.client" 2>&1
    echo "client rc=$?" >> "$st"
  else
    kill -0 $pid 2>/dev/null && echo "not healthy after ${ready}s" > "$st" || echo "exited after ${ready}s" > "$st"
  fi
  kill -TERM -- -$pid 2>/dev/null
  for i in $(seq 1 15); do kill -0 -- -$pid 2>/dev/null || break; sleep 1; done
  kill -KILL -- -$pid 2>/dev/null; sleep 2
  cat "$log.client" >> "$log" 2>/dev/null; rm -f "$log.client"
}

# Ours first (they start in seconds); the baselines after: torch_native needs no JIT,
# triton (SGLang's usual choice) compiles for about two minutes on a fresh machine.
run_mode lossless 30001 260 --kv-compress mosaickv --kv-compress-config lossless
run_mode mosaic 30002 130 --kv-compress mosaickv
run_mode none 30000 70 --attention-backend torch_native
run_mode none_triton 30003 0 --attention-backend triton

python3 - "$OUT" <<'PY'
import json, os, sys, time
out = sys.argv[1]
def read(p, tail=None):
    try:
        s = open(os.path.join(out, p)).read()
    except OSError:
        return None
    return s if tail is None else "\n".join(s.splitlines()[-tail:])
summary = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "device": read("device.txt"),
           "pip": read("pip.txt", 5), "modes": {}}
names = ("lossless", "mosaic", "none", "none_triton")
for name in names:
    m = {"command": read(f"mode_{name}.status.cmd"), "status": read(f"mode_{name}.status")}
    res = read(f"mode_{name}.json")
    m["started"] = bool(m["status"] and m["status"].startswith("started"))
    if res:
        m.update(json.loads(res))
    if not m["started"] or not res:
        m["error_tail"] = read(f"server_{name}.log", 60)
    summary["modes"][name] = m
def texts(name):
    m = summary["modes"][name]
    return [(m.get(k) or {}).get("text") for k in ("chat", "long", "long_repeat")]
summary["greedy_text_equal"] = {f"{a}=={b}": texts(a) == texts(b) and None not in texts(a)
                                for a, b in (("lossless", "none"), ("lossless", "none_triton"), ("none", "none_triton"))}
json.dump(summary, open(os.path.join(out, "sglang_smoke_h100.json"), "w"), indent=1)
print(summary["greedy_text_equal"])
for name, m in summary["modes"].items():
    print(name, m.get("status"), m.get("max_total_num_tokens"), (m.get("chat") or {}).get("text"),
          (m.get("long") or {}).get("text"), (m.get("long_repeat") or {}).get("text"))
    print("  kv_compress_info:", m.get("kv_compress_info"))
PY
rm -f "$OUT"/mode_*.json "$OUT"/mode_*.status* "$OUT"/device.txt "$OUT"/pip.txt
for f in "$OUT"/server_*.log; do  # keep files small; full text is in the summary's error tails when it failed
  [ -f "$f" ] && [ $(stat -c %s "$f") -gt 4000000 ] && tail -c 4000000 "$f" > "$f.t" && mv "$f.t" "$f"
done
ls -la "$OUT"
