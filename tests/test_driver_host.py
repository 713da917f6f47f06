"""Host-side pieces of the driver layer and of a call's plan (no GPU needed)."""

import ctypes
import struct
import threading

import pytest

from gdn_nvrtc import driver


def test_launch_configs_are_cached_per_grid_block_stream_and_shared_memory():
    config = driver._launch_config(1000, 128, 0)
    assert driver._launch_config(1000, 128, 0) is config and driver._launch_config(1000, 128, 0, 0) is config
    assert (config.gridDimX, config.blockDimX, int(config.hStream), config.sharedMemBytes) == (1000, 128, 0, 0)
    assert (config.gridDimY, config.gridDimZ, config.blockDimY, config.blockDimZ) == (1, 1, 1, 1)
    assert config.numAttrs == 1 and config.attrs[0].value.programmaticStreamSerializationAllowed == 1
    for other in ((1001, 128, 0, 0), (1000, 64, 0, 0), (1000, 128, 12345, 0), (1000, 128, 0, 2305)):
        changed = driver._launch_config(*other)
        assert changed is not config
        assert (changed.gridDimX, changed.blockDimX, int(changed.hStream), changed.sharedMemBytes) == other


def test_a_launch_packs_its_values_before_its_fixed_tail_in_a_buffer_per_thread(monkeypatch):
    monkeypatch.setattr(driver, "_primary_context", lambda index: 1234)
    launched = []

    def fake_launch(function, grid, block, stream, device_index, params, shared_bytes):  # a stream's first launch
        pointer = ctypes.c_void_p.from_address(params).value
        launched.append((grid, block, stream, device_index, shared_bytes, ctypes.string_at(pointer, 40)))

    monkeypatch.setattr(driver, "launch", fake_launch)
    monkeypatch.setattr(driver, "programmatic_launch", False)  # every launch takes driver.launch
    head = struct.Struct("<Qq")
    tail = bytes(range(24))
    launch = driver.Launch(None, 96, 128, 0, head, tail, shared_bytes=2305)
    launch(7, 2**64 - 1, -5)
    launch(8, 3, 4)
    assert launched == [
        (96, 128, 7, 0, 2305, head.pack(2**64 - 1, -5) + tail),
        (96, 128, 8, 0, 2305, head.pack(3, 4) + tail),
    ]
    buffer, address = launch.parameters()
    assert launch.parameters() == (buffer, address) and len(buffer) == 40
    assert ctypes.c_void_p.from_address(address).value == ctypes.addressof(buffer)
    other = driver.Launch(None, 1, 32, 0, head)  # another launch: its own buffer, no tail
    assert len(other.parameters()[0]) == head.size and other.parameters()[0] is not buffer

    # Another thread gets a buffer of its own, with the tail already in place.
    seen = []
    thread = threading.Thread(target=lambda: seen.append(launch.parameters()))
    thread.start()
    thread.join()
    (theirs, their_address), = seen
    assert theirs is not buffer and their_address != address and theirs.raw[16:] == tail


def test_plan_fixed_values_are_the_packed_parameters_by_name():
    from gdn_nvrtc import mtp
    from gdn_nvrtc.specs import PARAM_FIELDS

    names = [name for name, _ in PARAM_FIELDS[mtp._POINTER_FIELDS:]]
    values = [0.5 if name == "scale" else 1000 + i for i, name in enumerate(names)]
    plan = mtp._Plan(launch=None, device=None, device_index=0, grid=0, block=0, pool_size=0, out_shape=(),
                     warn_default_update=False, fixed_params=mtp._FIXED.pack(*values))
    assert plan.fixed_values() == dict(zip(names, values, strict=True))


class _FakeOccupancy:
    """The driver calls of driver.shared_bytes_for_at_most, on a made-up SM: `capacity` bytes of shared memory,
    `reserved` more per block, `static` bytes per block of the kernel, and at most `by_registers` blocks;
    `room_error` bytes added to what cuOccupancyAvailableDynamicSMemPerBlock answers."""

    def __init__(self, monkeypatch, static=55072, by_registers=4, capacity=233472, reserved=1024, room_error=0):
        self.static, self.by_registers, self.capacity, self.reserved = static, by_registers, capacity, reserved
        self.limit_set = []
        cu = driver.cu
        success = cu.CUresult.CUDA_SUCCESS
        monkeypatch.setattr(driver, "_make_current", lambda index: False)
        monkeypatch.setattr(driver, "blocks_per_sm", lambda function, block, index, shared=0: self.blocks(shared))
        monkeypatch.setattr(cu, "cuDeviceGetAttribute", lambda attribute, device: (success, 232448))
        monkeypatch.setattr(cu, "cuKernelGetAttribute", lambda attribute, kernel, device: (success, self.static))
        monkeypatch.setattr(cu, "cuKernelSetAttribute",
                            lambda attribute, value, kernel, device: self.limit_set.append(value) or (success,))
        monkeypatch.setattr(cu, "cuOccupancyAvailableDynamicSMemPerBlock",
                            lambda function, blocks, block: (success, self.room(blocks) + room_error))

    def blocks(self, shared: int) -> int:
        per_block = -(-(self.static + shared) // 128) * 128 + self.reserved  # 128-byte allocation units
        return min(self.by_registers, self.capacity // per_block)

    def room(self, blocks: int) -> int:
        return self.capacity // blocks - self.reserved - self.static


def test_shared_bytes_for_at_most_pads_only_where_more_blocks_fit(monkeypatch):
    fake = _FakeOccupancy(monkeypatch)
    driver._paddings.clear()
    assert driver.shared_bytes_for_at_most(driver.cu.CUfunction(11), 128, 0, 4) == 0  # 4 fit: no padding
    padding = driver.shared_bytes_for_at_most(driver.cu.CUfunction(11), 128, 0, 3)
    assert fake.blocks(padding) == 3 and fake.blocks(padding - 128) == 4  # the least padding, to a unit
    assert fake.limit_set == [232448 - 55072]  # the limit raised before the query
    fake.static = 0  # cached per (kernel, block, device, count): not asked again
    assert driver.shared_bytes_for_at_most(driver.cu.CUfunction(11), 128, 0, 3) == padding
    fake.by_registers = 3
    assert driver.shared_bytes_for_at_most(driver.cu.CUfunction(12), 128, 0, 3) == 0  # registers hold it at 3
    driver._paddings.clear()


def test_shared_bytes_for_at_most_steps_past_a_short_answer_and_raises_when_nothing_fits(monkeypatch):
    fake = _FakeOccupancy(monkeypatch, room_error=-1000)  # the query answers 1000 B too little
    driver._paddings.clear()
    padding = driver.shared_bytes_for_at_most(driver.cu.CUfunction(21), 128, 0, 3)
    assert fake.blocks(padding) == 3
    with pytest.raises(driver.CudaError, match="not 1 to 0"):  # 0 blocks per SM: no padding gives that
        driver.shared_bytes_for_at_most(driver.cu.CUfunction(21), 128, 0, 0)
    _FakeOccupancy(monkeypatch, static=200000, by_registers=1, room_error=0)
    assert driver.shared_bytes_for_at_most(driver.cu.CUfunction(22), 128, 0, 1) == 0
    driver._paddings.clear()
