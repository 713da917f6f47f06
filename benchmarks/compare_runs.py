"""Per-point comparison of a bench run with earlier ones (a benchmarking aid, not part of the package).

    python benchmarks/compare_runs.py NEW.json OLD.json [OLDER.json ...] [--threshold 0.01]

Runs on different machines differ by more than a kernel change often does (NOTES v37, v45, v51), so a new
run is read against earlier ones point by point: for every point of NEW, the first of the OLD files that
timed it (list the most recent first) gives the reference. Printed per implementation: how many points
compare, the median and range of new / old time, and every point beyond --threshold, with the other
implementations' ratios at that point (a point where only ours moved is ours or the machine's; a point
where every implementation moved alike is the machine's). Times, not ratios to the floor: each file's
floor has its own copy bandwidth, also printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_mtp  # noqa: E402


def load_times(path: Path) -> tuple[dict[tuple, dict[str, float]], float]:
    """The us per call of every implementation timed at each point of a bench JSON, and its copy bandwidth."""
    report = json.loads(path.read_text())
    times: dict[tuple, dict[str, float]] = {}
    for data in report["rows"]:
        row = bench_mtp.row_from_dict(data)
        timed = {name: timing.us for name, timing in row.timings.items() if timing.us}
        if timed:
            times[bench_mtp.row_key(row)] = timed
    return times, report["copy_bandwidth_gbs"]


def compare(new: dict[tuple, dict[str, float]], olds: list[dict[tuple, dict[str, float]]]) -> dict[str, dict]:
    """Per implementation: {point: (new / old time, index of the old run that gave the reference)}."""
    ratios: dict[str, dict] = {}
    for key, timed in new.items():
        for index, old in enumerate(olds):
            if key in old:
                for name, us in timed.items():
                    if old[key].get(name):
                        ratios.setdefault(name, {})[key] = (us / old[key][name], index)
                break
    return ratios


def _point(key: tuple) -> str:
    mode, T, B, H, HV = key
    return f"{mode} T={T} B={B} H={H} HV={HV}"


def report_lines(ratios: dict[str, dict], threshold: float) -> list[str]:
    lines = []
    for name, points in ratios.items():
        values = [ratio for ratio, _ in points.values()]
        lines.append(f"{name}: {len(values)} points, new / old median {statistics.median(values):.3f}, "
                     f"range {min(values):.3f}-{max(values):.3f}")
        beyond = sorted((ratio, key, index) for key, (ratio, index) in points.items() if abs(ratio - 1) > threshold)
        for ratio, key, index in beyond:
            others = ", ".join(f"{other} {ratios[other][key][0]:.3f}" for other in ratios
                               if other != name and key in ratios[other])
            lines.append(f"  {ratio:.3f}  {_point(key)} (old run {index + 1})" + (f"; {others}" if others else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("new", type=Path)
    parser.add_argument("old", type=Path, nargs="+", help="earlier runs, the most recent first")
    parser.add_argument("--threshold", type=float, default=0.01, help="list points whose ratio is further from 1")
    args = parser.parse_args(argv)
    new, bandwidth = load_times(args.new)
    olds = []
    print(f"new: {args.new} (copy {bandwidth:.0f} GB/s)")
    for index, path in enumerate(args.old, 1):
        times, old_bandwidth = load_times(path)
        olds.append(times)
        print(f"old run {index}: {path} (copy {old_bandwidth:.0f} GB/s)")
    print("\n".join(report_lines(compare(new, olds), args.threshold)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
