"""The float64 reference the tests trust: SPEC.md's math and argument semantics in plain torch.

It never modifies its arguments. It returns float64 copies of what the kernel writes:
(output, state pool, intermediate-states buffer or None), and on request each output row's magnitude
(see output_row_allowed_error).
"""

from __future__ import annotations

import math

import torch

# Accuracy the kernel must reach against this reference (tests and the demo read these).
OUTPUT_REL_TOL = 1e-2  # ||out - ref|| / ||ref|| over the whole output
OUTPUT_ROW_REL_TOL = 2e-2  # the same for the worst (b, t, hv) row, plus the two terms below
OUTPUT_ROW_ROUNDING_ULPS = 2  # float32 ulps of a row's magnitude that a row may also be off by
STATE_REL_TOL = 1e-5  # the same for every state written, per pool slot or buffer entry


def output_row_error_floor(dtype: torch.dtype, V: int) -> float:
    """Absolute error a row of V outputs may carry from rounding into dtype's subnormal range
    (fp16 spaces its subnormals 6e-8 apart: a row of tiny outputs cannot be more exact)."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps * V**0.5


def output_row_allowed_error(ref: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The error norm each output row (last dimension) may carry against the reference `ref`.

    Three parts: OUTPUT_ROW_REL_TOL of the row's own norm; the output dtype's subnormal spacing
    (output_row_error_floor); and OUTPUT_ROW_ROUNDING_ULPS float32 ulps of the row's magnitude, the
    row computed from the absolute value of every term (the reference's `return_magnitude`). The last
    part matters only for rows that are nearly zero because their terms cancel, e.g. q.k ~ 1e-7 after a
    decay of 1e-10: float32 arithmetic cannot give such a row to 2% of itself (this reference evaluated
    in float32 misses one by 5%). On a median row it adds about 3e-6 of the row's norm to the 2%.
    """
    allowed = OUTPUT_ROW_REL_TOL * ref.norm(dim=-1) + output_row_error_floor(dtype, ref.shape[-1])
    return allowed + OUTPUT_ROW_ROUNDING_ULPS * torch.finfo(torch.float32).eps * magnitude.norm(dim=-1)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 20, x, torch.log1p(torch.exp(torch.clamp(x, max=20))))


def _l2normalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def gated_delta_rule_mtp_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor,
    initial_state_indices: torch.Tensor,
    A_log: torch.Tensor,
    a: torch.Tensor,
    dt_bias: torch.Tensor,
    b: torch.Tensor,
    scale: float | None = None,
    output: torch.Tensor | None = None,
    intermediate_states_buffer: torch.Tensor | None = None,
    ssm_state_indices: torch.Tensor | None = None,
    disable_state_update: bool | None = None,
    use_qk_l2norm: bool = True,
    output_state_indices: torch.Tensor | None = None,
    *,
    precision: torch.dtype = torch.float64,
    return_magnitude: bool = False,
) -> tuple[torch.Tensor, ...]:
    """SPEC.md's gated_delta_rule_mtp, computed in `precision` (float64; float32 shows what rounding
    alone does). With return_magnitude, a fourth tensor shaped like the output: each output computed
    from the absolute values of its terms, |decayed state| |q| + |u| (|k|.|q|)."""
    f64 = precision
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    pool_size = initial_state.shape[0]
    scale = 1.0 / math.sqrt(K) if scale is None else scale
    update = disable_state_update is False

    heads = torch.arange(HV, device=q.device) // (HV // H)  # value head -> q/k head
    qf = q.to(f64)[:, :, heads]  # [B, T, HV, K]
    kf = k.to(f64)[:, :, heads]
    if use_qk_l2norm:
        qf, kf = _l2normalise(qf), _l2normalise(kf)
    qf = qf * scale
    alpha = torch.exp(-torch.exp(A_log.to(f64)) * _softplus(a.to(f64) + dt_bias.to(f64)))  # [B, T, HV]
    beta = torch.sigmoid(b.to(f64))
    vf = v.to(f64)

    out = (torch.zeros((B, T, HV, V), dtype=f64, device=q.device) if output is None else output.to(f64)).clone()
    pool = initial_state.to(f64).clone()
    source = pool.clone()  # reads see the pool as it was before the call
    buffer = None if intermediate_states_buffer is None else intermediate_states_buffer.to(f64).clone()
    magnitude = torch.zeros((B, T, HV, V), dtype=f64, device=q.device) if return_magnitude else None

    def valid(slot: int) -> bool:
        return 0 <= slot < pool_size

    for row in range(B):
        read = int(initial_state_indices[row])
        if not valid(read):
            continue
        state = source[read].clone()  # [HV, V, K]
        for t in range(T):
            state = alpha[row, t, :, None, None] * state
            u = beta[row, t, :, None] * (vf[row, t] - torch.einsum("hvk,hk->hv", state, kf[row, t]))
            if magnitude is not None:
                kq = (kf[row, t].abs() * qf[row, t].abs()).sum(-1)  # [HV]
                magnitude[row, t] = torch.einsum("hvk,hk->hv", state.abs(), qf[row, t].abs()) + u.abs() * kq[:, None]
            state = state + u[:, :, None] * kf[row, t, :, None, :]
            out[row, t] = torch.einsum("hvk,hk->hv", state, qf[row, t])
            if buffer is not None:
                buffer[row, t] = state
            if ssm_state_indices is not None and valid(int(ssm_state_indices[row, t])):
                pool[int(ssm_state_indices[row, t])] = state
        if update and ssm_state_indices is None:
            write = read if output_state_indices is None else int(output_state_indices[row])
            if valid(write):
                pool[write] = state
    return (out, pool, buffer, magnitude) if return_magnitude else (out, pool, buffer)


def make_inputs(
    B: int,
    T: int,
    H: int,
    HV: int,
    K: int = 128,
    V: int = 128,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    pool_size: int | None = None,
    gate_dtype: torch.dtype | None = None,
    dt_bias_dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Fresh random arguments for gated_delta_rule_mtp; every row reads its own pool slot."""
    pool_size = 2 * B + 3 if pool_size is None else pool_size
    gate_dtype = dtype if gate_dtype is None else gate_dtype

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype=dtype, device=device)

    def rand(*shape):
        return torch.rand(shape, generator=generator, dtype=torch.float32).to(device=device)

    return {
        "q": randn(B, T, H, K, dtype=dtype),
        "k": randn(B, T, H, K, dtype=dtype),
        "v": randn(B, T, HV, V, dtype=dtype),
        "initial_state": randn(pool_size, HV, V, K) * 0.1,
        "initial_state_indices": torch.randperm(pool_size, generator=generator)[:B].to(torch.int32).to(device),
        "A_log": torch.log(1 + 15 * rand(HV)),
        "a": randn(B, T, HV, dtype=gate_dtype),
        "dt_bias": randn(HV, dtype=dt_bias_dtype),
        "b": randn(B, T, HV, dtype=gate_dtype),
    }
