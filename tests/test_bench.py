"""The benchmark's pure-Python parts: the floor, the replay sizing, the table and the command line (no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_mtp  # noqa: E402
import gpu_state  # noqa: E402
from bench_mtp import Row, Timing  # noqa: E402

# Floors (us) published in PERF.md for H = 16, HV = 32 at the copy bandwidth measured on that card
# (both rounded: the floor to 0.1 us, the bandwidth to 1 GB/s).
PUBLISHED_FLOORS = [
    # bandwidth GB/s, mode, T, B, floor_us
    (3026, "update", 2, 1, 1.4),
    (3026, "update", 2, 8, 11.2),
    (3026, "update", 4, 32, 45.4),
    (3026, "update", 8, 256, 371.6),
    (3026, "buffer", 2, 8, 16.8),
    (3026, "buffer", 4, 32, 111.9),
    (3026, "buffer", 8, 256, 1613.6),
    (4281, "update", 2, 8, 7.9),
    (4281, "update", 2, 256, 253.8),
    (4281, "buffer", 8, 32, 142.6),
]


@pytest.mark.parametrize(("bandwidth", "mode", "T", "B", "floor_us"), PUBLISHED_FLOORS)
def test_floor_matches_published_numbers(bandwidth, mode, T, B, floor_us):
    assert bench_mtp.moved_bytes(mode, B, T, 16, 32) / (bandwidth * 1e9) * 1e6 == pytest.approx(
        floor_us, rel=2e-4, abs=0.051
    )


def test_moved_bytes_by_mode():
    B, T, H, HV = 8, 4, 16, 32
    state = B * HV * 128 * 128 * 4
    io = (2 * B * T * H * 128 + 2 * B * T * HV * 128 + 2 * B * T * HV) * 2
    assert bench_mtp.moved_bytes("update", B, T, H, HV) == 2 * state + io
    assert bench_mtp.moved_bytes("buffer", B, T, H, HV) == (1 + T) * state + io
    assert bench_mtp.moved_bytes("scatter", B, T, H, HV) == (1 + T) * state + io


def test_footprint_counts_each_state_once():
    B, T, H, HV = 8, 4, 16, 32
    state = B * HV * 128 * 128 * 4
    assert bench_mtp.moved_bytes("update", B, T, H, HV) - bench_mtp.footprint_bytes("update", B, T, H, HV) == state
    for mode in ("buffer", "scatter"):
        assert bench_mtp.footprint_bytes(mode, B, T, H, HV) == bench_mtp.moved_bytes(mode, B, T, H, HV)


def test_calls_per_replay():
    assert bench_mtp.calls_per_replay(10**6, 1e9, 1e12) == 1000
    assert bench_mtp.calls_per_replay(10**6, 1e9, 5e8) == 500  # capped by memory
    assert bench_mtp.calls_per_replay(3 * 10**9, 1e9, 1e12) == 1  # one call beyond the target
    assert bench_mtp.calls_per_replay(3 * 10**9, 1e9, 1e9) == 0  # does not fit at all


def test_card_slug():
    assert bench_mtp.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench_mtp.card_slug("NVIDIA H200") == "nvidia-h200"


def _row(ours: Timing, fi: Timing, fla: Timing) -> Row:
    return Row("update", 2, 8, 16, 32, floor_us=10.0, floor_bytes=1, calls_per_replay=4,
               timings={"ours": ours, "flashinfer": fi, "fla": fla})


def test_table_values_and_alignment():
    rows = [
        _row(Timing(11.0, [10.9, 11.0, 11.22], "graph"), Timing(15.0, [15.0], "graph"), Timing(40.0, [40.0], "graph")),
        _row(Timing(12.0, [12.0, 12.0], "graph"), Timing(note="failed: AssertionError: no"),
             Timing(note="not available: ModuleNotFoundError: No module named 'fla'")),
        _row(Timing(12.0, [12.0], "graph"), Timing(30.0, [30.0], "eager", "graph capture failed"), Timing()),
    ]
    lines = bench_mtp.format_table(rows).splitlines()
    assert lines[0].split() == list(bench_mtp.TABLE_COLUMNS)
    assert len({len(line) for line in lines}) == 1  # every line as wide as the header
    first, missing, eager = (line.split() for line in lines[1:])
    assert first == ["update", "2", "8", "16", "32", "10.0", "11.0", "1.10", "2.9%",
                     "15.0", "1.50", "40.0", "4.00", "0.73"]
    assert missing[9:] == ["n/a", "n/a", "n/a", "n/a", "n/a"]
    assert eager[8] == "n/a"  # one sample has no spread
    assert eager[9:11] == ["30.0*", "3.00"]


def test_table_notes_once_per_reason():
    fla_missing = Timing(note="not available: ModuleNotFoundError")
    rows = [_row(Timing(1.0, [1.0], "graph"), Timing(2.0, [2.0], "eager", "capture failed"), fla_missing)] * 3
    assert bench_mtp.table_notes(rows) == [
        "flashinfer (eager): capture failed",
        "fla (n/a): not available: ModuleNotFoundError",
    ]


def test_arguments():
    args = bench_mtp.parse_args([])
    assert (args.modes, args.T, args.B) == (list(bench_mtp.MODES), [2, 4, 8], [1, 8, 32, 64, 128, 256, 512])
    assert args.heads == [(16, 32), (16, 64), (4, 8)]
    quick = bench_mtp.parse_args(["--quick", "--T", "4"])
    assert (quick.T, quick.B, quick.heads) == ([4], [8, 256], [(16, 32)])  # an axis flag overrides the preset
    custom = bench_mtp.parse_args(["--modes", "update", "--B", "8", "32", "--heads", "16,32", "4,8"])
    assert (custom.modes, custom.B, custom.heads) == (["update"], [8, 32], [(16, 32), (4, 8)])
    assert not args.resume and bench_mtp.parse_args(["--resume"]).resume


@pytest.mark.parametrize("heads", ["16", "16,24", "a,b", "0,8"])
def test_bad_heads_are_rejected(heads):
    with pytest.raises(SystemExit):
        bench_mtp.parse_args(["--heads", heads])


def test_first_call_byte_compiles_the_package_before_the_fresh_process(tmp_path, monkeypatch):
    """A wheel install leaves byte-code beside the modules; from a source tree (where the GPU machine
    writes none) the bench compiles it first, so the fresh process does not compile the package."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "module.py").write_text("VALUE = 1\n")
    seen = {}

    def fake_run(command, **kwargs):
        seen["pyc"] = sorted(path.name.split(".")[0] for path in (package / "__pycache__").glob("*.pyc"))
        stdout = '{"import_ms": 1.5, "first_call_ms": 20.0, "nvrtc_loaded": false}\n'
        return bench_mtp.subprocess.CompletedProcess(command, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(bench_mtp.subprocess, "run", fake_run)
    result = bench_mtp.first_call_latency(package)
    assert seen["pyc"] == ["module"]
    assert result["total_ms"] == 21.5 and result["bytecode"] == "compiled before"
    assert bench_mtp._first_call_line(result).endswith("NVRTC loaded: no, bytecode compiled before")


def test_flashinfer_is_not_run_past_its_32_bit_offsets():
    assert bench_mtp.flashinfer_refuses("buffer", 512, 8, 16, 64)  # 2^32 buffer elements
    assert not bench_mtp.flashinfer_refuses("buffer", 256, 8, 16, 64)  # 2^31: its last offset fits
    assert not bench_mtp.flashinfer_refuses("buffer", 1024, 4, 16, 32)  # 2^31
    assert bench_mtp.flashinfer_refuses("buffer", 1025, 4, 16, 32)
    # scatter: B * (T + 1) pool slots per call
    assert bench_mtp.flashinfer_refuses("scatter", 512, 4, 16, 64)  # 2560 slots of 2^20: faulted (H200)
    assert not bench_mtp.flashinfer_refuses("scatter", 512, 4, 16, 32)  # 1.25 * 2^30: timed
    assert not bench_mtp.flashinfer_refuses("scatter", 256, 4, 16, 64)
    assert not bench_mtp.flashinfer_refuses("scatter", 1023, 1, 16, 64)  # 2046 slots: under 2^31
    assert bench_mtp.flashinfer_refuses("scatter", 1025, 1, 16, 64)
    assert bench_mtp.flashinfer_refuses("scatter", 256, 8, 16, 64)
    assert bench_mtp.flashinfer_refuses("scatter", 512, 8, 16, 32)
    assert not bench_mtp.flashinfer_refuses("scatter", 256, 8, 16, 32)
    assert not bench_mtp.flashinfer_refuses("scatter", 512, 8, 4, 8)
    # update: B slots; the grid's largest pool is 2^29 elements
    assert not bench_mtp.flashinfer_refuses("update", 512, 8, 16, 64)
    assert bench_mtp.flashinfer_refuses("update", 2049, 8, 16, 64)
    assert bench_mtp.pool_slots_per_call("scatter", 3, 4) == 15 and bench_mtp.pool_slots_per_call("buffer", 3, 4) == 3


def test_report_rows_round_trip_and_the_file_is_replaced_whole(tmp_path):
    rows = [
        Row("update", 2, 8, 16, 32, 11.2, 34_000_000, 3, {"ours": Timing(12.0, [12.0, 12.1], "graph")}),
        Row("buffer", 8, 1, 4, 8, 1.6, 5_000_000, 9,
            {"ours": Timing(5.0, [5.0], "graph"), "flashinfer": Timing(note="not run")}),
    ]
    path = tmp_path / "run.json"
    bench_mtp.write_report(path, {"rows": [bench_mtp.asdict(row) for row in rows]})
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
    back = [bench_mtp.row_from_dict(data) for data in bench_mtp.json.loads(path.read_text())["rows"]]
    assert back == rows
    assert [bench_mtp.row_key(row) for row in back] == [("update", 2, 8, 16, 32), ("buffer", 8, 1, 4, 8)]


def test_resume_needs_the_same_card_method_and_peers():
    earlier = {"card": "NVIDIA H100 80GB HBM3", "method": {"repeats": 3}, "peers": {"flashinfer": "0.7.2"}}
    same = {"card": "NVIDIA H100 80GB HBM3", "method": {"repeats": 3}, "peers": {"flashinfer": "0.7.2"}}
    assert bench_mtp.resume_mismatch(earlier, **same) == ""
    for what, other in (("card", "NVIDIA H200"), ("method", {"repeats": 2}), ("peers", {"flashinfer": "0.8"})):
        assert what in bench_mtp.resume_mismatch(earlier, **{**same, what: other})


def test_replay_samples_skip_a_warm_up_batch(monkeypatch):
    """A first batch of replays (WARMUP_MS long, or a sample's length if that is longer) is run but not kept:
    the samples are the later ones, per call."""
    batches = []
    times = iter([0.5, 200.0, 21.0, 20.0, 20.0])  # calibration (one replay), warm-up, then three samples

    def elapsed(run, n):
        batches.append(n)
        return next(times)

    monkeypatch.setattr(bench_mtp, "_elapsed_ms", elapsed)
    monkeypatch.setattr(bench_mtp.torch.cuda, "synchronize", lambda: None)
    ran = []
    samples, gpu = bench_mtp.replay_samples(lambda: ran.append(1), calls=4, repeats=3, min_ms=20.0)
    assert len(ran) == 2 and batches == [1, 400, 40, 40, 40]
    assert samples == pytest.approx([21.0 * 1e3 / 160, 20.0 * 1e3 / 160, 20.0 * 1e3 / 160])
    assert gpu is None  # no monitor
    times = iter([50.0, 60.0, 120.0, 110.0])  # a replay longer than min_ms: two per sample, warm-up as long
    batches.clear()
    samples, _ = bench_mtp.replay_samples(lambda: None, calls=1, repeats=2, min_ms=20.0)
    assert samples == pytest.approx([6e4, 5.5e4])
    assert batches == [1, 4, 2, 2]


def test_replay_samples_read_the_monitor_around_warm_up_and_samples(monkeypatch):
    """The GPU state covers the warm-up batch and the samples, not the calibration replay."""
    events = []
    times = iter([0.5, 200.0, 20.0, 20.0])

    def elapsed(run, n):
        events.append(("batch", n))
        return next(times)

    class Monitor:
        def __init__(self):
            self.count = 0

        def read(self):
            self.count += 1
            events.append(("read", self.count))
            # 0.3 s apart, 150 J, held by the power limit for 30 ms
            return gpu_state.Reading(self.count * 300_000_000, 150_000 * self.count,
                                     {"held_power": 30_000_000 * self.count, "held_thermal": 0,
                                      "held_any": 30_000_000 * self.count}, 60)

    monkeypatch.setattr(bench_mtp, "_elapsed_ms", elapsed)
    monkeypatch.setattr(bench_mtp.torch.cuda, "synchronize", lambda: None)
    samples, gpu = bench_mtp.replay_samples(lambda: None, calls=2, repeats=2, min_ms=20.0, monitor=Monitor())
    assert events == [("batch", 1), ("read", 1), ("batch", 400), ("batch", 40), ("batch", 40), ("read", 2)]
    assert samples == pytest.approx([250.0, 250.0])
    assert gpu == pytest.approx({"interval_ms": 300.0, "power_w": 500.0, "held_power": 0.1, "held_thermal": 0.0,
                                 "held_any": 0.1, "temperature_c": 60.0})


def test_table_notes_name_the_timings_a_limiter_held_down():
    held = {"interval_ms": 260.0, "power_w": 690.0, "held_power": 0.2, "held_any": 0.2}
    calm = {"interval_ms": 260.0, "power_w": 400.0, "held_power": 0.0, "held_any": 0.01}
    rows = [
        Row("update", 8, 512, 16, 64, 1000.0, 1, 1, {"ours": Timing(1100.0, [1100.0], "graph", gpu=held),
                                                     "flashinfer": Timing(2600.0, [2600.0], "graph", gpu=calm)}),
        Row("update", 8, 8, 16, 64, 10.0, 1, 1, {"ours": Timing(12.0, [12.0], "graph")}),
    ]
    rows.append(Row("update", 8, 256, 16, 64, 500.0, 1, 1, {"ours": Timing(550.0, [550.0], "graph", gpu={
        "interval_ms": 260.0, "power_w": 650.0, "held_power": 0.06, "held_any": 0.07})}))
    notes = bench_mtp.table_notes(rows)
    assert notes == ["ours: clocks held down for 5% or more of the interval at 2 of 2 timings (JSON: gpu); the most "
                     "at update T=8 B=512 H=16 HV=64: clocks held down 20% of the time (power 20%) at 690 W"]


def test_copy_bandwidth_is_the_highest_median_of_fresh_buffers(monkeypatch):
    """Each buffer gets its median of `repeats` copies (bytes read plus written) from its first part to a
    part COPY_GAP bytes after it, the cache is emptied between buffers, and the floor's bandwidth is the
    highest median (a slow buffer cannot lower it)."""
    real_randn = bench_mtp.torch.randn
    made, emptied, copies = [], [], []
    monkeypatch.setattr(bench_mtp.torch.cuda, "mem_get_info", lambda: (40 << 30, 80 << 30))
    monkeypatch.setattr(bench_mtp.torch.cuda, "empty_cache", lambda: emptied.append(len(made)))

    def randn(n, device):
        made.append(n)
        buffer = real_randn(n)
        copies.append(buffer)
        return buffer

    monkeypatch.setattr(bench_mtp.torch, "randn", randn)
    # per buffer: three timed copies (ms); the two untimed warm-up copies are not read
    times = iter([1.0, 1.2, 1.1, 1.3, 1.2, 1.2, 1.0, 1.0, 2.0])

    def elapsed(run, n):
        run()
        return next(times)

    monkeypatch.setattr(bench_mtp, "_elapsed_ms", elapsed)
    nbytes = 1 << 20  # below a quarter of the free memory
    medians = bench_mtp.copy_medians(max_bytes=nbytes, repeats=3, allocations=3)
    assert made == [(2 * nbytes + bench_mtp.COPY_GAP) // 4] * 3 and emptied == [1, 2, 3]
    assert medians == pytest.approx([2 * nbytes / 1.1e-3, 2 * nbytes / 1.2e-3, 2 * nbytes / 1.0e-3])
    n, gap = nbytes // 4, bench_mtp.COPY_GAP // 4
    for buffer in copies:  # the source copied to the target, the gap between them left alone
        assert bench_mtp.torch.equal(buffer[n + gap :], buffer[:n])
        assert not bench_mtp.torch.equal(buffer[n : 2 * n], buffer[:n])
    times = iter([1.0, 1.2, 1.1, 1.3, 1.2, 1.2, 1.0, 1.0, 2.0])
    assert bench_mtp.copy_bandwidth(max_bytes=nbytes, repeats=3, allocations=3) == pytest.approx(2 * nbytes / 1.0e-3)
    monkeypatch.setattr(bench_mtp.torch.cuda, "mem_get_info", lambda: (2 << 20, 80 << 30))  # little free memory
    times = iter([1.0] * 3)
    made.clear()
    bench_mtp.copy_medians(max_bytes=nbytes, repeats=3, allocations=1)
    assert made == [(2 * ((2 << 20) // 4 // 16 * 16) + bench_mtp.COPY_GAP) // 4]


@pytest.mark.gpu
def test_copy_medians_on_the_gpu():
    medians = bench_mtp.copy_medians(max_bytes=256 << 20, repeats=3, allocations=3)
    assert len(medians) == 3
    assert all(1e11 < median < 2e13 for median in medians)  # 0.1-20 TB/s: a plausible HBM copy


def test_call_slots_orders():
    import torch

    generator = torch.Generator().manual_seed(5)
    assert bench_mtp.call_slots(6, 1 << 20, "sequential", generator).tolist() == list(range(6))
    for order in ("random", "pages"):
        slots = bench_mtp.call_slots(37, 512 << 10, order, generator)
        assert slots.dtype == torch.int32 and sorted(slots.tolist()) == list(range(37))  # each slot once
    # 512 KB slots: runs of 4 consecutive slots (one 2 MB page each), the short last run included
    pages = bench_mtp.call_slots(37, 512 << 10, "pages", generator).tolist()
    starts = [i for i, slot in enumerate(pages) if slot % 4 == 0]
    runs = [list(range(pages[i], min(pages[i] + 4, 37))) for i in starts]
    assert len(starts) == 10 and all(pages[i : i + len(run)] == run for i, run in zip(starts, runs, strict=True))
    assert pages != list(range(37))
    assert sorted(bench_mtp.call_slots(5, 4 << 20, "pages", generator).tolist()) == list(range(5))  # runs of one
    # sorted: the random permutation's slots (same draws), each call's 4 in ascending order, the short rest too
    mixed = bench_mtp.call_slots(14, 1 << 20, "random", torch.Generator().manual_seed(9)).tolist()
    ordered = bench_mtp.call_slots(14, 1 << 20, "sorted", torch.Generator().manual_seed(9), per_call=4).tolist()
    assert ordered == sum((sorted(mixed[i : i + 4]) for i in range(0, 14, 4)), [])
    assert ordered != sorted(ordered)
    with pytest.raises(ValueError, match="slot order"):
        bench_mtp.call_slots(4, 1 << 20, "shuffled", generator)
    with pytest.raises(ValueError, match="per_call"):
        bench_mtp.call_slots(4, 1 << 20, "sorted", generator, per_call=0)


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["random", "sequential", "pages", "sorted"])
def test_calls_own_disjoint_slots_in_each_order(order):
    import torch

    B, T, R = 3, 2, 4
    generator = torch.Generator(device="cuda").manual_seed(5)
    calls = bench_mtp.build_calls("scatter", B, T, 2, 4, R, generator, slot_order=order)
    per_call = bench_mtp.pool_slots_per_call("scatter", B, T)
    assert calls[0]["initial_state"].shape[0] == R * per_call
    owned = [torch.cat([kw["initial_state_indices"], kw["ssm_state_indices"].flatten()]).tolist() for kw in calls]
    assert sorted(sum(owned, [])) == list(range(R * per_call))  # every slot once, over all calls
    in_order = [list(range(r * per_call, (r + 1) * per_call)) for r in range(R)]
    assert (owned == in_order) == (order == "sequential")
    assert all(own == sorted(own) for own in owned) == (order in ("sequential", "sorted"))
