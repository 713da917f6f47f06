"""Host-side pieces of the driver layer and of a call's plan (no GPU needed)."""

import threading

from gdn_nvrtc import driver


def test_launch_configs_are_cached_per_grid_block_and_stream():
    config = driver._launch_config(1000, 128, 0)
    assert driver._launch_config(1000, 128, 0) is config
    assert (config.gridDimX, config.blockDimX, int(config.hStream)) == (1000, 128, 0)
    assert (config.gridDimY, config.gridDimZ, config.blockDimY, config.blockDimZ) == (1, 1, 1, 1)
    assert config.numAttrs == 1 and config.attrs[0].value.programmaticStreamSerializationAllowed == 1
    for other in ((1001, 128, 0), (1000, 64, 0), (1000, 128, 12345)):
        changed = driver._launch_config(*other)
        assert changed is not config
        assert (changed.gridDimX, changed.blockDimX, int(changed.hStream)) == other


def test_parameter_buffer_keeps_the_fixed_tail_until_another_one_comes():
    def run():
        size = 64
        fixed = bytes(range(40))
        buffer, address = driver.parameter_buffer(size, fixed)
        assert buffer.raw[24:] == fixed and address
        buffer[:24] = b"p" * 24  # what a call packs: its pointers
        again, _ = driver.parameter_buffer(size, fixed)
        assert again is buffer and again.raw == b"p" * 24 + fixed
        buffer[30] = 0xFF  # not done by callers: shows the same tail object is not copied again
        assert driver.parameter_buffer(size, fixed)[0].raw[30] == 0xFF
        equal_copy = bytes(bytearray(fixed))  # an equal tail of another plan is copied in
        assert driver.parameter_buffer(size, equal_copy)[0].raw[24:] == fixed
        other = bytes(range(100, 140))
        assert driver.parameter_buffer(size, other)[0].raw == b"p" * 24 + other
        bigger, _ = driver.parameter_buffer(size + 8, other)  # another size: a new buffer, tail copied
        assert bigger.raw[32:] == other

    # The buffer is per thread: run in a fresh one so the test does not depend on the order of tests.
    outcome = []

    def in_thread():
        try:
            run()
            outcome.append("passed")
        except Exception as error:  # reported by the assert below
            outcome.append(error)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert outcome == ["passed"], outcome


def test_plan_fixed_values_are_the_packed_parameters_by_name():
    from gdn_nvrtc import mtp
    from gdn_nvrtc.specs import PARAM_FIELDS

    names = [name for name, _ in PARAM_FIELDS[mtp._POINTER_FIELDS:]]
    values = [0.5 if name == "scale" else 1000 + i for i, name in enumerate(names)]
    plan = mtp._Plan(launch=None, device=None, device_index=0, grid=0, block=0, pool_size=0, out_shape=(),
                     warn_default_update=False, fixed_params=mtp._FIXED.pack(*values))
    assert plan.fixed_values() == dict(zip(names, values, strict=True))
