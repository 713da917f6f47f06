#!/usr/bin/env bash
# On a Hopper GPU machine, from the repository root, with cubins built (python build_cubins.py)
# and a wheel in dist/ (python -m build --wheel --no-isolation):
#   1. the whole test suite (tests/test_reliability.py included), 2. the soak (scripts/soak.py:
#   100,000 random calls, one in 500 checked, GPU memory tracked), 3. compute-sanitizer memcheck over
#   a representative subset, 4. the wheel in a fresh venv running the demo with NVRTC made unimportable.
# Logs go to ${OUT:-/tmp}/gpu_check_*.log; the last lines summarise.
set -uo pipefail
LOGS=${OUT:-/tmp}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

python3 -m pytest -q -p no:cacheprovider tests >"$LOGS/gpu_check_pytest.log" 2>&1
echo "pytest (rc=$?): $(tail -n 1 "$LOGS/gpu_check_pytest.log")"

python3 scripts/soak.py >"$LOGS/gpu_check_soak.log" 2>&1
echo "soak (rc=$?): $(tail -n 1 "$LOGS/gpu_check_soak.log")"

SUBSET="test_write_slots or test_out_of_range or test_strided_pool or test_packed or test_unaligned or test_every_prebuilt or test_fuzz"
compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider tests/test_mtp.py -k "$SUBSET" \
  >"$LOGS/gpu_check_memcheck.log" 2>&1
echo "memcheck (rc=$?): $(grep -E 'ERROR SUMMARY' "$LOGS/gpu_check_memcheck.log" | tail -n 1) $(grep -E 'passed|failed' "$LOGS/gpu_check_memcheck.log" | tail -n 1)"

# A fresh venv that sees this interpreter's torch and cuda-bindings through a .pth file (no network).
rm -rf /tmp/wheel_venv && python3 -m venv --without-pip /tmp/wheel_venv
python3 -c "import site; print('\n'.join(site.getsitepackages()))" >"$(echo /tmp/wheel_venv/lib/python3*/site-packages)/outer.pth"
env -u PYTHONPATH python3 -m pip --python /tmp/wheel_venv/bin/python install -q --no-deps --no-index dist/*.whl
(cd /tmp && env -u PYTHONPATH GDN_NVRTC_CACHE_DIR=/tmp/empty_cache /tmp/wheel_venv/bin/python -c "
import sys
sys.modules['cuda.bindings.nvrtc'] = None  # any attempt to compile would fail loudly
import gdn_nvrtc
from gdn_nvrtc.__main__ import main
print('gdn_nvrtc from', gdn_nvrtc.__file__)
sys.exit(main(['demo']))
") >"$LOGS/gpu_check_wheel.log" 2>&1
echo "wheel demo in a fresh venv (rc=$?):"; cat "$LOGS/gpu_check_wheel.log"
