"""Where a block of the mma tiling spends its time: per-warp timestamps on the GPU (a diagnostic aid,
not part of the package).

    python benchmarks/timeline.py [--points MODE:T:B ...] [--heads H,HV ...] [--save DIR]

Writes a copy of templates/gdn_mtp.cu.j2 with a timestamp at each of MARKS in the mma kernel (lane 0 of
every warp stores %globaltimer and %clock64 into a __device__ array), compiles the calls' kernels from it
into a private cache (the prebuilt cubins are bypassed), and per point makes one call on a cold L2
("isolated") and, separately, eight calls back to back, keeping the last one's marks. It prints, per mark,
the time from the first block's start over the blocks (warp 0; p0 p10 p50 p90 p100, us) and, per phase,
the warps' durations from %clock64 (%globaltimer advanced in steps of 0.256 us on the H200 measured, so
the marks' times are that coarse; the phases are not). --save also writes each call's raw marks (torch.save
of the array, blocks x warps x (globaltimer, clock64 per mark, then the SM id)). Only the mma and bulk
tilings carry the marks (not the twin tilings, whose second tile's marks would overwrite the first's);
other points are skipped. The marks are stores and move the kernel's timing a little: compare phases,
not totals with bench_mtp. NOTES v40 and v41 have what it showed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_mtp  # noqa: E402

from gdn_nvrtc import compiler, cubins, driver, gated_delta_rule_mtp, mtp, specs  # noqa: E402

GLOBAL_NAME = "gdn_timeline"
CAPACITY = 1 << 20  # u64 entries of the __device__ array
MARK_NAMES = ("entry", "waited", "copies issued", "barrier", "half 1 landed", "half 2 landed", "S0 . x",
              "recurrence", "final update", "end")
STRIDE = 2 * len(MARK_NAMES) + 1  # per warp: (globaltimer, clock64) per mark, then the SM id

_HELPER = """
__device__ unsigned long long {name}[{capacity}];
// Timeline mark i (benchmarks/timeline.py): lane 0 of each warp stores %globaltimer and %clock64.
__device__ __forceinline__ void timeline_mark(int i) {{
    unsigned lane, tid;
    asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
    if (lane == 0) {{
        asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
        unsigned long long ns, clock;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
        asm volatile("mov.u64 %0, %%clock64;" : "=l"(clock));
        const unsigned long long base = ((unsigned long long)blockIdx.x * (blockDim.x / 32) + tid / 32) * {stride};
        {name}[base + 2 * i] = ns;
        {name}[base + 2 * i + 1] = clock;
        if (i == 0) {{
            unsigned sm;
            asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
            {name}[base + {sm_slot}] = sm;
        }}
    }}
}}
"""

# (text in the mma kernel, mark): the mark goes right after the text, which must occur once there.
_MARK_AFTER = (
    ("    __shared__ i64 scatter_s[T];\n", 0),
    ("{{ block_start() }}\n", 1),
    ("            cp_async_commit();  // each half of the columns a group of its own\n        }\n    }\n", 2),
    ("    __syncthreads();  // nothing below waits for another warp\n", 3),
    ("    cp_async_wait_group<1>();  // the first half\n", 4),
    ("    cp_async_wait_group<0>();\n", 5),
    ("    __syncwarp();  // the warp's staging rows become its d, u and coefficient rows\n", 6),
    ("{% endif %}\n    }\n    __syncwarp();\n", 7),  # the outputs (in the twin tilings, u_s too) written
)
_MARK_BEFORE = (  # the mark goes right before the text
    ("    if (p.flags & FLAG_WRITE_FINAL) {\n{% if two_tiles %}", 8),
    ("\n}\n" + "{% else %}", 9),  # the kernel's closing brace
)
_MMA_BEGIN = "{% if mma %}\n// ---- mma tiling"
_MMA_END = "{% else %}\nconstexpr int LPR"  # the scalar kernels' section


def instrumented_template(source: str) -> str:
    """The template `source` with the timeline marks in its mma kernel; ValueError when a place for a
    mark is not found exactly once (the template changed: update _MARK_AFTER / _MARK_BEFORE)."""
    start = source.find(_MMA_BEGIN)
    end = source.find(_MMA_END, start)
    if start < 0 or end < 0:
        raise ValueError("the template has no mma kernel section")
    head, mma, tail = source[:start], source[start : end + len("{% else %}")], source[end + len("{% else %}") :]
    places = [(text, f"    timeline_mark({i});\n", True) for text, i in _MARK_AFTER]
    places += [(text, f"    timeline_mark({i});\n", False) for text, i in _MARK_BEFORE]
    for text, mark, after in places:
        if mma.count(text) != 1:
            raise ValueError(f"the place for {mark.strip()} occurs {mma.count(text)} times in the mma kernel: {text!r}")
        if after:
            mma = mma.replace(text, text + mark)
        else:  # a text that starts with a newline keeps it before the mark
            lead = "\n" if text.startswith("\n") else ""
            mma = mma.replace(text, lead + mark + text[len(lead) :])
    anchor = "typedef unsigned short u16;\n"
    if head.count(anchor) != 1:
        raise ValueError(f"{anchor!r} not found once in the template")
    helper = _HELPER.format(name=GLOBAL_NAME, capacity=CAPACITY, stride=STRIDE, sm_slot=STRIDE - 1)
    return head.replace(anchor, anchor + helper) + mma + tail


def write_instrumented_template(directory: Path) -> Path:
    source = (compiler.template_dir() / compiler.TEMPLATE_NAME).read_text()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / compiler.TEMPLATE_NAME).write_text(instrumented_template(source))
    return directory


def summarise(entries: torch.Tensor, blocks: int, warps: int) -> list[str]:
    """The table of one call's marks; entries: the __device__ array as int64 (blocks * warps * STRIDE used)."""
    data = entries[: blocks * warps * STRIDE].reshape(blocks, warps, STRIDE).to(torch.float64)
    marks = len(MARK_NAMES)
    ns, clock = data[:, :, 0 : 2 * marks : 2], data[:, :, 1 : 2 * marks : 2]
    if bool((ns == 0).any()):
        return [f"   not every warp stored every mark ({int((ns == 0).sum())} of {ns.numel()} missing)"]
    from_start = (ns - ns[:, :, 0].min()) / 1000.0  # us
    ghz = ((clock[:, :, -1] - clock[:, :, 0]) / (ns[:, :, -1] - ns[:, :, 0]).clamp(min=1)).median()
    quantiles = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)

    def row(label: str, values: torch.Tensor) -> str:
        return f"   {label:30s}" + "".join(f"{x:8.2f}" for x in torch.quantile(values.flatten(), quantiles).tolist())

    sms = data[:, 0, STRIDE - 1].to(torch.int64)
    lines = [f"   span {from_start[:, :, -1].max():.2f} us, clock {ghz:.2f} GHz, {len(torch.unique(sms))} SMs, "
             f"at most {int(torch.bincount(sms).max())} blocks on one SM over the call",
             f"   {'mark: us from the first start (warp 0)':30s}      p0     p10     p50     p90    p100"]
    lines += [row(name, from_start[:, 0, i]) for i, name in enumerate(MARK_NAMES)]
    lines.append(f"   {'phase: us by clock (every warp)':30s}")
    us = clock / (ghz * 1000.0)
    lines += [row(f"{MARK_NAMES[i - 1]} -> {MARK_NAMES[i]}", us[:, :, i] - us[:, :, i - 1]) for i in range(1, marks)]
    return lines


class Recorder:
    """Compiles every kernel from the instrumented template and reads its marks back."""

    def __init__(self) -> None:
        from cuda.bindings import driver as cu

        self._cu = cu
        work = Path(tempfile.mkdtemp(prefix="gdn_timeline_"))
        template = write_instrumented_template(work / "template")
        compiler.template_dir = lambda: template
        compiler._template.cache_clear()
        cubins.prebuilt_manifest = lambda: {"kernels": {}}
        os.environ["GDN_NVRTC_CACHE_DIR"] = str(work / "cache")
        driver._kernels.clear()
        mtp.forget_plans()
        self._arrays: dict[specs.KernelSpec, tuple[int, int]] = {}
        self._flush = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")

    def array(self, spec: specs.KernelSpec) -> tuple[int, int]:
        """(address, bytes) of the kernel's __device__ array, loading the kernel if needed."""
        if spec not in self._arrays:
            before = len(driver._libraries)
            driver.kernel(spec)
            loaded = driver._libraries[before:]
            if not loaded:
                raise RuntimeError(f"{spec.name} was loaded before the timeline's template was set up")
            result, address, size = self._cu.cuLibraryGetGlobal(loaded[-1], GLOBAL_NAME.encode())
            driver.check(result, "cuLibraryGetGlobal")
            self._arrays[spec] = (int(address), int(size))
        return self._arrays[spec]

    def clear(self, spec: specs.KernelSpec) -> None:
        address, size = self.array(spec)
        self._flush.random_(0, 255)  # a cold L2
        (result,) = self._cu.cuMemsetD8(address, 0, size)
        driver.check(result, "cuMemsetD8")
        torch.cuda.synchronize()

    def read(self, spec: specs.KernelSpec) -> torch.Tensor:
        torch.cuda.synchronize()
        address, size = self.array(spec)
        host = torch.empty(size // 8, dtype=torch.int64)
        (result,) = self._cu.cuMemcpyDtoH(host.data_ptr(), address, size)
        driver.check(result, "cuMemcpyDtoH")
        return host


def run_point(recorder: Recorder, mode: str, T: int, B: int, H: int, HV: int, generator,
              save: Path | None = None) -> list[str]:
    title = f"{mode} T={T} B={B} H={H} HV={HV}"
    spec = specs.choose_spec(128, 128, T, "bf16", "fp32", writes_states=mode != "update", batch_heads=B * HV,
                             sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
    if not spec.uses_mma or spec.two_tiles:  # a twin block's second tile would overwrite its first's marks
        return [f"== {title}: {spec.name} has no marks (not the mma or bulk tiling); skipped"]
    grid, warps = B * HV * spec.blocks_per_head, spec.threads_per_block // 32
    if grid * warps * STRIDE > CAPACITY:
        return [f"== {title}: {grid} blocks need more than the {CAPACITY} entries of the array; skipped"]
    calls = bench_mtp.build_calls(mode, B, T, H, HV, 8, generator)
    lines = []
    for label, batch in (("isolated", calls[:1]), ("last of 8 back to back", calls)):
        recorder.clear(spec)
        for kwargs in batch:
            gated_delta_rule_mtp(**kwargs)
        entries = recorder.read(spec)
        lines.append(f"== {title}, {spec.name}, {grid} blocks: {label}")
        lines += summarise(entries, grid, warps)
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            name = f"{mode}-T{T}-B{B}-H{H}-HV{HV}-{'isolated' if len(batch) == 1 else 'last'}.pt"
            torch.save({"entries": entries[: grid * warps * STRIDE].clone(), "blocks": grid, "warps": warps,
                        "marks": MARK_NAMES, "stride": STRIDE, "spec": spec.name}, save / name)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", nargs="+", default=["update:4:8", "update:8:8"], metavar="MODE:T:B")
    parser.add_argument("--heads", nargs="+", type=bench_mtp._heads, default=[(16, 32)], metavar="H,HV")
    parser.add_argument("--save", type=Path, default=None, metavar="DIR",
                        help="also write each call's raw marks (torch.save) into DIR")
    args = parser.parse_args()
    recorder = Recorder()
    generator = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}")
    for point in args.points:
        mode, T, B = point.split(":")
        for H, HV in args.heads:
            print("\n".join(run_point(recorder, mode, int(T), int(B), H, HV, generator, args.save)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
