"""Every validation error: raised before anything runs, naming the argument, what was expected and what was given."""

import pytest
import torch

import gdn_nvrtc.mtp as mtp
from gdn_nvrtc import gated_delta_rule_mtp
from gdn_nvrtc.reference import make_inputs

B, T, H, HV, K, V = 3, 4, 2, 4, 128, 128


def valid_call() -> dict:
    inputs = make_inputs(B, T, H, HV, K, V, device="cpu", pool_size=8, generator=torch.Generator().manual_seed(0))
    inputs["disable_state_update"] = False
    return inputs


def misaligned_pool():
    storage = torch.randn(8 * HV * V * K + 1)
    return storage[1:].view(8, HV, V, K)


def strided_k_pool():
    return torch.randn(8, HV, V, 2 * K)[..., ::2]


CASES = [
    ("q", lambda c: c["q"].float().tolist(), TypeError, "q must be a torch.Tensor, got list"),
    ("q", lambda c: c["q"].float(), TypeError, "q must have dtype bfloat16 or float16, got float32"),
    ("q", lambda c: c["q"][0], ValueError, "q must have 4 dimensions, got shape [4, 2, 128]"),
    ("q", lambda c: torch.randn(B, T, H, 96).bfloat16(), ValueError, "K must be one of (64, 128, 256), got 96"),
    ("q", lambda c: torch.randn(B, 17, H, K).bfloat16(), ValueError, "T must be in 1..16, got 17"),
    ("k", lambda c: c["k"].half(), TypeError, "k must have dtype bfloat16, got float16"),
    ("k", lambda c: c["k"][:, :2], ValueError, "k must have shape [B, T, H, K] (as q) = [3, 4, 2, 128], got [3, 2, 2, 128]"),
    ("v", lambda c: c["v"][:2], ValueError, "v must have shape [B, T, HV, V] with B, T from q = [3, 4, 4, 128], got [2, 4, 4, 128]"),
    ("v", lambda c: c["v"][..., :96], ValueError, "V must be one of (64, 128, 256), got 96"),
    ("v", lambda c: torch.randn(B, T, 3, V).bfloat16(), ValueError, "HV (v.shape[2] = 3) must be a multiple of the q/k heads H = 2"),
    ("a", lambda c: c["a"].double(), TypeError, "a must have dtype bfloat16 or float32, got float64"),
    ("b", lambda c: c["b"][:, :, :2], ValueError, "b must have shape [B, T, HV] = [3, 4, 4], got [3, 4, 2]"),
    ("A_log", lambda c: c["A_log"].bfloat16(), TypeError, "A_log must have dtype float32, got bfloat16"),
    ("A_log", lambda c: c["A_log"][:2], ValueError, "A_log must have shape [HV] = [4], got [2]"),
    ("dt_bias", lambda c: c["dt_bias"].double(), TypeError, "dt_bias must have dtype float32 or bfloat16 or float16"),
    ("initial_state", lambda c: c["initial_state"].bfloat16(), TypeError, "initial_state must have dtype float32, got bfloat16"),
    ("initial_state", lambda c: c["initial_state"][:, :2], ValueError, "initial_state must have shape [pool_size, HV, V, K] = [8, 4, 128, 128], got [8, 2, 128, 128]"),
    ("initial_state", lambda c: strided_k_pool(), ValueError, "initial_state must have stride 1 along K"),
    ("initial_state", lambda c: misaligned_pool(), ValueError, "initial_state must be 16-byte aligned"),
    ("initial_state_indices", lambda c: c["initial_state_indices"].float(), TypeError, "initial_state_indices must have dtype int32 or int64, got float32"),
    ("initial_state_indices", lambda c: torch.zeros(B + 1, dtype=torch.int32), ValueError, "initial_state_indices must have shape [B] = [3], got [4]"),
    ("output_state_indices", lambda c: torch.zeros(B, dtype=torch.int16), TypeError, "output_state_indices must have dtype int32 or int64, got int16"),
    ("intermediate_states_buffer", lambda c: torch.zeros(B, T - 1, HV, V, K), ValueError, "intermediate_states_buffer must have shape [>=B, >=T, HV, V, K] = [>=3, >=4, 4, 128, 128], got [3, 3, 4, 128, 128]"),
    ("intermediate_states_buffer", lambda c: torch.zeros(T, B, HV, V, K).transpose(0, 1), ValueError, "intermediate_states_buffer must be contiguous"),
    ("intermediate_states_buffer", lambda c: torch.zeros(B, T, HV, V, K, dtype=torch.bfloat16), TypeError, "intermediate_states_buffer must have dtype float32, got bfloat16"),
    ("ssm_state_indices", lambda c: torch.zeros(B, T - 1, dtype=torch.int32), ValueError, "ssm_state_indices must have shape [B, T] = [3, 4], got [3, 3]"),
    ("output", lambda c: torch.zeros(B, T, HV, V, dtype=torch.float16), TypeError, "output must have dtype bfloat16, got float16"),
    ("output", lambda c: torch.zeros(B, T, HV, V + 1, dtype=torch.bfloat16), ValueError, "output must have shape [B, T, HV, V] = [3, 4, 4, 128], got [3, 4, 4, 129]"),
    ("initial_state", lambda c: c["initial_state"][:1].expand(8, -1, -1, -1), ValueError, "initial_state is written (disable_state_update=False): no two of its elements may share memory"),
    ("initial_state", lambda c: torch.randn(8, HV, V, K).as_strided((8, HV, V, K), (HV * V * K, K, K, 1)), ValueError, "got shape [8, 4, 128, 128] and strides [65536, 128, 128, 1]"),
    ("output", lambda c: torch.zeros(1, T, HV, V, dtype=torch.bfloat16).expand(B, -1, -1, -1), ValueError, "output is written: no two of its elements may share memory"),
    ("output", lambda c: torch.zeros(B, T, V, dtype=torch.bfloat16)[:, :, None].expand(-1, -1, HV, -1), ValueError, "got shape [3, 4, 4, 128] and strides [512, 128, 0, 1]"),
    ("q", lambda c: torch.randn(B, T, H, 2 * K).bfloat16()[..., ::2], ValueError, "q must have stride 1 along its last axis"),
    ("output", lambda c: torch.zeros(B, T, HV, 2 * V, dtype=torch.bfloat16)[..., ::2], ValueError, "output must have stride 1 along its last axis"),
    ("scale", lambda c: "0.1", TypeError, "scale must be a finite float or None, got '0.1'"),
    ("scale", lambda c: float("nan"), TypeError, "scale must be a finite float or None, got nan"),
    ("scale", lambda c: True, TypeError, "scale must be a finite float or None, got True"),
    ("disable_state_update", lambda c: "yes", TypeError, "disable_state_update must be True, False or None, got 'yes'"),
    ("use_qk_l2norm", lambda c: 1, TypeError, "use_qk_l2norm must be True or False, got 1"),
    ("k", lambda c: c["k"].to("meta"), ValueError, "k is on meta but q is on cpu; all tensors must be on one device"),
    ("q", lambda c: c["q"], ValueError, "the tensors must be on a CUDA device, got cpu"),
]


def snapshot(call: dict) -> dict:
    return {name: x.clone() for name, x in call.items() if isinstance(x, torch.Tensor) and x.device.type != "meta"}


@pytest.mark.parametrize("name,make,error,message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_invalid_argument(name, make, error, message):
    call = valid_call()
    call[name] = make(call)
    before = snapshot(call)
    with pytest.raises(error) as raised:
        gated_delta_rule_mtp(**call)
    assert message in str(raised.value)
    for key, tensor in before.items():
        assert torch.equal(call[key], tensor), f"{key} changed by a failed call"


def test_buffer_and_scatter_are_exclusive():
    call = valid_call()
    call["intermediate_states_buffer"] = torch.zeros(B, T, HV, V, K)
    call["ssm_state_indices"] = torch.zeros(B, T, dtype=torch.int32)
    with pytest.raises(ValueError, match="mutually exclusive"):
        gated_delta_rule_mtp(**call)


@pytest.mark.parametrize("disable", [None, True])
def test_scatter_needs_state_update(disable):
    call = valid_call()
    call["ssm_state_indices"] = torch.zeros(B, T, dtype=torch.int32)
    call["disable_state_update"] = disable
    with pytest.raises(ValueError, match=f"needs disable_state_update=False, got disable_state_update={disable}"):
        gated_delta_rule_mtp(**call)


def test_non_hopper_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA A100")
    mtp._check_device.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"needs a Hopper GPU.*cuda:0 \(NVIDIA A100\) has compute capability 8.0"):
            mtp._check_device(0)
    finally:
        mtp._check_device.cache_clear()
