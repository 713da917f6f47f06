"""scripts/sanitize.sh's process layout and report, with stand-ins for compute-sanitizer and nvidia-smi
(the sanitizer itself runs on a GPU machine: the script's cases are scripts/sanitize_cases.py)."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gdn_nvrtc.specs import TILING_NAMES

ROOT = Path(__file__).resolve().parent.parent

# Records what it was asked (the visible GPUs and its arguments), reports two matched cases, and fails the
# way compute-sanitizer does (exit 9 with errors in the summary) for the tiling named in FAIL_TILING.
FAKE_SANITIZER = """#!/usr/bin/env bash
echo "$CUDA_VISIBLE_DEVICES $*" >> "$CALLS"
tiling=""
prev=""
for arg in "$@"; do [ "$prev" = "--tilings" ] && tiling=$arg; prev=$arg; done
echo "x $tiling update: matched"
echo "x $tiling buffer: matched"
if [ "$tiling" = "${FAIL_TILING:-}" ]; then echo "========= ERROR SUMMARY: 1 error"; exit 9; fi
echo "========= ERROR SUMMARY: 0 errors"
"""
FAKE_SMI = """#!/usr/bin/env bash
printf '0\\n1\\n'
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_script(
    tmp_path: Path, *args: str, python_works: bool = True, **env_extra: str,
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _executable(bin_dir / "compute-sanitizer", FAKE_SANITIZER)
    _executable(bin_dir / "nvidia-smi", FAKE_SMI)
    (bin_dir / "python3").unlink(missing_ok=True)
    if python_works:
        (bin_dir / "python3").symlink_to(sys.executable)  # the script asks python3 for the tiling names
    else:
        _executable(bin_dir / "python3", "#!/usr/bin/env bash\nexit 1\n")
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", CALLS=str(calls), OUT=str(logs), **env_extra)
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "sanitize.sh"), *args], cwd=ROOT, capture_output=True, text=True, env=env,
        timeout=120,
    )
    recorded = [line.split() for line in calls.read_text().splitlines()] if calls.exists() else []
    return result, recorded


def test_one_process_per_tiling_over_the_gpus(tmp_path):
    result, calls = run_script(
        tmp_path, "--tokens", "2", "4", "--tilings", "narrow", "store", "mma", "--dtypes", "bf16",
        SANITIZE_TOOLS="racecheck",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(calls) == 3
    by_tiling = {call[call.index("--tilings") + 1]: call for call in calls}
    assert sorted(by_tiling) == ["mma", "narrow", "store"]
    for tiling, call in by_tiling.items():
        assert call[1:5] == ["--tool", "racecheck", "--report-api-errors", "no"]
        cases_args = call[call.index("scripts/sanitize_cases.py") + 1:]
        assert cases_args == ["--tilings", tiling, "--tokens", "2", "4", "--dtypes", "bf16"]
    assert [by_tiling[name][0] for name in ("narrow", "store", "mma")] == ["0", "1", "0"]  # alternating GPUs
    assert "racecheck: 3 of 3 tilings clean, 6 cases matched the reference" in result.stdout
    assert (tmp_path / "logs" / "sanitize_racecheck_store.log").exists()


def test_every_tiling_and_tool_by_default(tmp_path):
    result, calls = run_script(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    tools = ("memcheck", "racecheck", "initcheck", "synccheck")
    assert len(calls) == len(tools) * len(TILING_NAMES)
    for tool in tools:
        asked = sorted(call[call.index("--tilings") + 1] for call in calls if call[2] == tool)
        assert asked == sorted(TILING_NAMES)
        assert f"{tool}: {len(TILING_NAMES)} of {len(TILING_NAMES)} tilings clean" in result.stdout


def test_a_failing_tiling_fails_the_script(tmp_path):
    result, _ = run_script(tmp_path, "--tilings", "narrow", "store", SANITIZE_TOOLS="memcheck", FAIL_TILING="store")
    assert result.returncode == 1
    assert "memcheck store (rc=9): ========= ERROR SUMMARY: 1 error; 2 cases matched" in result.stdout
    assert "memcheck narrow (rc=0)" in result.stdout
    assert "memcheck: 1 of 2 tilings clean" in result.stdout


def test_keeps_to_the_visible_gpus(tmp_path):
    result, calls = run_script(
        tmp_path, "--tilings", "narrow", "store", "mma", SANITIZE_TOOLS="initcheck", CUDA_VISIBLE_DEVICES="4,6"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    by_tiling = {call[call.index("--tilings") + 1]: call[0] for call in calls}
    assert by_tiling == {"narrow": "4", "store": "6", "mma": "4"}


def test_no_tilings_is_an_error_not_a_clean_run(tmp_path):
    result, calls = run_script(tmp_path, "--tokens", "2", python_works=False, SANITIZE_TOOLS="memcheck")
    assert result.returncode == 2 and calls == []
    assert "no tilings to run" in result.stderr
