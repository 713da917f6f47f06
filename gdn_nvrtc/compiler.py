"""Render a kernel template for one spec and compile it to an sm_90a cubin with NVRTC.

Used by build_cubins.py (prebuilt cubins) and by the runtime for shapes that have
no prebuilt cubin. NVRTC is imported only when something is compiled, so a
wheel with prebuilt cubins runs without it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from . import specs
from .specs import ARCH, FLAGS, PARAM_FIELDS, SCALAR_DTYPE_CODES, KernelSpec

TEMPLATE_NAME = "gdn_mtp.cu.j2"
# --no-cache: NVRTC 13 may otherwise return a cubin from the driver's cache without running
# ptxas, and then the log lacks the resource report we record and check.
NVRTC_OPTIONS = (f"--gpu-architecture={ARCH}", "-std=c++17", "-lineinfo", "--ptxas-options=-v", "--no-cache")


def template_dir() -> Path:
    """The templates shipped inside the wheel, or the repository's templates/ in a source tree."""
    for candidate in (Path(__file__).parent / "templates", Path(__file__).parent.parent / "templates"):
        if (candidate / TEMPLATE_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"{TEMPLATE_NAME} not found next to the gdn_nvrtc package or in the repository's templates/"
    )


@cache
def _template():
    import jinja2  # only when something is rendered: the first call of a prebuilt shape needs no jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return env.get_template(TEMPLATE_NAME)


def render(spec: KernelSpec) -> str:
    return _template().render(
        kernel_name=spec.name,
        K=spec.head_dim_k,
        V=spec.head_dim_v,
        T=spec.num_tokens,
        input_dtype=spec.input_dtype,
        threads=spec.threads_per_block,
        lanes_per_row=spec.lanes_per_row,
        rows_per_thread=spec.rows_per_thread,
        min_blocks=spec.min_blocks_per_sm,
        mma=spec.uses_mma,
        short_chain=spec.short_chain,
        streaming_state_stores=spec.streaming_state_stores,
        bulk_final=spec.bulk_final,
        states_bulk=spec.states_bulk,
        two_tiles=spec.two_tiles,
        param_fields=PARAM_FIELDS,
        flags=FLAGS,
        scalar_codes=SCALAR_DTYPE_CODES,
    )


@cache
def sources_sha256() -> str:
    """Identifies what every cubin is compiled from: the template, the spec rules and the options.

    Hashing the two files is cheap enough for the first call; rendering the template is not."""
    digest = hashlib.sha256()
    for path in (template_dir() / TEMPLATE_NAME, Path(specs.__file__)):
        digest.update(path.read_bytes())
    digest.update("\n".join(NVRTC_OPTIONS).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class CompiledKernel:
    spec: KernelSpec
    cubin: bytes
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    log: str

    def manifest_entry(self) -> dict:
        return {
            "registers": self.registers,
            "spill_bytes": self.spill_bytes,
            "stack_bytes": self.stack_bytes,
            "shared_bytes": self.shared_bytes,
            "extra_options": list(self.spec.compile_options),  # after the manifest's nvrtc_options
        }


class CompileError(RuntimeError):
    pass


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as error:
        raise CompileError(
            "compiling a kernel needs NVRTC through cuda-bindings: "
            "pip install cuda-bindings nvidia-cuda-nvrtc"
        ) from error
    return nvrtc


def _check(nvrtc, result, what: str, log: str = "") -> None:
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, message = nvrtc.nvrtcGetErrorString(result)
        raise CompileError(f"NVRTC {what} failed: {message.decode()}\n{log}")


@cache
def nvrtc_version() -> str:
    nvrtc = _nvrtc()
    result, major, minor = nvrtc.nvrtcVersion()
    _check(nvrtc, result, "nvrtcVersion")
    return f"{major}.{minor}"


def _ptxas_number(log: str, pattern: str) -> int:
    match = re.search(pattern, log)
    if match is None:
        raise CompileError(f"ptxas report has no match for {pattern!r}:\n{log}")
    return int(match.group(1))


def compile_source(source: str, filename: str, options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """Compile CUDA source to an sm_90a cubin with NVRTC_OPTIONS plus `options`; (cubin, log).
    Raises CompileError with NVRTC's log on failure."""
    nvrtc = _nvrtc()
    result, program = nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], [])
    _check(nvrtc, result, "nvrtcCreateProgram")
    try:
        encoded = [option.encode() for option in (*NVRTC_OPTIONS, *options)]
        (compile_result,) = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
        result, size = nvrtc.nvrtcGetProgramLogSize(program)
        _check(nvrtc, result, "nvrtcGetProgramLogSize")
        log_buffer = bytearray(size)
        (result,) = nvrtc.nvrtcGetProgramLog(program, log_buffer)
        _check(nvrtc, result, "nvrtcGetProgramLog")
        log = bytes(log_buffer).rstrip(b"\x00 ").decode(errors="replace")
        _check(nvrtc, compile_result, f"compiling {filename}", log)
        result, size = nvrtc.nvrtcGetCUBINSize(program)
        _check(nvrtc, result, "nvrtcGetCUBINSize")
        cubin_buffer = bytearray(size)
        (result,) = nvrtc.nvrtcGetCUBIN(program, cubin_buffer)
        _check(nvrtc, result, "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return bytes(cubin_buffer), log


def compile_spec(spec: KernelSpec) -> CompiledKernel:
    """Compile one spec (NVRTC_OPTIONS and the spec's own compile_options); raises CompileError with NVRTC's
    log on failure."""
    cubin, log = compile_source(render(spec), f"{spec.name}.cu", spec.compile_options)
    return CompiledKernel(
        spec=spec,
        cubin=cubin,
        registers=_ptxas_number(log, r"Used (\d+) registers"),
        spill_bytes=_ptxas_number(log, r"(\d+) bytes spill stores") + _ptxas_number(log, r"(\d+) bytes spill loads"),
        stack_bytes=_ptxas_number(log, r"(\d+) bytes stack frame"),
        shared_bytes=_ptxas_number(log, r"(\d+) bytes smem") if "bytes smem" in log else 0,
        log=log,
    )


# NVRTC's PTX for one source is not always the same: one compile in ten to twenty of an mma-kernel spec differs
# (an extra or merged shared-memory load; benchmarks/NOTES.md v44), and ptxas allocates registers for what
# it is given, so a kernel at its register limit can spill in one compile and not in the next.
PREBUILT_COMPILE_ATTEMPTS = 3


def compile_without_spills(spec: KernelSpec, attempts: int = PREBUILT_COMPILE_ATTEMPTS) -> tuple[CompiledKernel, int]:
    """Compile `spec` until a compile neither spills nor uses a stack frame, at most `attempts` times (how the
    prebuilt cubins are made); (the compile, the number of compiles). The last compile when every one spilled:
    the caller decides (build_cubins.py fails)."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    compiles = 0
    while True:
        compiled = compile_spec(spec)
        compiles += 1
        if not (compiled.spill_bytes or compiled.stack_bytes) or compiles == attempts:
            return compiled, compiles
