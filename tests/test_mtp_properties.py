"""Property-based checks of the validation layer: any single invalid change to a valid call raises a
TypeError or ValueError that names an argument, before anything runs, and leaves every tensor as it was."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdn_nvrtc import gated_delta_rule_mtp
from gdn_nvrtc.reference import make_inputs
from gdn_nvrtc.specs import MAX_TOKENS, SUPPORTED_HEAD_DIMS

TENSOR_ARGS = ("q", "k", "v", "initial_state", "initial_state_indices", "A_log", "a", "dt_bias", "b",
               "output", "intermediate_states_buffer", "ssm_state_indices", "output_state_indices")
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
              torch.uint8, torch.bool)
ALLOWED_DTYPES = {
    "q": {torch.bfloat16, torch.float16}, "k": "q", "v": "q", "output": "q",
    "a": "q+fp32", "b": "q+fp32", "A_log": {torch.float32}, "dt_bias": {torch.float32, torch.bfloat16, torch.float16},
    "initial_state": {torch.float32}, "intermediate_states_buffer": {torch.float32},
    "initial_state_indices": {torch.int32, torch.int64}, "output_state_indices": {torch.int32, torch.int64},
    "ssm_state_indices": {torch.int32, torch.int64},
}


@st.composite
def valid_calls(draw):
    B = draw(st.integers(0, 3))
    T = draw(st.integers(1, MAX_TOKENS))
    H = draw(st.sampled_from([1, 2]))
    HV = H * draw(st.sampled_from([1, 2]))
    K = draw(st.sampled_from(SUPPORTED_HEAD_DIMS[:2]))
    V = draw(st.sampled_from(SUPPORTED_HEAD_DIMS[:2]))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    call = make_inputs(B, T, H, HV, K, V, dtype=dtype, device="cpu", pool_size=2 * B + 2,
                       generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    call["output"] = torch.zeros(B, T, HV, V, dtype=dtype)
    mode = draw(st.sampled_from(["update", "buffer", "scatter"]))
    call["disable_state_update"] = mode == "buffer"
    if mode == "buffer":
        call["intermediate_states_buffer"] = torch.zeros(B, T, HV, V, K)
    elif mode == "scatter":
        call["ssm_state_indices"] = torch.zeros(B, T, dtype=torch.int32)
    else:
        call["output_state_indices"] = torch.zeros(B, dtype=torch.int64)
    return call


def allowed(name: str, call: dict) -> set:
    rule = ALLOWED_DTYPES[name]
    if rule == "q":
        return {call["q"].dtype}
    if rule == "q+fp32":
        return {call["q"].dtype, torch.float32}
    return rule


def snapshot(call: dict) -> dict:
    return {name: x.clone() for name, x in call.items() if isinstance(x, torch.Tensor)}


def assert_rejected(call: dict, error_types=(TypeError, ValueError)) -> str:
    before = snapshot(call)
    with pytest.raises(error_types) as raised:
        gated_delta_rule_mtp(**call)
    message = str(raised.value)
    assert any(name in message for name in TENSOR_ARGS + ("scale", "disable_state_update", "use_qk_l2norm")), message
    for name, tensor in before.items():
        assert torch.equal(call[name], tensor), f"{name} changed by a rejected call"
    return message


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(valid_calls(), st.data())
def test_a_wrong_dtype_is_named(call, data):
    names = [n for n in TENSOR_ARGS if call.get(n) is not None]
    name = data.draw(st.sampled_from(names))
    dtype = data.draw(st.sampled_from([d for d in ALL_DTYPES if d not in allowed(name, call)]))
    call[name] = call[name].to(dtype)
    message = assert_rejected(call)
    if name != "q":  # a new q dtype makes k, v, ... the wrong ones instead
        assert message.startswith(f"{name} must have dtype"), message


@SETTINGS
@given(valid_calls(), st.data())
def test_a_wrong_shape_is_rejected(call, data):
    names = [n for n in TENSOR_ARGS if call.get(n) is not None]
    name = data.draw(st.sampled_from(names))
    x = call[name]
    if data.draw(st.booleans()) or x.dim() == 0:
        call[name] = x.unsqueeze(0)  # one dimension too many
    else:
        dim = data.draw(st.integers(0, x.dim() - 1))
        sizes = list(x.shape)
        if name == "intermediate_states_buffer" and dim < 2:
            sizes[dim] -= 1  # more rows or steps than needed is allowed; fewer is not
            if sizes[dim] < 0:
                return
        elif name == "initial_state" and dim == 0:
            return  # the pool size is free
        else:
            sizes[dim] += data.draw(st.sampled_from([1, 3]))
        call[name] = torch.zeros(sizes, dtype=x.dtype)
    assert_rejected(call)


@SETTINGS
@given(valid_calls(), st.sampled_from(["q", "k", "v", "a", "b", "output", "initial_state"]))
def test_a_strided_last_axis_is_rejected(call, name):
    x = call[name]
    if x.shape[-1] < 2:
        return
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    call[name] = wide[..., ::2]
    assert name in assert_rejected(call)


@SETTINGS
@given(valid_calls(), st.sampled_from(["1", float("inf"), -float("nan"), [0.5], True]))
def test_a_bad_scale_is_rejected(call, scale):
    call["scale"] = scale
    assert "scale" in assert_rejected(call)


@SETTINGS
@given(valid_calls())
def test_buffer_with_scatter_is_rejected(call):
    B, T, _, K = call["q"].shape
    _, HV, V, _ = call["initial_state"].shape
    call["intermediate_states_buffer"] = torch.zeros(B, T, HV, V, K)
    call["ssm_state_indices"] = torch.zeros(B, T, dtype=torch.int32)
    call["disable_state_update"] = False
    call.pop("output_state_indices", None)
    assert "mutually exclusive" in assert_rejected(call)
