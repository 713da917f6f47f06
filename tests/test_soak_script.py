"""scripts/soak.py's command line (the soak itself runs on a GPU: scripts/gpu_check.sh)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hopper_available

ROOT = Path(__file__).resolve().parent.parent


def run_soak(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), *args], capture_output=True, text=True, env=env
    )


def test_help_lists_the_options():
    result = run_soak("--help")
    assert result.returncode == 0, result.stderr
    assert "--calls" in result.stdout and "--check-every" in result.stdout and "--seed" in result.stdout


def test_refuses_a_zero_check_interval():
    result = run_soak("--check-every", "0")
    assert result.returncode == 2 and "must be at least 1, got 0" in result.stderr


@pytest.mark.skipif(hopper_available(), reason="checks the message without a Hopper GPU")
def test_without_a_hopper_gpu_says_so_and_fails():
    result = run_soak("--calls", "10")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "soak: needs a Hopper GPU" in result.stdout
