#!/usr/bin/env bash
# Nsight Compute over the decode kernel: diag_formats.py's settings NCU_SETTINGS (default:
# the server's tuning, 0, against the one before it, 38, whose packed sparse-key tile loop
# is pipelined 3 stages deep; the twenty-second run profiled 0 35, the twentieth
# 0 24 25 26) on the presets'
# 3x and 6x mixes and dense 32-token blocks: throughput, warp stalls, scheduler issue,
# occupancy, memory (the tenth run compared settings 0 1 4 7, the eleventh 0 10 11 12 when
# 0 packed dense pairs alone, the twelfth 0 13 and 0 14).
# Each setting's launches run once after a warm-up (diag_formats.py --profile-once), in the
# order it prints. Writes DIR/ncu_decode.csv and DIR/ncu_decode.txt.
#   CUDA_VISIBLE_DEVICES=0 bash benchmarks/kernels/ncu_decode.sh DIR
set -uo pipefail
D=${1:?usage: ncu_decode.sh DIR}; mkdir -p "$D"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -z "$NCU" ]; then echo "no ncu on this machine (PATH, /usr/local/cuda*/bin)" | tee "$D/ncu_decode.txt"; exit 3; fi
# Launch 1 of each run is warm-up (compile, plan); ncu replays every _mixed_attn_kernel launch.
# The report is kept, then printed twice: the sections' summaries (details page, what the
# runs through the nineteenth read) and every metric they collected (raw page: each warp
# stall reason's cycles an instruction, the instruction mix), which the summaries leave out.
"$NCU" --export "$D/ncu_decode" --force-overwrite --kernel-name regex:_mixed_attn_kernel \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section MemoryWorkloadAnalysis --section LaunchStats --section InstructionStats \
  python3 benchmarks/kernels/diag_formats.py --segment 32 --formats dense mosaic_dense_values_3x mosaic_dense_values_6x \
    --settings ${NCU_SETTINGS:-0 38} --profile-once --out "$D" > "$D/ncu_decode.txt" 2>&1
rc=$?
"$NCU" --import "$D/ncu_decode.ncu-rep" --csv --page details > "$D/ncu_decode.csv"
"$NCU" --import "$D/ncu_decode.ncu-rep" --csv --page raw > "$D/ncu_decode_raw.csv"
rm -f "$D/ncu_decode.ncu-rep"  # a call brings back few files: the two pages hold what it read
grep "profiled run" "$D/ncu_decode.txt"; tail -3 "$D/ncu_decode.txt"
exit $rc
