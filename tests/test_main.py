import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import hopper_available

from gdn_nvrtc.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def test_info_lists_the_prebuilt_cubins(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "gdn_nvrtc" in out and "compile cache" in out
    if "prebuilt sm_90a cubins" in out:  # built: the twin4 T = 7 kernel's own option is listed with it
        (line,) = [line for line in out.splitlines() if "_t7_bf16_fp32_twin4 " in line]
        assert line.endswith(", --ptxas-options=-O1")


@pytest.mark.skipif(hopper_available(), reason="checks the no-GPU message")
def test_demo_without_a_gpu_says_so(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "no Hopper GPU" in out and "compile cache" in out


@pytest.mark.gpu
def test_demo_on_the_gpu():
    result = subprocess.run([sys.executable, "-m", "gdn_nvrtc", "demo"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: OK" in result.stdout and "NVRTC loaded in this process: no" in result.stdout
    assert torch.cuda.is_available()
