import struct

import pytest

from gdn_nvrtc.specs import (
    MAX_TOKENS,
    PARAM_FIELDS,
    PARAM_STRUCT_FORMAT,
    PREBUILT_SPECS,
    SUPPORTED_HEAD_DIMS,
    KernelSpec,
)


def test_prebuilt_table():
    assert {(s.head_dim_k, s.head_dim_v, s.num_tokens, s.input_dtype, s.state_dtype) for s in PREBUILT_SPECS} == {
        (128, 128, t, dtype, "fp32") for t in range(1, 9) for dtype in ("bf16", "fp16")
    }
    assert len({s.name for s in PREBUILT_SPECS}) == len(PREBUILT_SPECS)


@pytest.mark.parametrize("K", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("V", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("T", [1, 8, MAX_TOKENS])
def test_name_round_trip_and_tiling(K, V, T):
    spec = KernelSpec(K, V, T, "fp16")
    assert KernelSpec.from_name(spec.name) == spec
    assert spec.rows_per_block * spec.tiles_per_head == V
    assert spec.rows_per_block * spec.lanes_per_row <= spec.threads_per_block * spec.rows_per_thread
    assert K % (spec.lanes_per_row * 4) == 0


@pytest.mark.parametrize(
    "args",
    [(96, 128, 4, "bf16"), (128, 32, 4, "bf16"), (128, 128, 0, "bf16"), (128, 128, MAX_TOKENS + 1, "bf16"),
     (128, 128, 4, "fp32"), (128, 128, 4, "bf16", "bf16")],
)
def test_unsupported_specs_are_rejected(args):
    with pytest.raises(ValueError):
        KernelSpec(*args)


def test_from_name_rejects_other_names():
    with pytest.raises(ValueError):
        KernelSpec.from_name("gdn_decode_k128")


def test_param_struct_is_all_8_byte_fields():
    assert struct.calcsize(PARAM_STRUCT_FORMAT) == 8 * len(PARAM_FIELDS)
    names = [name for name, _ in PARAM_FIELDS]
    assert len(names) == len(set(names))
    kinds = [kind for _, kind in PARAM_FIELDS]
    assert kinds == sorted(kinds, key=lambda kind: kind != "ptr"), "pointers must come first (mtp packs them per call)"
