#!/usr/bin/env bash
# On a Hopper GPU machine, from the repository root (cubins built): run every prebuilt spec in every
# mode (scripts/sanitize_cases.py) under each compute-sanitizer tool and print one line per tool.
# Arguments go to sanitize_cases.py (e.g. --tilings narrow store --tokens 1 4 8); SANITIZE_TOOLS
# picks the tools (default: all four).
set -uo pipefail
LOGS=${OUT:-/tmp}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
  timeout "${SANITIZE_TIMEOUT:-1800}" compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 9 \
    python3 scripts/sanitize_cases.py "$@" >"$LOGS/sanitize_$tool.log" 2>&1
  echo "$tool (rc=$?): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOGS/sanitize_$tool.log" | tail -n 1)" \
       "$(grep -E 'cases' "$LOGS/sanitize_$tool.log" | tail -n 1)"
done
