import multiprocessing
import subprocess
import sys

import pytest

from gdn_nvrtc import compiler, cubins
from gdn_nvrtc.specs import PREBUILT_SPECS, KernelSpec

FALLBACK = KernelSpec(64, 64, 2, "bf16")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GDN_NVRTC_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_fallback_is_compiled_once_then_read_from_disk(cache, monkeypatch):
    cubin = cubins.load_cubin(FALLBACK)
    assert cubin[:4] == b"\x7fELF"
    files = list(cache.glob("*.cubin"))
    assert len(files) == 1 and files[0].name.startswith(FALLBACK.name)

    def no_compile(spec):
        raise AssertionError("compiled although the cache holds the cubin")

    monkeypatch.setattr(compiler, "compile_spec", no_compile)
    assert cubins.load_cubin(FALLBACK) == cubin


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b"", lambda data: data[:40]])
def test_damaged_cache_file_is_rebuilt(cache, damage):
    cubin = cubins.load_cubin(FALLBACK)
    (path,) = cache.glob("*.cubin")
    path.write_bytes(damage(path.read_bytes()))
    assert cubins.load_cubin(FALLBACK) == cubin
    assert cubins._read_cached(path) == cubin


def _load_in_child(_):
    return cubins.load_cubin(FALLBACK)


def test_two_processes_compiling_at_once(cache):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_load_in_child, range(2))
    assert results[0] == results[1]
    (path,) = cache.glob("*.cubin")
    assert cubins._read_cached(path) == results[0]
    assert not list(cache.glob("*.tmp"))


@pytest.mark.skipif(not cubins.prebuilt_manifest()["kernels"], reason="prebuilt cubins not built")
def test_prebuilt_shape_never_loads_nvrtc_or_jinja2(tmp_path):
    # Neither is needed to run a prebuilt cubin; importing jinja2 alone cost ~20-50 ms of the first call.
    code = (
        "import sys; sys.modules['cuda.bindings.nvrtc'] = None; sys.modules['jinja2'] = None\n"
        "from gdn_nvrtc import cubins; from gdn_nvrtc.specs import PREBUILT_SPECS\n"
        "assert all(cubins.load_cubin(s)[:4] == b'\\x7fELF' for s in PREBUILT_SPECS)\n"
        "assert sys.modules['cuda.bindings.nvrtc'] is None and sys.modules['jinja2'] is None\n"
    )
    env = {"GDN_NVRTC_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=cubins.PREBUILT_DIR.parent.parent)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not cubins.prebuilt_manifest()["kernels"], reason="prebuilt cubins not built")
def test_stale_prebuilt_cubin_is_refused(monkeypatch):
    spec = PREBUILT_SPECS[0]
    monkeypatch.setattr(compiler, "sources_sha256", lambda: "0" * 64)
    with pytest.raises(RuntimeError, match=f"prebuilt cubin for {spec.name}.*python build_cubins.py"):
        cubins.load_cubin(spec)
