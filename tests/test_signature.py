"""How a call finds its cached plan: a repeated signature is recognised by torch's C++ tensor check
(mtp._signature_check), anything else by the tuple of every tensor's metadata. A plan must never be
reused for tensors whose dtype, device, shape or strides differ from the ones it was made for."""

from __future__ import annotations

import pytest
import torch
from helpers import check_call

from gdn_nvrtc import mtp
from gdn_nvrtc.reference import make_inputs


def test_the_fast_check_is_available():
    """The supported torch versions have it; a torch without it still works (tuple key), but this
    test says so instead of letting the host time grow unnoticed."""
    assert mtp.fast_signature_check()


def test_the_check_compares_every_field_a_plan_depends_on():
    base = (torch.randn(4, 6), torch.zeros(3, dtype=torch.int32))
    check = mtp._signature_check(base)
    assert check.check(*base)
    assert check.check(torch.randn(4, 6), torch.ones(3, dtype=torch.int32))  # other storage, same metadata
    assert check.check(torch.randn(5, 6)[1:], base[1])  # a storage offset is not part of a plan
    refused = {
        "dtype": (torch.randn(4, 6, dtype=torch.float64), base[1]),
        "index dtype": (base[0], base[1].long()),
        "shape": (torch.randn(4, 7), base[1]),
        "strides": (torch.randn(6, 4).t(), base[1]),
        "padded rows": (torch.randn(4, 8)[:, :6], base[1]),
        "requires_grad": (torch.randn(4, 6, requires_grad=True), base[1]),
        "not a tensor": (base[0], None),
    }
    for what, tensors in refused.items():
        assert not check.check(*tensors), what
    # It refuses a tensor object that appears twice, so calls that pass one tensor twice use the
    # tuple key.
    assert not mtp._signature_check((base[0], base[0])).check(base[0], base[0])


@pytest.mark.gpu
def test_a_plan_is_reused_only_for_the_same_metadata():
    """Each call changes one tensor's dtype or strides (same shapes) from the call before; every call
    is checked against the reference, so a plan reused for the wrong layout fails."""
    generator = torch.Generator().manual_seed(11)
    B, T, H, HV = 4, 3, 4, 8
    base = make_inputs(B, T, H, HV, pool_size=12, generator=generator)
    packed = torch.randn(B, T, 3 * H, 128, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(12, 2, HV, 128, 128, device="cuda")
    cache[:, 0].copy_(base["initial_state"])
    variants = [
        {},
        {"q": packed[:, :, :H]},  # a view with other strides
        {"k": packed[:, :, H : 2 * H]},
        {"a": base["a"].float()},  # the gate dtype
        {"initial_state_indices": base["initial_state_indices"].long()},
        {"initial_state": cache[:, 0]},  # a strided pool
        {},
    ]
    mtp.forget_plans()
    for number, change in enumerate(variants):
        inputs = {**base, **change}
        if "q" in change:
            inputs["q"].copy_(base["q"])
        if "k" in change:
            inputs["k"].copy_(base["k"])
        check_call(inputs, disable_state_update=False)
        check_call(inputs, disable_state_update=False)  # the same signature again: the fast check
        if mtp.fast_signature_check():
            assert mtp._last_plan[-2] is not None, f"variant {number}: the repeated call did not use the check"
    assert len(mtp._plans) == len(variants) - 1


@pytest.mark.gpu
def test_one_tensor_passed_twice():
    """The same index tensor to read and to write the states (the fast check refuses repeats, so these
    calls take the tuple key): right results on every call."""
    generator = torch.Generator().manual_seed(12)
    inputs = make_inputs(3, 2, 4, 8, pool_size=6, generator=generator)
    for _ in range(3):
        check_call(inputs, disable_state_update=False, output_state_indices=inputs["initial_state_indices"])
    assert mtp._last_plan[-2] is None
    check_call(inputs, disable_state_update=False)  # and a call without the repeat uses the check again
    check_call(inputs, disable_state_update=False)
    if mtp.fast_signature_check():
        assert mtp._last_plan[-2] is not None


@pytest.mark.gpu
def test_calls_without_the_fast_check(monkeypatch):
    """A torch without the C++ check: every call takes the tuple key, with the same results."""
    monkeypatch.setattr(mtp, "_TensorGuards", None)
    mtp.forget_plans()
    generator = torch.Generator().manual_seed(13)
    inputs = make_inputs(3, 4, 4, 8, pool_size=8, generator=generator)
    for _ in range(2):
        check_call(inputs, disable_state_update=False)
        check_call(inputs, disable_state_update=True)
    assert not mtp.fast_signature_check() and mtp._last_plan[-2] is None
    assert len(mtp._plans) == 2
    mtp.forget_plans()


@pytest.mark.gpu
def test_a_repeated_signature_with_another_scale_or_flag():
    """The latest plan is recognised by the flags' identity and the scale's identity or value: every
    change of scale (another value, an equal value in a new object, an int, None) or of a flag between
    calls of one tensor signature still gives the reference's results."""
    generator = torch.Generator().manual_seed(14)
    inputs = make_inputs(3, 2, 4, 8, pool_size=6, generator=generator)
    inputs["q"] = (inputs["q"].float() / 4).to(inputs["q"].dtype)  # moderate q.k without the normalisation
    inputs["k"] = (inputs["k"].float() / 4).to(inputs["k"].dtype)
    mtp.forget_plans()
    third = float("0.3")
    for scale, l2norm in [(third, True), (float("0.3"), True), (0.5, True), (1, True), (None, True), (0.5, True),
                          (0.5, False), (0.5, True), (third, True)]:
        check_call(inputs, disable_state_update=False, scale=scale, use_qk_l2norm=l2norm)
        check_call(inputs, disable_state_update=False, scale=scale, use_qk_l2norm=l2norm)
        if mtp.fast_signature_check():
            last_scale = mtp._last_plan[0]
            assert (last_scale, type(last_scale), mtp._last_plan[2]) == (scale, type(scale), l2norm)
