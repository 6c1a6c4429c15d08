#!/usr/bin/env bash
# Issue 6 on the real server, one device call on a staged machine (at most BUDGET_S, 560 s):
#   T0=$(date +%s); T0=$T0 bash benchmarks/soak/soak_gpu.sh
# 1. soak: --kv-compress mosaickv (mosaic preset) on a capped pool, soak_client.py with
#    SOAK_REQUESTS (2,000) at concurrency 32, then /flush_cache and the invariants.
# 2. fault: the same flags with benchmarks/soak/fault_policy.yaml, whose token scorer
#    raises, returns NaN or the wrong shape in turn; FAULT_REQUESTS (300); part_failures
#    must name it and every request must still complete.
# PARTS="soak" or "fault" runs one part alone (in a call of its own, with more time).
# $OUT gets soak.json, fault.json, summary.json, steps.txt and logs.tgz (server and client
# logs, the exact commands).
set -uo pipefail
export PYTHONPATH=/tmp/mkv/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/soak_out}; mkdir -p "$OUT"
T0=${T0:-$(date +%s)}; DEADLINE=$((T0 + ${BUDGET_S:-560}))
M=${MODEL:-/tmp/mkv/models/smollm2-135m-instruct}
# Dense rows for 128 running requests (128 tokens each with the mosaic preset) and one
# 4,096-token prefill chunk: 20,480 of the 40,960 logical tokens; the other 20,480 are 640
# slabs, about a tenth of what the soak's prompts add up to, so SGLang must evict sealed
# segments. (With 256 requests and a 16k chunk the dense rows took the whole cap: the
# plugin now refuses such a cap at startup.)
BASE="--model-path $M --mem-fraction-static ${MEM:-0.5} --max-running-requests ${MAX_RUNNING:-128} \
--chunked-prefill-size ${CHUNK:-4096} --max-total-tokens ${MAX_TOTAL:-40960} --enable-cache-report --host 127.0.0.1"
PARTS=${PARTS:-"soak fault"}
# Seconds kept for the fault run (server start, 300 requests, stop) when the soak ends.
case " $PARTS " in *" fault "*) FAULT_RESERVE=${FAULT_RESERVE:-200} ;; *) FAULT_RESERVE=8 ;; esac
source benchmarks/serving/lib.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/pip.log" 2>&1
echo "pip rc=$? at $(( $(date +%s) - T0 ))s" | tee -a "$OUT/steps.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>&1

soak_run() {  # NAME PORT RESERVE_S "CLIENT ARGS" SERVER FLAGS...
  local name=$1 port=$2 reserve=$3 client_args=$4; shift 4
  local budget=$(( $(left) - reserve - 60 )); [ $budget -gt 200 ] && budget=200
  [ $budget -lt 40 ] && { echo "$name: skipped, $(left)s left" | tee -a "$OUT/steps.txt"; return; }
  if start_server "$name" "$port" "$budget" "$@"; then
    local d=$(( $(left) - reserve - 20 ))
    if [ $d -lt 60 ]; then
      echo "$name: only $d s left for the client, skipped" | tee -a "$OUT/steps.txt"; stop_server; return
    fi
    local cmd="python3 benchmarks/soak/soak_client.py --port $port --out $OUT/$name.json --deadline-s $d $client_args"
    { echo "PYTHONPATH=$PYTHONPATH"; echo "$cmd"; } >> "$OUT/cmd_$name.txt"
    timeout $((d + 15)) $cmd > "$OUT/client_$name.log" 2>&1
    echo "$name: client rc=$? in $d s budget" | tee -a "$OUT/steps.txt"
  fi
  stop_server
}

case " $PARTS " in *" soak "*)
  soak_run soak 30011 "$FAULT_RESERVE" "--requests ${SOAK_REQUESTS:-2000}" \
    --kv-compress mosaickv --kv-compress-config mosaic ;;
esac
case " $PARTS " in *" fault "*)
  export PYTHONPATH=$PWD/benchmarks/soak/plugin:/tmp/mkv/site  # the fault_injector part's entry point
  soak_run fault 30012 8 \
    "--requests ${FAULT_REQUESTS:-300} --expect-part-failure fault_injector --no-require-eviction" \
    --kv-compress mosaickv --kv-compress-config "$PWD/benchmarks/soak/fault_policy.yaml" ;;
esac

python3 - "$OUT" <<'PY'
import json, os, re, sys
out = sys.argv[1]
summary = {"device": open(os.path.join(out, "device.txt")).read().strip(),
           "steps": open(os.path.join(out, "steps.txt")).read().splitlines()}
for name in ("soak", "fault"):
    cmd = os.path.join(out, f"cmd_{name}.txt")
    run = {"commands": open(cmd).read().splitlines() if os.path.exists(cmd) else None}
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        rec = json.load(open(path))
        run.update(ok=rec.get("ok"), figures=rec.get("figures"), error=rec.get("error"),
                   failed=[c for c in rec.get("checks", []) if not c["ok"]])
    log = os.path.join(out, f"server_{name}.log")
    if os.path.exists(log):  # first error lines of the server, to read without the tarball
        lines = open(log, errors="replace").read().splitlines()
        run["server_errors"] = [l[:300] for l in lines if re.search(r"Traceback|Error|error:", l)][:20]
    summary[name] = run
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({k: (v.get("figures"), v.get("failed")) if isinstance(v, dict) else v for k, v in summary.items()},
                 indent=1)[:6000])
PY
cd "$OUT" && for f in *.log; do tail -c 2000000 "$f" > "$f.t" && mv "$f.t" "$f"; done
tar czf logs.tgz ./*.log ./cmd_*.txt device.txt 2>/dev/null && rm -f ./*.log ./cmd_*.txt device.txt
ls -la "$OUT"
