"""gated_delta_rule_mtp: validation, dispatch to a kernel spec, launch.

For batch row b, token t and value head hv (q/k head h = hv // (HV // H)), in fp32:

    x     = a[b,t,hv] + dt_bias[hv]
    alpha = exp(-exp(A_log[hv]) * softplus(x))        softplus(x) = x for x > 20
    beta  = sigmoid(b[b,t,hv])
    q_t   = q[b,t,h] * rsqrt(sum(q^2) + 1e-6) * scale  (only * scale without l2norm)
    k_t   = k[b,t,h] * rsqrt(sum(k^2) + 1e-6)          (unchanged without l2norm)
    S     = alpha * S                                  S: [V, K], from pool[read slot]
    u     = beta * (v[b,t,hv] - S @ k_t)
    S     = S + outer(u, k_t)
    o[b,t,hv] = S @ q_t                                stored in q's dtype

The state after token t is what the intermediate buffer or the per-token scatter stores.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from dataclasses import dataclass
from functools import cache

import torch

from . import driver
from .specs import (
    FLAGS,
    MAX_TOKENS,
    PARAM_FIELDS,
    PARAM_STRUCT_FORMAT,
    SCALAR_DTYPE_CODES,
    SUPPORTED_HEAD_DIMS,
    blocks_per_sm_cap,
    choose_spec,
    prefetch_state,
    start_delay,
    start_delay_applies,
)

INPUT_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
STATE_DTYPES = {torch.float32: "fp32"}
INDEX_DTYPES = (torch.int32, torch.int64)
_SCALAR_DTYPES = {getattr(torch, name): code for name, code in SCALAR_DTYPE_CODES.items()}
_POINTER_FIELDS = sum(kind == "ptr" for _, kind in PARAM_FIELDS)  # they come first; the plan fixes the rest
_POINTERS = struct.Struct(PARAM_STRUCT_FORMAT[: 1 + _POINTER_FIELDS])  # packed per call
# The handle of a device's current stream (absent from CPU-only builds of torch, which never launch).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_FIXED = struct.Struct("<" + PARAM_STRUCT_FORMAT[1 + _POINTER_FIELDS :])  # packed once per plan
_MAX_GRID = 2**31 - 1
_MAX_PLANS = 4096

_check_indices = os.environ.get("GDN_NVRTC_CHECK_INDICES", "0") not in ("", "0")
_warned_default_update = False
start_delays = True  # specs.start_delay; benchmarks/tune.py turns it off for comparison


def set_index_checking(enabled: bool) -> None:
    """Opt-in checking of index values (also GDN_NVRTC_CHECK_INDICES=1).

    When on, every call copies a summary of the index tensors to the host and raises
    IndexError for an entry >= pool_size, naming the argument, the row and the value.
    That costs a host-device synchronisation per call and cannot run inside CUDA-graph
    capture. When off (the default), such rows are treated as padding on the GPU.
    """
    global _check_indices
    _check_indices = bool(enabled)


def index_checking() -> bool:
    return _check_indices


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _need_tensor(name: str, x, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {_dims(x.shape)}")
    return x


def _need_dtype(name: str, x: torch.Tensor, allowed) -> None:
    if x.dtype not in allowed:
        names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have dtype {names}, got {str(x.dtype).removeprefix('torch.')}")


def _need_shape(name: str, x: torch.Tensor, expected: tuple, meaning: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {meaning} = {_dims(expected)}, got {_dims(x.shape)}")


def _need_unit_last_stride(name: str, x: torch.Tensor) -> None:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 along its last axis, got strides {_dims(x.stride())}")


def _need_no_self_overlap(name: str, x: torch.Tensor, why: str) -> None:
    """Refuse a tensor the kernel writes whose elements can share memory (e.g. a stride-0 broadcast): taken
    from the smallest stride up, each axis must step past everything the smaller ones span."""
    span = 0  # how far past its first element the axes taken so far reach
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride(), strict=True) if sz > 1):
        if stride <= span:
            raise ValueError(
                f"{name} {why}: no two of its elements may share memory (each axis, from the smallest stride "
                f"up, must step past the ones before it), got shape {_dims(x.shape)} and strides {_dims(x.stride())}"
            )
        span += (size - 1) * stride


def _need_indices(name: str, x, shape: tuple, meaning: str) -> torch.Tensor:
    _need_tensor(name, x, len(shape))
    _need_dtype(name, x, INDEX_DTYPES)
    _need_shape(name, x, shape, meaning)
    return x


def _check_alignment(pool: torch.Tensor, buffer: torch.Tensor | None) -> None:
    """The state is moved in 16-byte vectors. Strides are part of a call's plan; addresses are
    checked on every call."""
    if pool.data_ptr() % 16 or any(s % 4 for s in pool.stride()[:3]):
        raise ValueError(
            "initial_state must be 16-byte aligned, with pool/HV/V strides that are multiples of 4 elements; "
            f"got address {pool.data_ptr():#x} and strides {_dims(pool.stride())}"
        )
    if buffer is not None and buffer.data_ptr() % 16:
        raise ValueError(f"intermediate_states_buffer must be 16-byte aligned, got address {buffer.data_ptr():#x}")


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@cache
def _check_device(index: int) -> None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) != (9, 0):
        raise RuntimeError(
            f"gdn_nvrtc ships sm_90a kernels and needs a Hopper GPU (compute capability 9.0); "
            f"cuda:{index} ({torch.cuda.get_device_name(index)}) has compute capability {major}.{minor}"
        )


def _report_bad_index(name: str, indices: torch.Tensor, pool_size: int) -> None:
    bad = (indices >= pool_size).nonzero()
    if bad.shape[0]:
        where = tuple(bad[0].tolist())
        value = int(indices[where])
        row = where[0] if len(where) == 1 else list(where)
        raise IndexError(f"{name}[{row}] = {value} is out of range for a state pool of {pool_size} slots")


@dataclass(frozen=True)
class _Plan:
    """What a call needs beyond its data pointers; a pure function of the arguments' shapes,
    strides, dtypes, devices and flags, so it is computed once per such signature."""

    launch: driver.Launch | None  # the kernel with its grid and block; None when B == 0
    device: torch.device
    device_index: int
    grid: int
    block: int
    pool_size: int
    out_shape: tuple[int, ...]
    warn_default_update: bool
    fixed_params: bytes  # PARAM_FIELDS after the pointers, packed

    def fixed_values(self) -> dict[str, int | float]:
        """The fixed kernel parameters by name (for tests and tools)."""
        names = [name for name, _ in PARAM_FIELDS[_POINTER_FIELDS:]]
        return dict(zip(names, _FIXED.unpack(self.fixed_params), strict=True))


_plans: dict[tuple, _Plan] = {}
_guards: dict[tuple, object] = {}  # the signature check of each cached plan (see _signature_check)
# (scale, disable_state_update, use_qk_l2norm, which optional tensors were passed, check, plan) of the
# latest call: consecutive calls usually share a plan, and then one C++ check of the tensors replaces
# the tuple key (about 5 us of the call's host time). The flags are compared by identity (True, False
# and None are singletons, so use_qk_l2norm=1 is not taken for True), scale by identity or by value
# and type. `which` can never be -1: the placeholder matches no call.
_NO_LAST_PLAN = (None, None, None, -1, None, None)
_last_plan: tuple = _NO_LAST_PLAN

try:  # the check torch.compile's guards run on tensors: dispatch keys, dtype, device, shape, strides
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - present in every torch this package supports
    _TensorGuards = None


def _signature_check(tensors: tuple):
    """A C++ object whose check(*tensors) is True exactly when tensors have these tensors' dtypes,
    devices, shapes and strides (and dispatch keys, e.g. requires_grad), or None where torch has none."""
    if _TensorGuards is None:
        return None
    return _TensorGuards(
        *tensors,
        dynamic_dims_sizes=[list(x.shape) for x in tensors],
        dynamic_dims_strides=[list(x.stride()) for x in tensors],
    )


def _probe_signature_check() -> bool:
    """Whether this torch's TensorGuards behaves as _signature_check needs (a private torch API: a
    torch that changed it keeps the tuple key, which gives the same plans)."""
    global _TensorGuards
    try:
        a, b = torch.empty(2, 3), torch.empty(0)
        check = _signature_check((a, b))
        ok = (check.check(torch.empty(2, 3), torch.empty(0)) and check.check(a, b)
              and not check.check(torch.empty(3, 2).t(), b)
              and not check.check(torch.empty(2, 3, dtype=torch.float64), b)
              and not check.check(torch.empty(2, 4), b) and not check.check(a, None))
    except Exception:  # noqa: BLE001 - any failure means the API is not the one this code knows
        ok = False
    if not ok:
        _TensorGuards = None
    return ok


_probe_signature_check()


def fast_signature_check() -> bool:
    """True when repeated calls are recognised by torch's C++ tensor check instead of a Python tuple
    of every tensor's metadata (the same plans either way; only the host time differs)."""
    return _TensorGuards is not None


def forget_plans() -> None:
    """Drop every cached plan (the next call of each signature re-checks and re-chooses its kernel);
    for tests and tuning that change the kernel choice or reload cubins."""
    global _last_plan
    _plans.clear()
    _guards.clear()
    _last_plan = _NO_LAST_PLAN


def _make_plan(
    q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
    intermediate_states_buffer, ssm_state_indices, disable_state_update, use_qk_l2norm, output_state_indices,
) -> _Plan:
    """Every check of SPEC.md that does not depend on tensor contents; raises before anything runs."""
    _need_tensor("q", q, 4)
    _need_dtype("q", q, INPUT_DTYPES)
    B, T, H, K = q.shape
    if K not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q's last dimension K must be one of {SUPPORTED_HEAD_DIMS}, got {K}")
    if not 1 <= T <= MAX_TOKENS:
        raise ValueError(f"q's token dimension T must be in 1..{MAX_TOKENS}, got {T}")
    if H < 1:
        raise ValueError(f"q must have at least one head, got shape {_dims(q.shape)}")
    _need_tensor("k", k, 4)
    _need_dtype("k", k, (q.dtype,))
    _need_shape("k", k, (B, T, H, K), "[B, T, H, K] (as q)")
    _need_tensor("v", v, 4)
    _need_dtype("v", v, (q.dtype,))
    HV, V = v.shape[2], v.shape[3]
    _need_shape("v", v, (B, T, HV, V), "[B, T, HV, V] with B, T from q")
    if V not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"v's last dimension V must be one of {SUPPORTED_HEAD_DIMS}, got {V}")
    if HV < H or HV % H:
        raise ValueError(f"the value heads HV (v.shape[2] = {HV}) must be a multiple of the q/k heads H = {H}")
    for name, gate in (("a", a), ("b", b)):
        _need_tensor(name, gate, 3)
        _need_dtype(name, gate, (q.dtype, torch.float32))
        _need_shape(name, gate, (B, T, HV), "[B, T, HV]")
    _need_tensor("A_log", A_log, 1)
    _need_dtype("A_log", A_log, (torch.float32,))
    _need_shape("A_log", A_log, (HV,), "[HV]")
    _need_tensor("dt_bias", dt_bias, 1)
    _need_dtype("dt_bias", dt_bias, (torch.float32, torch.bfloat16, torch.float16))
    _need_shape("dt_bias", dt_bias, (HV,), "[HV]")

    pool = _need_tensor("initial_state", initial_state, 4)
    _need_dtype("initial_state", pool, STATE_DTYPES)
    pool_size = pool.shape[0]
    _need_shape("initial_state", pool, (pool_size, HV, V, K), "[pool_size, HV, V, K]")
    if pool.stride(3) != 1:
        raise ValueError(f"initial_state must have stride 1 along K, got strides {_dims(pool.stride())}")
    if disable_state_update is False:
        _need_no_self_overlap("initial_state", pool, "is written (disable_state_update=False)")
    _check_alignment(pool, None)
    read_slots = _need_indices("initial_state_indices", initial_state_indices, (B,), "[B]")
    write_slots = output_state_indices
    if write_slots is not None:
        _need_indices("output_state_indices", write_slots, (B,), "[B]")
    buffer = intermediate_states_buffer
    if buffer is not None:
        _need_tensor("intermediate_states_buffer", buffer, 5)
        _need_dtype("intermediate_states_buffer", buffer, (pool.dtype,))
        if buffer.shape[0] < B or buffer.shape[1] < T or tuple(buffer.shape[2:]) != (HV, V, K):
            raise ValueError(
                "intermediate_states_buffer must have shape [>=B, >=T, HV, V, K] = "
                f"[>={B}, >={T}, {HV}, {V}, {K}], got {_dims(buffer.shape)}"
            )
        if not buffer.is_contiguous():
            raise ValueError(
                f"intermediate_states_buffer must be contiguous, got strides {_dims(buffer.stride())}"
            )
        _check_alignment(pool, buffer)
    scatter_slots = ssm_state_indices
    if scatter_slots is not None:
        _need_indices("ssm_state_indices", scatter_slots, (B, T), "[B, T]")
    if output is not None:
        _need_tensor("output", output, 4)
        _need_dtype("output", output, (q.dtype,))
        _need_shape("output", output, (B, T, HV, V), "[B, T, HV, V]")
        _need_no_self_overlap("output", output, "is written")

    for name, x in (("q", q), ("k", k), ("v", v), ("a", a), ("b", b), ("output", output)):
        if x is not None:
            _need_unit_last_stride(name, x)
    if scale is None:
        scale = 1.0 / math.sqrt(K)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if disable_state_update is not None and not isinstance(disable_state_update, bool):
        raise TypeError(f"disable_state_update must be True, False or None, got {disable_state_update!r}")
    if not isinstance(use_qk_l2norm, bool):
        raise TypeError(f"use_qk_l2norm must be True or False, got {use_qk_l2norm!r}")
    if buffer is not None and scatter_slots is not None:
        raise ValueError("intermediate_states_buffer and ssm_state_indices are mutually exclusive; pass one")
    if scatter_slots is not None and disable_state_update is not False:
        raise ValueError(
            f"ssm_state_indices writes states into the pool and needs disable_state_update=False, "
            f"got disable_state_update={disable_state_update}"
        )

    device = q.device
    for name, x in (
        ("k", k), ("v", v), ("a", a), ("b", b), ("A_log", A_log), ("dt_bias", dt_bias),
        ("initial_state", pool), ("initial_state_indices", read_slots),
        ("output_state_indices", write_slots), ("intermediate_states_buffer", buffer),
        ("ssm_state_indices", scatter_slots), ("output", output),
    ):
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device} but q is on {device}; all tensors must be on one device")
    if device.type != "cuda":
        raise ValueError(f"the tensors must be on a CUDA device, got {device}")
    _check_device(device.index)

    writes_states = buffer is not None or scatter_slots is not None
    spec = choose_spec(
        K, V, T, INPUT_DTYPES[q.dtype], STATE_DTYPES[pool.dtype],
        writes_states=writes_states, batch_heads=B * HV,
        sm_count=_sm_count(device.index),
    )
    grid = B * HV * spec.blocks_per_head
    if grid > _MAX_GRID:
        raise ValueError(f"B * HV = {B * HV} is too large for one launch (at most {_MAX_GRID // spec.blocks_per_head})")

    kernel = driver.kernel(spec) if B else None
    stagger_blocks, stagger_ns = 0, 0
    flags = FLAGS["L2NORM"] if use_qk_l2norm else 0
    shared_bytes = 0
    if kernel is not None:
        cap = blocks_per_sm_cap(spec, batch_heads=B * HV, sm_count=_sm_count(device.index))
        if cap:
            shared_bytes = driver.shared_bytes_for_at_most(kernel, spec.threads_per_block, device.index, cap)
        wave = driver.blocks_per_sm(kernel, spec.threads_per_block, device.index, shared_bytes) * _sm_count(
            device.index)
        if start_delays and start_delay_applies(spec, writes_states=writes_states):
            stagger_blocks, stagger_ns = start_delay(spec, writes_states=writes_states, grid=grid, wave=wave)
        if prefetch_state(spec, grid, wave, writes_states=writes_states):
            flags |= FLAGS["PREFETCH_STATE"]
    if output is None:
        out_strides = (T * HV * V, HV * V, V)
        flags |= FLAGS["ZERO_PADDED_OUTPUT"]
    else:
        out_strides = output.stride()[:3]
    if disable_state_update is False and scatter_slots is None:
        flags |= FLAGS["WRITE_FINAL"]
    if buffer is not None:
        flags |= FLAGS["WRITE_BUFFER"]
    if scatter_slots is not None:
        flags |= FLAGS["WRITE_SCATTER"]
    if write_slots is not None:
        flags |= FLAGS["HAS_WRITE_SLOTS"]
    fixed = {
        "B": B, "H": H, "HV": HV, "pool_size": pool_size,
        "q_sb": q.stride(0), "q_st": q.stride(1), "q_sh": q.stride(2),
        "k_sb": k.stride(0), "k_st": k.stride(1), "k_sh": k.stride(2),
        "v_sb": v.stride(0), "v_st": v.stride(1), "v_sh": v.stride(2),
        "a_sb": a.stride(0), "a_st": a.stride(1), "b_sb": b.stride(0), "b_st": b.stride(1),
        "A_log_s": A_log.stride(0), "dt_bias_s": dt_bias.stride(0),
        "o_sb": out_strides[0], "o_st": out_strides[1], "o_sh": out_strides[2],
        "pool_s0": pool.stride(0), "pool_s1": pool.stride(1), "pool_s2": pool.stride(2),
        "buf_sb": 0 if buffer is None else buffer.stride(0),
        "buf_st": 0 if buffer is None else buffer.stride(1),
        "read_s": read_slots.stride(0),
        "write_s": 0 if write_slots is None else write_slots.stride(0),
        "scatter_sb": 0 if scatter_slots is None else scatter_slots.stride(0),
        "scatter_st": 0 if scatter_slots is None else scatter_slots.stride(1),
        "read_is64": read_slots.dtype == torch.int64,
        "write_is64": write_slots is not None and write_slots.dtype == torch.int64,
        "scatter_is64": scatter_slots is not None and scatter_slots.dtype == torch.int64,
        "a_dtype": _SCALAR_DTYPES[a.dtype], "b_dtype": _SCALAR_DTYPES[b.dtype],
        "dt_bias_dtype": _SCALAR_DTYPES[dt_bias.dtype],
        "stagger_blocks": stagger_blocks, "stagger_ns": stagger_ns, "flags": flags, "scale": float(scale),
    }
    fixed_params = _FIXED.pack(*(fixed[name] for name, _ in PARAM_FIELDS[_POINTER_FIELDS:]))
    return _Plan(
        launch=None if kernel is None else driver.Launch(
            kernel, grid, spec.threads_per_block, device.index, _POINTERS, fixed_params, shared_bytes),
        device=device,
        device_index=device.index,
        grid=grid,
        block=spec.threads_per_block,
        pool_size=pool_size,
        out_shape=(B, T, HV, V),
        warn_default_update=disable_state_update is None,
        fixed_params=fixed_params,
    )


def _plan_for(
    which, tensors, q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
    intermediate_states_buffer, ssm_state_indices, disable_state_update, use_qk_l2norm, output_state_indices,
) -> _Plan:
    """The plan of a call that is not the latest call's signature: from the cache by a tuple of every
    tensor's metadata, else made (every check); it becomes the latest plan. The caller checks the
    addresses (alignment), which are not part of a plan."""
    global _last_plan
    # Everything a plan depends on besides the tensors' metadata. The types keep e.g.
    # use_qk_l2norm=1 or scale=True (refused) apart from True or 1.0 (accepted).
    scalars = (
        scale, type(scale), disable_state_update, type(disable_state_update), use_qk_l2norm, type(use_qk_l2norm),
        which,
    )
    try:
        # One flat tuple (no helper calls, no nesting).
        key = (
            q.shape, q.stride(), q.dtype, q.get_device(), k.shape, k.stride(), k.dtype, k.get_device(),
            v.shape, v.stride(), v.dtype, v.get_device(),
            initial_state.shape, initial_state.stride(), initial_state.dtype, initial_state.get_device(),
            initial_state_indices.shape, initial_state_indices.stride(), initial_state_indices.dtype,
            initial_state_indices.get_device(), A_log.shape, A_log.stride(), A_log.dtype, A_log.get_device(),
            a.shape, a.stride(), a.dtype, a.get_device(), dt_bias.shape, dt_bias.stride(), dt_bias.dtype,
            dt_bias.get_device(), b.shape, b.stride(), b.dtype, b.get_device(),
            None if output is None else (output.shape, output.stride(), output.dtype, output.get_device()),
            None if intermediate_states_buffer is None else (
                intermediate_states_buffer.shape, intermediate_states_buffer.stride(),
                intermediate_states_buffer.dtype, intermediate_states_buffer.get_device()),
            None if ssm_state_indices is None else (
                ssm_state_indices.shape, ssm_state_indices.stride(), ssm_state_indices.dtype,
                ssm_state_indices.get_device()),
            None if output_state_indices is None else (
                output_state_indices.shape, output_state_indices.stride(), output_state_indices.dtype,
                output_state_indices.get_device()),
            *scalars,
        )
        plan = _plans.get(key)
    except (AttributeError, TypeError):  # not tensors, or an unhashable scale: the full checks say what is wrong
        key, plan = None, None
    if plan is None:
        plan = _make_plan(
            q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b, scale, output,
            intermediate_states_buffer, ssm_state_indices, disable_state_update, use_qk_l2norm, output_state_indices,
        )
        if key is not None:
            if len(_plans) >= _MAX_PLANS:
                _plans.clear()
                _guards.clear()
            _plans[key] = plan
    if key is not None and _TensorGuards is not None:
        check = None
        # The check refuses a tensor passed twice (e.g. the same slots to read and to write): such
        # calls keep the tuple key.
        if len(set(map(id, tensors))) == len(tensors):
            check = _guards.get(key)
            if check is None or not check.check(*tensors):  # new, or these tensors differ in e.g. requires_grad
                check = _guards[key] = _signature_check(tensors)
        _last_plan = (scale, disable_state_update, use_qk_l2norm, which, check, plan)
    return plan


def gated_delta_rule_mtp(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused Gated DeltaNet verify step over T draft tokens; returns (output, initial_state).

    See the module docstring for the math and ../README.md for every argument. Raises
    TypeError / ValueError / RuntimeError before anything is launched or written.
    """
    global _warned_default_update

    # The tensors passed, and which optional ones they include (a check made for a signature is only
    # asked about tensors of the same count and kinds).
    tensors = (q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b)
    which = 0
    if output is not None:
        tensors += (output,)
        which = 1
    if intermediate_states_buffer is not None:
        tensors += (intermediate_states_buffer,)
        which |= 2
    if ssm_state_indices is not None:
        tensors += (ssm_state_indices,)
        which |= 4
    if output_state_indices is not None:
        tensors += (output_state_indices,)
        which |= 8
    last = _last_plan  # one read: another thread may replace it
    try:
        plan = last[5] if (
            which == last[3] and disable_state_update is last[1] and use_qk_l2norm is last[2]
            and (scale is last[0] or (type(scale) is type(last[0]) and scale == last[0]))
            and last[4] is not None and last[4].check(*tensors)
        ) else None
    except Exception:  # noqa: BLE001 - a scale whose == raises: the full checks say what is wrong
        plan = None
    if plan is None:
        plan = _plan_for(which, tensors, q, k, v, initial_state, initial_state_indices, A_log, a, dt_bias, b,
                         scale, output, intermediate_states_buffer, ssm_state_indices, disable_state_update,
                         use_qk_l2norm, output_state_indices)
    # The plan covers the strides; the addresses are checked on every call.
    pool_address = initial_state.data_ptr()
    buffer_address = 0 if intermediate_states_buffer is None else intermediate_states_buffer.data_ptr()
    if (pool_address | buffer_address) % 16:
        _check_alignment(initial_state, intermediate_states_buffer)  # raises with the details

    if plan.warn_default_update and not _warned_default_update:
        warnings.warn(
            "gated_delta_rule_mtp: disable_state_update=None currently means True (the pool is not "
            "updated); the default will become False. Pass it explicitly to silence this warning.",
            FutureWarning,
            stacklevel=2,
        )
        _warned_default_update = True
    if _check_indices:
        for name, x in (
            ("initial_state_indices", initial_state_indices),
            ("output_state_indices", output_state_indices),
            ("ssm_state_indices", ssm_state_indices),
        ):
            if x is not None:
                _report_bad_index(name, x, plan.pool_size)
    if output is None:
        output = torch.empty(plan.out_shape, dtype=q.dtype, device=plan.device)
    launch = plan.launch
    if launch is None:
        return output, initial_state

    launch(
        _raw_stream(plan.device_index),
        q.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(), A_log.data_ptr(), dt_bias.data_ptr(),
        pool_address, initial_state_indices.data_ptr(),
        0 if output_state_indices is None else output_state_indices.data_ptr(),
        0 if ssm_state_indices is None else ssm_state_indices.data_ptr(),
        buffer_address, output.data_ptr(),
    )
    return output, initial_state
