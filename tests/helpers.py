"""Run gated_delta_rule_mtp against the float64 reference and check everything it may and may not write."""

from __future__ import annotations

import torch

from gdn_nvrtc import gated_delta_rule_mtp
from gdn_nvrtc.reference import (
    OUTPUT_REL_TOL,
    STATE_REL_TOL,
    gated_delta_rule_mtp_reference,
    output_row_allowed_error,
)


def rel_error(x: torch.Tensor, ref: torch.Tensor, dims=None) -> torch.Tensor:
    x, ref = x.double(), ref.double()
    norm = torch.linalg.vector_norm
    return norm(x - ref, dim=dims) / norm(ref, dim=dims).clamp_min(1e-30)


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equality, so NaN poison compares equal to itself."""
    return x.shape == y.shape and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def written_slots(inputs: dict, kwargs: dict) -> set[int]:
    """Pool slots the call must write, from the semantics alone."""
    pool_size = inputs["initial_state"].shape[0]
    read = inputs["initial_state_indices"].tolist()
    slots: set[int] = set()
    if kwargs.get("disable_state_update") is not False:
        return slots
    scatter = kwargs.get("ssm_state_indices")
    write = kwargs.get("output_state_indices")
    for row, slot in enumerate(read):
        if not 0 <= slot < pool_size:
            continue
        if scatter is not None:
            slots.update(s for s in scatter[row].tolist() if 0 <= s < pool_size)
        else:
            target = slot if write is None else int(write[row])
            if 0 <= target < pool_size:
                slots.add(target)
    return slots


def check_call(inputs: dict, *, call=gated_delta_rule_mtp, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the kernel (through `call`, which takes gated_delta_rule_mtp's arguments), compare with
    the reference; return (output, pool)."""
    pool = inputs["initial_state"]
    pool_size = pool.shape[0]
    B, T = inputs["q"].shape[:2]
    output = kwargs.get("output")
    buffer = kwargs.get("intermediate_states_buffer")
    pool_before = pool.clone()
    output_before = None if output is None else output.clone()
    buffer_before = None if buffer is None else buffer.clone()
    reference = gated_delta_rule_mtp_reference(**inputs, **kwargs, return_magnitude=True)
    ref_out, ref_pool, ref_buf, ref_magnitude = reference

    out, returned_pool = call(**inputs, **kwargs)
    torch.cuda.synchronize()
    assert returned_pool is pool
    if output is not None:
        assert out is output

    read = inputs["initial_state_indices"].long()
    valid = (read >= 0) & (read < pool_size)
    padded = ~valid
    if valid.any():
        got, ref = out[valid], ref_out[valid]
        assert torch.isfinite(got).all(), "output has non-finite values in a valid row"
        assert rel_error(got, ref) < OUTPUT_REL_TOL
        row_error = (got.double() - ref).norm(dim=-1)
        allowed = output_row_allowed_error(ref, ref_magnitude[valid], got.dtype)
        assert (row_error <= allowed).all(), f"worst row error {(row_error / ref.norm(dim=-1)).max():.3g}"
    if padded.any():
        if output_before is None:
            assert (out[padded] == 0).all(), "padded rows of an allocated output must be zero"
        else:
            assert same_bits(out[padded], output_before[padded]), "padded output rows were written"

    slots = written_slots(inputs, kwargs)
    for slot in range(pool_size):
        if slot in slots:
            assert torch.isfinite(pool[slot]).all()
            assert rel_error(pool[slot], ref_pool[slot]) < STATE_REL_TOL, f"pool slot {slot}"
        else:
            assert same_bits(pool[slot], pool_before[slot]), f"pool slot {slot} must not be touched"

    if buffer is not None:
        for row in range(buffer.shape[0]):
            if row < B and valid[row]:
                assert torch.isfinite(buffer[row, :T]).all()
                errors = rel_error(buffer[row, :T], ref_buf[row, :T], dims=(1, 2, 3))
                assert errors.max() < STATE_REL_TOL, f"buffer row {row}: {errors.tolist()}"
                assert same_bits(buffer[row, T:], buffer_before[row, T:]), f"buffer row {row} steps >= T written"
            else:
                assert same_bits(buffer[row], buffer_before[row]), f"buffer row {row} must not be touched"
    return out, pool
