"""benchmarks/compare_runs.py: a bench run read against earlier ones, point by point (no GPU)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import compare_runs  # noqa: E402
from bench_mtp import Row, Timing  # noqa: E402


def _run(path: Path, bandwidth: float, points: dict[tuple, dict[str, float | None]]) -> Path:
    rows = []
    for (mode, T, B, H, HV), times in points.items():
        timings = {name: Timing(us, [us], "graph") if us else Timing(note="not run") for name, us in times.items()}
        rows.append(asdict(Row(mode, T, B, H, HV, 1.0, 1, 1, timings)))
    path.write_text(json.dumps({"copy_bandwidth_gbs": bandwidth, "rows": rows}))
    return path


A, B, C = ("update", 2, 8, 16, 32), ("buffer", 4, 64, 4, 8), ("scatter", 8, 512, 16, 64)


def test_each_point_takes_the_first_earlier_run_that_timed_it(tmp_path):
    new = _run(tmp_path / "new.json", 4200.0, {A: {"ours": 10.5, "flashinfer": 20.0}, B: {"ours": 9.0},
                                               C: {"ours": 100.0, "flashinfer": None}})
    recent = _run(tmp_path / "recent.json", 4100.0, {A: {"ours": 10.0, "flashinfer": 20.0}})
    older = _run(tmp_path / "older.json", 4000.0, {A: {"ours": 5.0}, B: {"ours": 10.0, "flashinfer": 30.0}})
    times, bandwidth = compare_runs.load_times(new)
    assert bandwidth == 4200.0 and times[C] == {"ours": 100.0}  # FlashInfer not run there
    ratios = compare_runs.compare(times, [compare_runs.load_times(p)[0] for p in (recent, older)])
    assert ratios["ours"] == {A: (pytest.approx(1.05), 0), B: (pytest.approx(0.9), 1)}  # C: in no earlier run
    assert ratios["flashinfer"] == {A: (pytest.approx(1.0), 0)}  # B: new run lacks it


def test_report_lists_the_points_beyond_the_threshold_with_the_others_ratios(tmp_path, capsys):
    new = _run(tmp_path / "new.json", 4200.0, {A: {"ours": 10.5, "flashinfer": 20.2}, B: {"ours": 9.95}})
    old = _run(tmp_path / "old.json", 4100.0, {A: {"ours": 10.0, "flashinfer": 20.0}, B: {"ours": 10.0}})
    assert compare_runs.main([str(new), str(old), "--threshold", "0.02"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"new: {new} (copy 4200 GB/s)"
    assert lines[1] == f"old run 1: {old} (copy 4100 GB/s)"
    assert lines[2] == "ours: 2 points, new / old median 1.022, range 0.995-1.050"
    assert lines[3] == "  1.050  update T=2 B=8 H=16 HV=32 (old run 1); flashinfer 1.010"
    assert lines[4] == "flashinfer: 1 points, new / old median 1.010, range 1.010-1.010"
    assert len(lines) == 5  # B within 2%, FlashInfer within 2%
