"""Host-side pieces of the driver layer and of a call's plan (no GPU needed)."""

import ctypes
import struct
import threading

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
