"""Where a spec's cubin comes from: the prebuilt set shipped in the wheel, else the on-disk
compile cache, else NVRTC (once; the result is cached on disk for the next process).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import cache
from pathlib import Path

from .specs import KernelSpec

PREBUILT_DIR = Path(__file__).parent / "cubins"
MANIFEST_NAME = "manifest.json"
_DIGEST_BYTES = 32


@cache
def prebuilt_manifest() -> dict:
    """The manifest written by build_cubins.py, or an empty one when nothing was prebuilt."""
    path = PREBUILT_DIR / MANIFEST_NAME
    if not path.is_file():
        return {"kernels": {}}
    return json.loads(path.read_text())


def _check_prebuilt_is_current(spec: KernelSpec, manifest: dict) -> None:
    from .compiler import sources_sha256

    if manifest["sources_sha256"] != sources_sha256():
        raise RuntimeError(
            f"the prebuilt cubin for {spec.name} in {PREBUILT_DIR} was built from another version of the "
            "kernel sources; rebuild the prebuilt cubins with `python build_cubins.py`"
        )


def cache_dir() -> Path:
    explicit = os.environ.get("GDN_NVRTC_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gdn_nvrtc"


def _cache_path(spec: KernelSpec) -> Path:
    from .compiler import nvrtc_version, sources_sha256

    key = hashlib.sha256(f"{spec.name}\n{sources_sha256()}\n{nvrtc_version()}".encode()).hexdigest()
    return cache_dir() / f"{spec.name}-{key[:24]}.cubin"


def _read_cached(path: Path) -> bytes | None:
    """A cache file is the sha256 of the cubin followed by the cubin; anything else is rebuilt."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    digest, cubin = data[:_DIGEST_BYTES], data[_DIGEST_BYTES:]
    if len(data) <= _DIGEST_BYTES or hashlib.sha256(cubin).digest() != digest:
        return None
    return cubin


def _write_cached(path: Path, cubin: bytes) -> None:
    # Write to a private temporary file and rename: readers see the old file or the whole new one.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(hashlib.sha256(cubin).digest() + cubin)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def is_prebuilt(spec: KernelSpec) -> bool:
    return spec.name in prebuilt_manifest()["kernels"]


def load_cubin(spec: KernelSpec) -> bytes:
    manifest = prebuilt_manifest()
    entry = manifest["kernels"].get(spec.name)
    if entry is not None:
        _check_prebuilt_is_current(spec, manifest)
        return (PREBUILT_DIR / entry["file"]).read_bytes()
    path = _cache_path(spec)
    cubin = _read_cached(path)
    if cubin is None:
        from .compiler import compile_spec

        cubin = compile_spec(spec).cubin
        _write_cached(path, cubin)
    return cubin
