#!/usr/bin/env bash
# Where a MosaicKV decode step's time goes on the real server, one device call on a staged
# machine: bench_serving keeps a decode batch running while py-spy samples the scheduler
# process (every Python frame, ours and SGLang's), then SGLang's own torch profiler
# (/start_profile) records a few steps (CPU ops and GPU kernels).
#   here, once:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux2014_x86_64 -d .whl py-spy==0.4.1
#   device (carry .whl): T0=$(date +%s) T0=$T0 [MOSAIC_EXTRA=--kv-compress-cuda-graph] bash benchmarks/serving/profile_gpu.sh
# PHASE=decode (default) samples once every request decodes with none queued; PHASE=prefill
# as soon as a prompt's chunks run. $OUT gets steps.txt, profile_summary.json (py-spy: top
# self and inclusive functions), torch_summary.json (torch profiler: top ops and kernels)
# and profile.tgz (everything else): a device call brings back at most 8 files.
set -uo pipefail
case ${PHASE:=decode} in decode|prefill) ;; *) echo "PHASE=$PHASE is not one of decode, prefill"; exit 2 ;; esac
export PYTHONPATH=/tmp/mkv/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/profile_out}; mkdir -p "$OUT"
T0=${T0:-$(date +%s)}; DEADLINE=$((T0 + ${BUDGET_S:-420}))
M=${MODEL:-/tmp/mkv/models/smollm2-135m-instruct}
PORT=${PORT:-30021}  # two profiles side by side (one a GPU) need two
BASE="--model-path $M --mem-fraction-static 0.5 --sampling-backend pytorch --host 127.0.0.1"
source benchmarks/serving/lib.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/pip.log" 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .whl/py_spy-*.whl >> "$OUT/pip.log" 2>&1 \
  || echo "no py-spy wheel under .whl: the torch profiler part only" | tee -a "$OUT/steps.txt"

if start_server mosaic $PORT 240 --kv-compress mosaickv --kv-compress-config "${CONFIG:-mosaic}" ${MOSAIC_EXTRA:-}; then
  bench="python3 -m sglang.bench_serving --backend sglang --port $PORT --model $M --dataset-name random-ids \
--tokenize-prompt --random-input-len ${INPUT:-1024} --random-output-len ${OUTPUT:-768} --random-range-ratio 1.0 \
--num-prompts ${N:-64} --seed 1 --disable-tqdm --output-file $OUT/bench.jsonl"
  echo "$bench" > "$OUT/cmd_bench.txt"
  timeout $(( $(left) - 30 )) $bench > "$OUT/bench.log" 2>&1 &
  bench_pid=$!
  # The phase to sample, from the server log (a fixed sleep can land after the bench).
  if [ "$PHASE" = decode ]; then ready="Decode batch, #running-req: ${N:-64},.*#queue-req: 0"
  else ready="Prefill batch, #new-seq: 1, #new-token: [0-9]{4,}"; fi
  until grep -Eq "$ready" "$OUT/server_mosaic.log" || [ "$(left)" -lt 60 ] \
    || ! kill -0 $bench_pid 2>/dev/null; do sleep 1; done
  echo "$PHASE phase reached at $(( $(date +%s) - T0 )) s (bench running: $(kill -0 $bench_pid 2>/dev/null && echo yes || echo no))" \
    | tee -a "$OUT/steps.txt"
  # A profile of an idle server says nothing: say why the phase never came instead.
  if ! kill -0 $bench_pid 2>/dev/null; then
    err=$(grep -m1 -E "\[http_server\] Error|Traceback" "$OUT/server_mosaic.log")
    echo "no profile: the bench ended before the $PHASE phase${err:+; the server said: $err}" | tee -a "$OUT/steps.txt"
    stop_server; exit 1
  fi
  sched=$(pgrep -g "$SERVER_PID" -f "sglang::scheduler" | head -1)  # this server's, not another GPU's
  echo "scheduler pid ${sched:-none}" | tee -a "$OUT/steps.txt"
  if [ -x /tmp/pyspy/bin/py-spy ] && [ -n "$sched" ]; then
    /tmp/pyspy/bin/py-spy record --pid "$sched" --duration "${PROFILE_S:-20}" --rate 200 --nonblocking \
      --format speedscope -o "$OUT/scheduler.speedscope.json" > "$OUT/pyspy.log" 2>&1
    echo "py-spy rc=$?" | tee -a "$OUT/steps.txt"
  fi
  mkdir -p /tmp/torch_prof_$PORT
  curl -sf -m 30 -X POST "http://127.0.0.1:$PORT/start_profile" -H 'Content-Type: application/json' \
    -d '{"output_dir": "/tmp/torch_prof_'"$PORT"'", "num_steps": 12, "activities": ["CPU", "GPU"], "with_stack": true}' \
    > "$OUT/start_profile.txt" 2>&1
  echo "start_profile rc=$?" | tee -a "$OUT/steps.txt"
  wait $bench_pid; echo "bench rc=$?" | tee -a "$OUT/steps.txt"
  curl -sf -m 30 "http://127.0.0.1:$PORT/get_server_info" > "$OUT/info_end.json"
fi
stop_server
# Into a file, then head: head closing the pipe early killed the script before it wrote its JSON.
[ -f "$OUT/scheduler.speedscope.json" ] && python3 benchmarks/serving/profile_summary.py "$OUT/scheduler.speedscope.json" \
  --top 40 --json "$OUT/profile_summary.json" > /tmp/profile_summary.txt 2>&1 && head -60 /tmp/profile_summary.txt
trace=$(ls -S /tmp/torch_prof_$PORT/*.json* 2>/dev/null | head -1)
[ -n "$trace" ] && python3 benchmarks/serving/profile_summary.py "$trace" --top 30 --json "$OUT/torch_summary.json" \
  > /tmp/torch_summary.txt 2>&1 && head -80 /tmp/torch_summary.txt
cd "$OUT" && gzip -f scheduler.speedscope.json 2>/dev/null
cp steps.txt /tmp/profile_steps.txt 2>/dev/null
# The archive is written outside the folder it packs (inside it, tar fails on itself).
tar czf /tmp/profile.tgz --exclude profile_summary.json --exclude torch_summary.json . \
  && mv /tmp/profile.tgz profile.tgz \
  && find . -maxdepth 1 -type f ! -name profile.tgz ! -name profile_summary.json ! -name torch_summary.json -delete
cp /tmp/profile_steps.txt steps.txt 2>/dev/null
ls -la "$OUT"
