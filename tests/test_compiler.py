import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from functools import cache

import pytest

from gdn_nvrtc import compiler
from gdn_nvrtc.cubins import MANIFEST_NAME, PREBUILT_DIR, prebuilt_manifest
from gdn_nvrtc.specs import PREBUILT_SPECS, KernelSpec


def test_rendered_source_uses_no_headers():
    source = compiler.render(PREBUILT_SPECS[0])
    assert "#include" not in source
    assert f"{PREBUILT_SPECS[0].name}(const __grid_constant__ Params p)" in source


@cache
def _prebuilt_compiles() -> dict:
    """Every prebuilt spec compiled as build_cubins.py compiles it (compile_without_spills), once per test
    session, in one process per CPU: spec name -> (compiled, compiles), or the exception its compile raised.
    The workers are spawned, so no test's monkeypatching reaches them."""
    results = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        futures = {spec.name: pool.submit(compiler.compile_without_spills, spec) for spec in PREBUILT_SPECS}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except Exception as error:  # raised again by that spec's own test
                results[name] = error
    return results


def _prebuilt_compile(spec: KernelSpec) -> tuple[compiler.CompiledKernel, int]:
    result = _prebuilt_compiles()[spec.name]
    if isinstance(result, Exception):
        raise result
    return result


@pytest.mark.parametrize("spec", PREBUILT_SPECS, ids=lambda s: s.name)
def test_every_prebuilt_spec_compiles_without_spills(spec):
    """As build_cubins.py makes it: NVRTC's output varies between compiles of one source, so a spec gets up to
    PREBUILT_COMPILE_ATTEMPTS compiles to come out without spills (one in a GPU-suite run spilled once, v44)."""
    compiled, compiles = _prebuilt_compile(spec)
    assert compiled.spec == spec
    assert compiled.cubin[:4] == b"\x7fELF"
    assert compiled.spill_bytes == 0 and compiled.stack_bytes == 0, f"{compiles} compiles, the last:\n{compiled.log}"
    assert compiled.registers <= 255


@pytest.mark.skipif(not prebuilt_manifest()["kernels"], reason="prebuilt cubins not built")
def test_prebuilt_manifest_records_no_spills():
    """Every cubin build_cubins.py wrote (the ones a wheel ships) was compiled without spills or a stack frame."""
    kernels = prebuilt_manifest()["kernels"]
    assert sorted(kernels) == sorted(spec.name for spec in PREBUILT_SPECS)
    assert [name for name, entry in kernels.items() if entry["spill_bytes"] or entry["stack_bytes"]] == []


def _fake_compiles(monkeypatch, spills: list[int]) -> list[int]:
    """compile_spec answering with these spill counts in turn; returns the list of compiles made."""
    made = []

    def fake(spec):
        made.append(len(made))
        spill = spills[len(made) - 1]
        return compiler.CompiledKernel(spec, b"\x7fELF", 128, spill, 0, 1024, f"compile {len(made)}")

    monkeypatch.setattr(compiler, "compile_spec", fake)
    return made


@pytest.mark.parametrize(("spills", "compiles", "spilled"), [
    ([0, 8, 8], 1, 0), ([24, 0, 8], 2, 0), ([24, 16, 0], 3, 0), ([24, 16, 8], 3, 8),
])
def test_compile_without_spills_compiles_again_only_after_a_spill(monkeypatch, spills, compiles, spilled):
    made = _fake_compiles(monkeypatch, spills)
    compiled, count = compiler.compile_without_spills(PREBUILT_SPECS[0], attempts=3)
    assert (count, len(made), compiled.spill_bytes) == (compiles, compiles, spilled)
    assert compiled.log == f"compile {compiles}"


def test_compile_without_spills_needs_one_attempt(monkeypatch):
    made = _fake_compiles(monkeypatch, [0])
    with pytest.raises(ValueError, match="at least 1"):
        compiler.compile_without_spills(PREBUILT_SPECS[0], attempts=0)
    assert made == []


# Hopper (sm_90): 64K registers and 228 KB of shared memory per multiprocessor, of which the driver
# reserves 1 KB per resident block.
SM90_REGISTERS = 65536
SM90_SHARED_BYTES = 228 * 1024
SM90_RESERVED_SHARED_PER_BLOCK = 1024


@pytest.mark.parametrize("spec", [s for s in PREBUILT_SPECS if s.min_blocks_per_sm], ids=lambda s: s.name)
def test_blocks_per_sm_hint_fits_registers_and_shared_memory(spec):
    """The tiling choice (specs) counts on MIN_BLOCKS blocks per SM; neither the registers nor the
    static shared memory may allow fewer (ptxas enforces only the registers)."""
    compiled, _ = _prebuilt_compile(spec)
    blocks = spec.min_blocks_per_sm
    assert compiled.shared_bytes > 0, compiled.log
    assert blocks * spec.threads_per_block * compiled.registers <= SM90_REGISTERS, compiled.log
    assert blocks * (compiled.shared_bytes + SM90_RESERVED_SHARED_PER_BLOCK) <= SM90_SHARED_BYTES, compiled.log


FALLBACK_SPECS = [KernelSpec(64, 256, 16, "bf16"), KernelSpec(256, 64, 3, "fp16")]


@pytest.mark.parametrize("spec", FALLBACK_SPECS, ids=lambda s: s.name)
def test_fallback_shapes_compile_without_spills(spec):
    compiled = compiler.compile_spec(spec)
    assert compiled.spill_bytes == 0 and compiled.stack_bytes == 0, compiled.log


def test_spec_compile_options_reach_nvrtc(monkeypatch):
    """Only twin4 at T = 7 is compiled with ptxas -O1 (specs.PTXAS_O1_SPECS); compile_spec hands a spec's own
    options to NVRTC after NVRTC_OPTIONS."""
    assert {(s.tiling_name, s.num_tokens) for s in PREBUILT_SPECS if s.compile_options} == {("twin4", 7)}
    assert all(s.compile_options == ("--ptxas-options=-O1",) for s in PREBUILT_SPECS if s.compile_options)
    seen = []

    def fake(source, filename, options=()):
        seen.append(options)
        raise compiler.CompileError("stop here")

    monkeypatch.setattr(compiler, "compile_source", fake)
    for spec in (KernelSpec(128, 128, 7, "bf16", "fp32", "twin4"), KernelSpec(128, 128, 8, "bf16", "fp32", "twin4")):
        with pytest.raises(compiler.CompileError, match="stop here"):
            compiler.compile_spec(spec)
    assert seen == [("--ptxas-options=-O1",), ()]


@pytest.mark.parametrize(("T", "tiling", "streaming"), [
    (2, "narrow", False), (3, "narrow", True), (3, "store", True), (8, "store", True), (8, "wide", False),
    (5, "mma", False), (6, "mma", True), (8, "mma", True), (8, "bulk", False), (8, "twin4", False),
])
def test_streaming_state_stores(T, tiling, streaming):
    """STORE_CS (specs.STREAMING_STATES_FROM_TOKENS): the per-token states (buffer and scatter) go out with __stcs,
    the final state and the mma kernel's staged rows as before; elsewhere no kernel has the hint."""
    spec = KernelSpec(128, 128, T, "bf16", "fp32", tiling)
    source = compiler.render(spec)
    assert spec.streaming_state_stores == streaming
    if not streaming:
        assert "__stcs" not in source and "store_state<" not in source
        assert "store_rows<" not in source
    elif spec.uses_mma:
        assert source.count("store_state<true>(") == 2  # the two per-token stores
        assert source.count("store_state(") == 2  # the definition and the final state, plain
        assert source.count("__stcs") == 2 and "template <bool STREAM = false>" in source
    else:
        assert source.count("store_rows<true>(") == 2 and source.count("store_rows<false>(") == 1


def test_states_through_bulk_copies_only_where_staged():
    """STATES_BULK: of the prebuilt kernels only the staged tiling's send the per-token states through the
    staging rows and bulk copies (both buffer and scatter stores), the final state by st.global as before."""
    for spec in PREBUILT_SPECS:
        source = compiler.render(spec)
        assert spec.states_bulk == (spec.tiling_name == "staged"), spec.name
        if spec.states_bulk:
            assert source.count("store_rows_bulk(") == 3 and source.count("store_rows(") == 2
            assert "cp.async.bulk.global.shared::cta.bulk_group" in source
        else:
            assert "store_rows_bulk" not in source
    assert {spec.num_tokens for spec in PREBUILT_SPECS if spec.states_bulk} == {2}


def test_streaming_stores_without_the_key_render_as_before(monkeypatch):
    """Without STORE_CS a tiling renders the source it had before the key existed: the plain stores only."""
    from gdn_nvrtc import specs

    shipped_tiling_for = specs.tiling_for

    def without(num_tokens, name="wide"):
        tiling = shipped_tiling_for(num_tokens, name)
        tiling.pop("STORE_CS", None)
        return tiling

    monkeypatch.setattr(specs, "tiling_for", without)
    for T, tiling in ((3, "narrow"), (8, "store"), (6, "mma")):
        spec = KernelSpec(128, 128, T, "bf16", "fp32", tiling)
        assert not spec.streaming_state_stores
        source = compiler.render(spec)
        assert "__stcs" not in source and "store_state<" not in source and "store_rows<" not in source


def test_compile_error_carries_the_log(monkeypatch):
    monkeypatch.setattr(compiler, "render", lambda spec: "this is not CUDA;")
    with pytest.raises(compiler.CompileError, match="compiling .* failed.*\n.*error"):
        compiler.compile_spec(PREBUILT_SPECS[0])


def test_sources_hash_tracks_the_template(tmp_path, monkeypatch):
    before = compiler.sources_sha256()
    (tmp_path / compiler.TEMPLATE_NAME).write_text(
        (compiler.template_dir() / compiler.TEMPLATE_NAME).read_text() + "// changed\n"
    )
    monkeypatch.setattr(compiler, "template_dir", lambda: tmp_path)
    compiler.sources_sha256.cache_clear()
    try:
        assert compiler.sources_sha256() != before
    finally:
        compiler.sources_sha256.cache_clear()


@pytest.mark.skipif(not (PREBUILT_DIR / MANIFEST_NAME).is_file(), reason="prebuilt cubins not built")
def test_prebuilt_manifest_is_complete_and_current():
    manifest = json.loads((PREBUILT_DIR / MANIFEST_NAME).read_text())
    assert set(manifest["kernels"]) == {spec.name for spec in PREBUILT_SPECS}
    assert manifest["nvrtc_options"] == list(compiler.NVRTC_OPTIONS)
    assert manifest["sources_sha256"] == compiler.sources_sha256(), "prebuilt cubins are stale"
    for spec in PREBUILT_SPECS:
        entry = manifest["kernels"][spec.name]
        assert entry["spill_bytes"] == 0 and entry["stack_bytes"] == 0
        assert entry["extra_options"] == list(spec.compile_options)
        assert (PREBUILT_DIR / entry["file"]).read_bytes()[:4] == b"\x7fELF"
