"""The CUDA driver layer: load a spec's cubin once per process, launch it on a stream.

Cubins are loaded as context-independent libraries (cuLibraryLoadData), so one
load serves every GPU of the process. Kernels take one parameter struct by value.
"""

from __future__ import annotations

import ctypes
import struct
import threading

from cuda.bindings import driver as cu

from .cubins import load_cubin
from .specs import KernelSpec

# torch's default stream is the legacy NULL stream (handle 0). A kernel launched on
# it runs in the calling thread's current context, which must be the tensor's device.
_NULL_STREAM = 0
_SUCCESS = cu.CUresult.CUDA_SUCCESS


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the error."""


def check(result: cu.CUresult, what: str) -> None:
    if result != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(result)
        _, text = cu.cuGetErrorString(result)
        name = name.decode() if name else str(int(result))
        text = text.decode() if text else "unknown error"
        raise CudaError(f"{what} failed: {name}: {text}")


_lock = threading.Lock()
_kernels: dict[KernelSpec, cu.CUfunction] = {}
_libraries: list[cu.CUlibrary] = []  # kept alive for the life of the process
_contexts: dict[int, int] = {}
_initialised = False


def _init() -> None:
    global _initialised
    if not _initialised:
        (result,) = cu.cuInit(0)
        check(result, "cuInit")
        _initialised = True


def kernel(spec: KernelSpec) -> cu.CUfunction:
    """The launchable handle for a spec, loading its cubin on first use (thread-safe)."""
    function = _kernels.get(spec)
    if function is None:
        with _lock:
            function = _kernels.get(spec)
            if function is None:
                function = _kernels[spec] = load_kernel(load_cubin(spec), spec.name)
    return function


def load_kernel(cubin: bytes, name: str) -> cu.CUfunction:
    """Load a cubin as a context-independent library (kept for the life of the process) and
    return its kernel `name`."""
    _init()
    result, library = cu.cuLibraryLoadData(cubin, None, None, 0, None, None, 0)
    check(result, f"loading the cubin of {name} (cuLibraryLoadData)")
    result, handle = cu.cuLibraryGetKernel(library, name.encode())
    check(result, f"finding kernel {name} in its cubin (cuLibraryGetKernel)")
    _libraries.append(library)
    return cu.CUfunction(int(handle))


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


def _make_current(device_index: int) -> bool:
    """Push the primary context of cuda:device_index unless it is already current; True when
    pushed (then _pop_current() afterwards)."""
    context = _primary_context(device_index)
    result, current = cu.cuCtxGetCurrent()
    check(result, "cuCtxGetCurrent")
    if int(current) == context:
        return False
    (result,) = cu.cuCtxPushCurrent(cu.CUcontext(context))
    check(result, f"making cuda:{device_index} current (cuCtxPushCurrent)")
    return True


def _current_context() -> int | None:
    """The handle of the calling thread's current context (None when that cannot be read)."""
    result, current = cu.cuCtxGetCurrent()
    return int(current) if result == _SUCCESS else None


def _pop_current() -> None:
    (result, _) = cu.cuCtxPopCurrent()
    check(result, "cuCtxPopCurrent")


def blocks_per_sm(function: cu.CUfunction, block: int, device_index: int, shared_bytes: int = 0) -> int:
    """How many blocks of the kernel fit on one multiprocessor of cuda:device_index at once
    (registers, shared memory), launched with shared_bytes of dynamic shared memory. The query runs
    in that device's context, which the calling thread need not have current."""
    pushed = _make_current(device_index)
    try:
        result, count = cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(function, block, shared_bytes)
        check(result, "cuOccupancyMaxActiveBlocksPerMultiprocessor")
    finally:
        if pushed:
            _pop_current()
    return int(count)


_paddings: dict[tuple[int, int, int, int], int] = {}


def shared_bytes_for_at_most(function: cu.CUfunction, block: int, device_index: int, blocks: int) -> int:
    """The dynamic shared memory (which the kernel does not use) to launch the kernel with so that at
    most `blocks` of its blocks fit on one multiprocessor of cuda:device_index: 0 where its registers
    and static shared memory allow no more already. Where it is not 0, the kernel's limit of dynamic
    shared memory on that device is first raised to all that a block may have (cuKernelSetAttribute).
    Raises CudaError where no padding gives 1 to `blocks` blocks per multiprocessor."""
    key = (int(function), block, device_index, blocks)
    padding = _paddings.get(key)
    if padding is not None:
        return padding
    # Without a lock: threads that meet here first compute the same padding.
    if blocks_per_sm(function, block, device_index) <= blocks:
        padding = 0
    else:
        kernel, device = cu.CUkernel(int(function)), cu.CUdevice(device_index)
        result, most = cu.cuDeviceGetAttribute(
            cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device)
        check(result, "cuDeviceGetAttribute(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)")
        result, static = cu.cuKernelGetAttribute(
            cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, kernel, device)
        check(result, "cuKernelGetAttribute(SHARED_SIZE_BYTES)")
        limit = int(most) - int(static)
        (result,) = cu.cuKernelSetAttribute(
            cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, limit, kernel, device)
        check(result, "raising the kernel's dynamic shared memory limit (cuKernelSetAttribute)")
        pushed = _make_current(device_index)
        try:
            # The most dynamic shared memory with which blocks + 1 still fit, and one byte more ...
            result, room = cu.cuOccupancyAvailableDynamicSMemPerBlock(function, blocks + 1, block)
            check(result, "cuOccupancyAvailableDynamicSMemPerBlock")
        finally:
            if pushed:
                _pop_current()
        padding = min(int(room) + 1, limit)
        count = blocks_per_sm(function, block, device_index, padding)
        while count > blocks and padding < limit:  # ... or more, in allocation units, should that still fit
            padding = min(padding + 128, limit)
            count = blocks_per_sm(function, block, device_index, padding)
        if not 1 <= count <= blocks:
            raise CudaError(
                f"{padding} B of dynamic shared memory leave {count} blocks of {block} threads per "
                f"multiprocessor on cuda:{device_index}, not 1 to {blocks}")
    _paddings[key] = padding
    return padding


# Programmatic dependent launch: the kernel may be scheduled while the previous kernel of its
# stream is still running; before it reads anything it uses, griddepcontrol.wait waits until that
# kernel has completed and its memory is visible, so the stream order is kept (until then a block
# only prefetches into L2, see the template's block_start). Without the attribute the wait
# returns at once.
programmatic_launch = True

# Launch configurations by (grid, block, stream, dynamic shared memory): a CUlaunchConfig costs about
# 1 us to fill per launch through the bindings, and serving calls repeat a few shapes on one stream.
# They are never modified once stored, so threads may share them.
_configs: dict[tuple[int, int, int, int], cu.CUlaunchConfig] = {}
_MAX_CONFIGS = 1024


def _launch_config(grid: int, block: int, stream: int, shared_bytes: int = 0) -> cu.CUlaunchConfig:
    """A 1-D launch configuration with the PDL attribute."""
    key = (grid, block, stream, shared_bytes)
    config = _configs.get(key)
    if config is None:
        attribute = cu.CUlaunchAttribute()
        attribute.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attribute.value.programmaticStreamSerializationAllowed = 1
        config = cu.CUlaunchConfig()
        config.gridDimX = grid
        config.blockDimX = block
        config.hStream = stream
        config.gridDimY = config.gridDimZ = config.blockDimY = config.blockDimZ = 1
        config.sharedMemBytes = shared_bytes
        config.attrs = [attribute]
        config.numAttrs = 1
        if len(_configs) >= _MAX_CONFIGS:
            _configs.clear()
        _configs[key] = config
    return config


class Launch:
    """A kernel with its 1-D grid and block on one device, the dynamic shared memory it is launched with
    (shared_bytes, unused by the kernel: a cap on its blocks per SM), and its parameter struct: what a
    call's plan launches. The struct is `head` (a struct.Struct of the values each call passes) followed by the
    fixed bytes `tail`. launch(stream, *values) packs the values into this launch's buffer for the
    calling thread and launches as launch() does, with less host time for a repeated stream: the
    launch configuration of the latest stream it ran on is kept with it."""

    __slots__ = ("function", "grid", "block", "device_index", "shared_bytes", "_context", "_last", "_pack",
                 "_size", "_tail", "_buffers")

    def __init__(self, function: cu.CUfunction, grid: int, block: int, device_index: int, head: struct.Struct,
                 tail: bytes = b"", shared_bytes: int = 0) -> None:
        self.function = function
        self.grid = grid
        self.block = block
        self.device_index = device_index
        self.shared_bytes = shared_bytes
        self._context = _primary_context(device_index)
        self._last: tuple = (None, None)  # (stream, config), replaced as one object: threads may share it
        self._pack = head.pack_into
        self._size = head.size + len(tail)
        self._tail = tail
        # cuLaunchKernelEx copies the parameters before it returns but runs without the GIL, so each
        # thread packs into a buffer of its own; the tail is copied in once, when the buffer is made.
        self._buffers = threading.local()

    def parameters(self) -> tuple[ctypes.Array, int]:
        """The calling thread's parameter buffer of this launch, and the address cuLaunchKernelEx takes
        (of a one-entry pointer array holding the buffer's address)."""
        buffers = self._buffers
        try:
            return buffers.params
        except AttributeError:
            buffer = ctypes.create_string_buffer(self._size)
            buffer[self._size - len(self._tail):] = self._tail
            pointers = (ctypes.c_void_p * 1)(ctypes.addressof(buffer))
            buffers.keep = pointers
            buffers.params = (buffer, ctypes.addressof(pointers))
            return buffers.params

    def __call__(self, stream: int, *values) -> None:
        try:
            buffer, params = self._buffers.params
        except AttributeError:
            buffer, params = self.parameters()
        self._pack(buffer, 0, *values)
        last_stream, config = self._last
        # A kernel on the NULL stream runs in the thread's current context: it must be the device's.
        if stream == last_stream and programmatic_launch and (
            stream != _NULL_STREAM or _current_context() == self._context
        ):
            (result,) = cu.cuLaunchKernelEx(config, self.function, params, 0)
            if result != _SUCCESS:
                check(result, "cuLaunchKernelEx")
            return
        launch(self.function, self.grid, self.block, stream, self.device_index, params, self.shared_bytes)
        if programmatic_launch:
            self._last = (stream, _launch_config(self.grid, self.block, stream, self.shared_bytes))


def launch(function: cu.CUfunction, grid: int, block: int, stream: int, device_index: int, params: int,
           shared_bytes: int = 0) -> None:
    """Launch function with a 1-D grid and shared_bytes of dynamic shared memory on the given stream
    handle of device_index; params is the address of a one-entry array holding the address of the
    packed parameter struct (see Launch.parameters)."""
    pushed = stream == _NULL_STREAM and _make_current(device_index)
    try:
        if programmatic_launch:
            (result,) = cu.cuLaunchKernelEx(_launch_config(grid, block, stream, shared_bytes), function, params, 0)
            if result != _SUCCESS:
                check(result, "cuLaunchKernelEx")
        else:
            (result,) = cu.cuLaunchKernel(function, grid, 1, 1, block, 1, 1, shared_bytes, stream, params, 0)
            if result != _SUCCESS:
                check(result, "cuLaunchKernel")
    finally:
        if pushed:
            _pop_current()
