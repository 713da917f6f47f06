#!/usr/bin/env bash
# On a Hopper GPU machine, from the repository root (cubins built): run every prebuilt spec in every
# mode (scripts/sanitize_cases.py) under each compute-sanitizer tool.
# Arguments go to sanitize_cases.py (e.g. --tilings narrow store --tokens 1 4 8); SANITIZE_TOOLS
# picks the tools (default: all four). Each tiling runs in a process of its own, all of one tool at
# once, spread over the visible GPUs (racecheck over every tiling at T = 2, 4, 8 took 207 s this way
# on two H200s; one process for all of them ran past 200 s with a fraction done). SANITIZE_TIMEOUT
# (seconds, default 1800) limits each process; a process cut short says how many cases it got through.
# One line per tool and tiling, then one per tool; the exit status is 0 only if every process was clean.
set -uo pipefail
LOGS=${OUT:-/tmp}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

# Split the arguments into the tilings asked for (all by default) and the rest.
tilings=() rest=() in_tilings=0
for arg in "$@"; do
  if [ "$arg" = "--tilings" ]; then in_tilings=1; continue; fi
  case "$arg" in -*) in_tilings=0 ;; esac
  if [ $in_tilings = 1 ]; then tilings+=("$arg"); else rest+=("$arg"); fi
done
if [ ${#tilings[@]} = 0 ]; then
  read -r -a tilings <<<"$(python3 -c 'from gdn_nvrtc.specs import TILING_NAMES; print(*TILING_NAMES)')"
fi
if [ ${#tilings[@]} = 0 ]; then  # nothing would run, and nothing run would read as clean
  echo "sanitize.sh: no tilings to run (the tiling names come from gdn_nvrtc.specs, which did not import)" >&2
  exit 2
fi
# The GPUs to spread over: CUDA_VISIBLE_DEVICES as given, else every GPU nvidia-smi lists.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
else
  read -r -a gpus <<<"$(nvidia-smi --query-gpu=index --format=csv,noheader | tr '\n' ' ')"
fi
[ ${#gpus[@]} -gt 0 ] || gpus=(0)

status=0
for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
  pids=() i=0
  for tiling in "${tilings[@]}"; do
    CUDA_VISIBLE_DEVICES=${gpus[$((i % ${#gpus[@]}))]} timeout "${SANITIZE_TIMEOUT:-1800}" \
      compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 9 \
      python3 scripts/sanitize_cases.py --tilings "$tiling" "${rest[@]}" >"$LOGS/sanitize_${tool}_$tiling.log" 2>&1 &
    pids+=($!) i=$((i + 1))
  done
  clean=0 cases=0
  for i in "${!tilings[@]}"; do
    wait "${pids[$i]}"; rc=$?
    log=$LOGS/sanitize_${tool}_${tilings[$i]}.log
    matched=$(grep -c ': matched$' "$log")
    cases=$((cases + matched))
    [ $rc = 0 ] && clean=$((clean + 1)) || status=1
    echo "$tool ${tilings[$i]} (rc=$rc$([ $rc = 124 ] && echo ', cut short')): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -n 1); $matched cases matched"
  done
  echo "$tool: $clean of ${#tilings[@]} tilings clean, $cases cases matched the reference"
done
exit $status
