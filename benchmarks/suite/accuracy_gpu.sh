#!/usr/bin/env bash
# Issue 5, section 2 on the GPU, one device call on a staged machine: `mosaickv accuracy`
# (the RULER-style suite of mosaickv/tasks.py) against SmolLM2 servers that share this
# GPU, one per method, started together and asked side by side (--concurrent):
#   T0=$(date +%s) METHODS="none fp8 mosaic3 mosaic6" SAMPLES=1 bash benchmarks/suite/accuracy_gpu.sh
# METHODS: none, fp8 (2x), or a preset of policies/presets/ (or a policy file of
# benchmarks/suite/) followed by its ratio, how many times fewer KV bytes than dense
# (mosaic3, mosaic_heads6, snapkv3, uniform2d6, think1.5, mosaic_heads14_3: an underscore
# parts a name that ends in a digit; a policy file `base: PRESET` + `ratio: N` is written
# for it under $OUT/policies). Two runs
# side by side (one per GPU) take their own OUT and PORT; `mosaickv accuracy-merge` joins
# their JSONs. PARALLEL=N keeps N of each method's requests in flight (default 1), and
# MOSAIC_FLAGS are added to the MosaicKV methods' flags (default none: sealing in host
# worker processes). In the twelfth run a MosaicKV request took 2.3 to 4.2 s, 0.6 to 2.5 of
# them waiting for host sealing of its primed context, where `none` took 0.1 to 0.2 s;
# '--kv-compress-sealing device' seals SmolLM2 at over 1,600 segments a second.
# Every server gets the same flags but the method's:
# a capped pool (--max-total-tokens), so that the servers fit one GPU together whatever the
# order their memory profiles run in. $OUT gets accuracy.json, accuracy.png, steps.txt and
# logs.tgz (every server's log and command, the policies written).
set -uo pipefail
export PYTHONPATH=/tmp/mkv/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/accuracy_out}; mkdir -p "$OUT"
T0=${T0:-$(date +%s)}; DEADLINE=$((T0 + ${BUDGET_S:-560}))
M=${MODEL:-/tmp/mkv/models/smollm2-135m-instruct}
METHODS=${METHODS:-none fp8 mosaic3 mosaic6}
BASE="--model-path $M --mem-fraction-static 0.5 --max-total-tokens ${MAX_TOTAL:-65536} --max-running-requests 8 \
--sampling-backend pytorch --host 127.0.0.1"
source benchmarks/serving/lib.sh
flags_of() {  # none, fp8, or PRESET then its ratio: mosaic3, snapkv6, mosaic_heads3, think1.5, ...
  case $1 in
    none) echo "--attention-backend triton" ;;
    fp8) echo "--attention-backend triton --kv-cache-dtype fp8_e4m3" ;;
    *)
      local ratio preset base
      ratio=$(grep -oE '[0-9]+(\.[0-9]+)?$' <<< "$1"); preset=${1%"$ratio"}; preset=${preset%_}
      if [ -n "$ratio" ] && [ -f "policies/presets/$preset.yaml" ]; then base=$preset
      elif [ -n "$ratio" ] && [ -f "benchmarks/suite/$preset.yaml" ]; then base=$PWD/benchmarks/suite/$preset.yaml
      else
        echo "unknown method $1: none, fp8, or a preset of policies/presets/ (or a policy of benchmarks/suite/) and its" \
          "ratio (mosaic3, snapkv6, think1.5, mosaic_heads14_3)" >&2
        return 2
      fi
      mkdir -p "$OUT/policies"
      printf 'base: %s\nname: %s\nratio: %s\n' "$base" "$1" "$ratio" > "$OUT/policies/$1.yaml"
      echo "--kv-compress mosaickv --kv-compress-config $OUT/policies/$1.yaml ${MOSAIC_FLAGS:-}" ;;
  esac
}
for m in $METHODS; do flags_of "$m" > /dev/null || exit 2; done
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/pip.log" 2>&1
for f in "$OUT"/policies/*.yaml; do  # a ratio a preset cannot reach is refused here, not by a server that never starts
  [ -f "$f" ] && { python3 -c "import sys; from mosaickv.config import load_policy; load_policy(sys.argv[1])" "$f" || exit 2; }
done
if [ ! -f /tmp/mkv/jit_warm ]; then python3 benchmarks/serving/warm_jit.py | tee -a "$OUT/steps.txt" && touch /tmp/mkv/jit_warm; fi

declare -A PIDS PORTS
port=${PORT:-30100}
for m in $METHODS; do
  PORTS[$m]=$port
  echo "python3 -m sglang.launch_server $BASE --port $port $(flags_of "$m")" > "$OUT/cmd_$m.txt"
  setsid python3 -m sglang.launch_server $BASE --port $port $(flags_of "$m") > "$OUT/server_$m.log" 2>&1 &
  PIDS[$m]=$!
  port=$((port + 1))
done
servers=()
t=$(date +%s)
for m in $METHODS; do
  until curl -sf -m 5 "http://127.0.0.1:${PORTS[$m]}/health" > /dev/null; do
    if ! kill -0 "${PIDS[$m]}" 2>/dev/null || [ "$(left)" -lt "${CLIENT_MIN_S:-90}" ]; then break; fi
    sleep 2
  done
  if curl -sf -m 5 "http://127.0.0.1:${PORTS[$m]}/health" > /dev/null; then
    echo "$m: healthy $(( $(date +%s) - t ))s after the starts" | tee -a "$OUT/steps.txt"
    servers+=(--server "$m=http://127.0.0.1:${PORTS[$m]}")
  else
    echo "$m: not healthy ($(left)s left in the call): left out, see server_$m.log" | tee -a "$OUT/steps.txt"
  fi
done
if [ ${#servers[@]} -gt 0 ]; then
  device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  cmd=(python3 -m mosaickv.cli accuracy --tokenizer "$M" "${servers[@]}" --concurrent --parallel ${PARALLEL:-1} --prime-context
       --lengths ${LENGTHS:-1024 2048 4096 7168} --samples ${SAMPLES:-1} --device "$device, one GPU shared by the servers"
       --output "$OUT/accuracy.json" --plot "$OUT/accuracy.png" --quiet)
  echo "${cmd[*]}" > "$OUT/cmd_accuracy.txt"
  timeout $(( $(left) - 20 )) "${cmd[@]}" > "$OUT/accuracy.log" 2>&1
  echo "accuracy rc=$? at $(( $(date +%s) - T0 ))s" | tee -a "$OUT/steps.txt"
  tail -20 "$OUT/accuracy.log"
fi
for m in $METHODS; do SERVER_PID=${PIDS[$m]} stop_server & done
wait
# A device call brings back 8 files: the logs, commands and policies go in one.
cd "$OUT" && kept=$(ls -d ./*.log ./cmd_*.txt ./policies 2>/dev/null) && tar czf logs.tgz $kept && rm -rf $kept
ls -la "$OUT"
