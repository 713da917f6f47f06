"""benchmarks/timeline.py without a GPU: the instrumented template compiles, its marks sit where the
tool says, a template without a mark's place is refused, and the summary's arithmetic."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import timeline  # noqa: E402

from gdn_nvrtc import compiler  # noqa: E402
from gdn_nvrtc.specs import KernelSpec  # noqa: E402

SHIPPED = (compiler.template_dir() / compiler.TEMPLATE_NAME).read_text()


@pytest.fixture
def instrumented(tmp_path, monkeypatch):
    directory = timeline.write_instrumented_template(tmp_path)
    monkeypatch.setattr(compiler, "template_dir", lambda: directory)
    compiler._template.cache_clear()
    yield directory
    compiler._template.cache_clear()


@pytest.mark.parametrize("spec", [KernelSpec(128, 128, 4, "bf16", "fp32", "mma"),
                                  KernelSpec(128, 128, 8, "fp16", "fp32", "bulk")], ids=lambda s: s.name)
def test_instrumented_kernel_compiles_with_every_mark(instrumented, spec):
    source = compiler.render(spec)
    body = source[source.index(f"{spec.name}(const __grid_constant__ Params p)"):]
    marks = [int(i) for i in re.findall(r"timeline_mark\((\d+)\);", body)]
    assert marks == list(range(len(timeline.MARK_NAMES)))  # each once, in program order
    compiled = compiler.compile_spec(spec)
    assert compiled.spill_bytes == 0 and compiled.stack_bytes == 0, compiled.log
    assert timeline.GLOBAL_NAME.encode() in compiled.cubin


def test_scalar_kernels_get_no_marks(instrumented):
    source = compiler.render(KernelSpec(128, 128, 4, "bf16", "fp32"))
    assert "timeline_mark(" in source  # the helper is there ...
    assert not re.search(r"timeline_mark\(\d+\);", source)  # ... but no kernel calls it


def test_template_without_a_place_is_refused():
    text, _ = timeline._MARK_AFTER[3]
    with pytest.raises(ValueError, match="timeline_mark\\(3\\)"):
        timeline.instrumented_template(SHIPPED.replace(text, ""))
    with pytest.raises(ValueError, match="no mma kernel"):
        timeline.instrumented_template(SHIPPED.replace(timeline._MMA_BEGIN, ""))


def synthetic(blocks: int, warps: int, missing: bool = False) -> torch.Tensor:
    """Block b, warp w stores mark i at (1000 + 500 b + 1000 i + 10 w) ns, its clock at 2 GHz."""
    entries = torch.zeros(blocks * warps * timeline.STRIDE + 7, dtype=torch.int64)
    view = entries[: blocks * warps * timeline.STRIDE].view(blocks, warps, timeline.STRIDE)
    for b in range(blocks):
        for w in range(warps):
            for i in range(len(timeline.MARK_NAMES)):
                ns = 1000 + 500 * b + 1000 * i + 10 * w
                view[b, w, 2 * i], view[b, w, 2 * i + 1] = ns, 2 * ns + 12345
            view[b, w, timeline.STRIDE - 1] = b % 3
    if missing:
        view[1, 2, 4] = 0
    return entries


def test_summary_of_known_marks():
    lines = timeline.summarise(synthetic(5, 4), 5, 4)
    assert lines[0].startswith("   span 11.03 us, clock 2.00 GHz, 3 SMs, at most 2 blocks on one SM")
    rows = {line[:33].strip(): [float(x) for x in line[33:].split()] for line in lines[2:] if "phase:" not in line}
    # warp 0's mark i over blocks 0..4: 1 i + 0.5 b us from the first start
    assert rows["entry"] == [0.0, 0.2, 1.0, 1.8, 2.0]
    assert rows["end"] == [9.0, 9.2, 10.0, 10.8, 11.0]
    assert rows["S0 . x -> recurrence"] == [1.0] * 5  # every phase lasts 1 us by the clock


def test_summary_says_when_a_mark_is_missing():
    assert "missing" in timeline.summarise(synthetic(3, 4, missing=True), 3, 4)[0]
