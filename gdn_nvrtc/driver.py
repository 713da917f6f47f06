"""The CUDA driver layer: load a spec's cubin once per process, launch it on a stream.

Cubins are loaded as context-independent libraries (cuLibraryLoadData), so one
load serves every GPU of the process. Kernels take one parameter struct by value.
"""

from __future__ import annotations

import ctypes
import threading

from cuda.bindings import driver as cu

from .cubins import load_cubin
from .specs import KernelSpec

# torch's default stream is the legacy NULL stream (handle 0). A kernel launched on
# it runs in the calling thread's current context, which must be the tensor's device.
_NULL_STREAM = 0


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the error."""


def check(result: cu.CUresult, what: str) -> None:
    if result != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(result)
        _, text = cu.cuGetErrorString(result)
        name = name.decode() if name else str(int(result))
        text = text.decode() if text else "unknown error"
        raise CudaError(f"{what} failed: {name}: {text}")


class Kernel:
    """A loaded kernel: the launch handle, and per device the largest grid that is resident at once."""

    def __init__(self, spec: KernelSpec, handle: cu.CUkernel) -> None:
        self.spec = spec
        self.handle = handle
        self.function = cu.CUfunction(int(handle))
        self._resident_blocks: dict[int, int] = {}

    def resident_blocks(self, device_index: int) -> int:
        """Blocks of this kernel that fit on the whole device at once (the persistent grid size)."""
        blocks = self._resident_blocks.get(device_index)
        if blocks is None:
            with _lock:
                blocks = self._resident_blocks.get(device_index)
                if blocks is None:
                    blocks = self._resident_blocks[device_index] = self._prepare(device_index)
        return blocks

    def _prepare(self, device_index: int) -> int:
        spec = self.spec
        result, device = cu.cuDeviceGet(device_index)
        check(result, f"cuDeviceGet({device_index})")
        (result,) = cu.cuKernelSetAttribute(
            cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            spec.dynamic_shared_bytes, self.handle, device,
        )
        check(result, f"allowing {spec.dynamic_shared_bytes} B of dynamic shared memory for {spec.name}")
        result, sms = cu.cuDeviceGetAttribute(
            cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device
        )
        check(result, "reading the multiprocessor count")
        with _current_context(device_index):
            result, function = cu.cuKernelGetFunction(self.handle)
            check(result, f"getting {spec.name} for cuda:{device_index} (cuKernelGetFunction)")
            result, per_sm = cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(
                function, spec.threads_per_block, spec.dynamic_shared_bytes
            )
            check(result, f"computing the occupancy of {spec.name}")
        if per_sm < 1:
            raise CudaError(f"{spec.name} does not fit on one multiprocessor of cuda:{device_index}")
        return per_sm * sms


_lock = threading.RLock()
_kernels: dict[KernelSpec, Kernel] = {}
_libraries: list[cu.CUlibrary] = []  # kept alive for the life of the process
_contexts: dict[int, int] = {}
_initialised = False


def _init() -> None:
    global _initialised
    if not _initialised:
        (result,) = cu.cuInit(0)
        check(result, "cuInit")
        _initialised = True


def kernel(spec: KernelSpec) -> Kernel:
    """The loaded kernel of a spec, loading its cubin on first use (thread-safe)."""
    loaded = _kernels.get(spec)
    if loaded is None:
        with _lock:
            loaded = _kernels.get(spec)
            if loaded is None:
                _init()
                cubin = load_cubin(spec)
                result, library = cu.cuLibraryLoadData(cubin, None, None, 0, None, None, 0)
                check(result, f"loading the cubin of {spec.name} (cuLibraryLoadData)")
                result, handle = cu.cuLibraryGetKernel(library, spec.name.encode())
                check(result, f"finding kernel {spec.name} in its cubin (cuLibraryGetKernel)")
                _libraries.append(library)
                loaded = _kernels[spec] = Kernel(spec, handle)
    return loaded


def _primary_context(device_index: int) -> int:
    context = _contexts.get(device_index)
    if context is None:
        with _lock:
            _init()
            result, device = cu.cuDeviceGet(device_index)
            check(result, f"cuDeviceGet({device_index})")
            result, handle = cu.cuDevicePrimaryCtxRetain(device)
            check(result, f"retaining the primary context of cuda:{device_index}")
            context = _contexts[device_index] = int(handle)
    return context


class _current_context:
    """Make the primary context of a device current for a driver call that needs one, if it is not."""

    def __init__(self, device_index: int) -> None:
        self.device_index = device_index
        self.pushed = False

    def __enter__(self) -> None:
        context = _primary_context(self.device_index)
        result, current = cu.cuCtxGetCurrent()
        check(result, "cuCtxGetCurrent")
        if int(current) != context:
            (result,) = cu.cuCtxPushCurrent(cu.CUcontext(context))
            check(result, f"making cuda:{self.device_index} current (cuCtxPushCurrent)")
            self.pushed = True

    def __exit__(self, *exc) -> None:
        if self.pushed:
            (result, _) = cu.cuCtxPopCurrent()
            check(result, "cuCtxPopCurrent")


def launch(kernel: Kernel, grid: int, stream: int, device_index: int, params: bytes) -> None:
    """Launch kernel(params) with a 1-D grid on the given stream handle of device_index."""
    buffer = ctypes.create_string_buffer(params, len(params))
    pointers = (ctypes.c_void_p * 1)(ctypes.addressof(buffer))
    spec = kernel.spec
    arguments = (kernel.function, grid, 1, 1, spec.threads_per_block, 1, 1, spec.dynamic_shared_bytes, stream,
                 ctypes.addressof(pointers), 0)
    if stream == _NULL_STREAM:
        with _current_context(device_index):
            (result,) = cu.cuLaunchKernel(*arguments)
    else:
        (result,) = cu.cuLaunchKernel(*arguments)
    check(result, "cuLaunchKernel")
