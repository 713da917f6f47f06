"""Soak: many random gated_delta_rule_mtp calls on one Hopper GPU; exits non-zero on any error,
mismatch, GPU memory growth or NVRTC compile.

Each call mixes a batch size (0..64), T (1..8), a head layout, bf16/fp16 inputs, gate, dt_bias and
index dtypes, padding and out-of-range slots, strided views and a mode (update with or without
output_state_indices, intermediate buffer, per-token scatter, disable_state_update=True). Inputs are
views of random banks allocated once and the slots are slices of prebuilt permutations, so the host
loop is fast and nothing is allocated per call but the output. Every --check-every-th call is
compared with the float64 reference (checked_call: the reference runs on a compact copy of the slots
the call names). GPU memory (torch.cuda.memory_allocated and the driver's free memory, which also
counts allocations outside torch) is measured after a warm-up and at the end; other processes on the
same GPU disturb the second number.

    PYTHONPATH=$PWD python scripts/soak.py [--calls 100000] [--check-every 500] [--seed 0]

The last line printed is a one-line summary.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import rel_error, written_slots  # noqa: E402

from gdn_nvrtc import gated_delta_rule_mtp  # noqa: E402
from gdn_nvrtc.reference import (  # noqa: E402
    OUTPUT_REL_TOL,
    STATE_REL_TOL,
    gated_delta_rule_mtp_reference,
    output_row_allowed_error,
)
from gdn_nvrtc.specs import PREBUILT_HEAD_DIM, PREBUILT_TOKENS  # noqa: E402

HEADS = ((4, 8), (16, 32), (2, 4), (16, 64), (8, 16), (1, 2))  # (H, HV)
MODES = ("update", "write_slots", "buffer", "scatter", "no_update")
INPUT_DTYPES = (torch.bfloat16, torch.float16)
DT_BIAS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
SCALES = (None, None, None, 0.0625, 0.1)  # a few values: each distinct scale is its own cached plan
K = V = PREBUILT_HEAD_DIM  # prebuilt shapes only: nothing is compiled
B_MAX = 64
T_MAX = max(PREBUILT_TOKENS)
HV_MAX = max(hv for _, hv in HEADS)
POOL_SLOTS = 2 * B_MAX + B_MAX * T_MAX  # a strided read window (2B) plus B * T scatter slots
PERMUTATIONS = 256
BANK_ROWS, BANK_TOKENS, BANK_QK_HEADS, BANK_V_HEADS = B_MAX + 16, T_MAX + 4, 20, HV_MAX + 4
OUT_PAD = 8  # the output is a view into a wider bank (16-byte aligned for bf16/fp16)
SYNC_EVERY = 1000  # launches are asynchronous: bound how late a failed launch is noticed
ALLOCATED_GROWTH_LIMIT = 1 << 20  # torch.cuda.memory_allocated may not grow by more than this
FREE_DROP_LIMIT = 64 << 20  # nor may the driver's free memory shrink by more than this
GIB = 1 << 30


def renumber(indices: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """indices into a pool holding only `slots`, in that order; other values (padding) become -1."""
    position = {slot: i for i, slot in enumerate(slots)}
    values = [position.get(value, -1) for value in indices.flatten().tolist()]
    return torch.tensor(values, dtype=indices.dtype, device=indices.device).view(indices.shape)


def gather(pool: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """A copy of pool[slots] made from plain views, so it holds for pools of any size."""
    return torch.stack([pool[slot] for slot in slots]) if slots else pool[:0].clone()


def slot_checksums(pool: torch.Tensor) -> torch.Tensor:
    """Per slot, the int64 sum of the state's bits read as int32: a write of other values changes it
    (short of changes that cancel exactly); costs one read of the pool, in chunks of about 256 MB."""
    bits = pool.view(torch.int32)
    chunk = max(1, (256 << 20) // (bits[0].numel() * 4))
    return torch.cat(
        [
            bits[i : i + chunk].reshape(len(bits[i : i + chunk]), -1).sum(1, dtype=torch.int64)
            for i in range(0, len(bits), chunk)
        ]
    )


def checked_call(inputs: dict, **kwargs) -> tuple[float, float]:
    """Call gated_delta_rule_mtp and check everything it writes and must not write against the
    float64 reference; return (output relative error, worst relative error of a written state).

    The reference runs on a compact pool holding only the slots the index tensors name, so the pool
    may be of any size. The output and the buffer, when given, are filled with NaN first: valid rows
    must come back finite and within tolerance, everything else NaN (or zero for an allocated
    output). Slots the call names are compared exactly or with the reference; every other slot must
    keep its checksum.
    """
    pool = inputs["initial_state"]
    pool_size = pool.shape[0]
    T = inputs["q"].shape[1]
    output, buffer = kwargs.get("output"), kwargs.get("intermediate_states_buffer")
    for poisoned in (output, buffer):
        if poisoned is not None:
            poisoned.fill_(float("nan"))

    named = {"initial_state_indices": inputs["initial_state_indices"]}
    named.update((name, kwargs[name]) for name in ("output_state_indices", "ssm_state_indices") if name in kwargs)
    slots = sorted({s for x in named.values() for s in x.flatten().tolist() if 0 <= s < pool_size})
    compact = {name: renumber(x, slots) for name, x in named.items()}
    compact_inputs = dict(inputs, initial_state=gather(pool, slots))
    compact_inputs["initial_state_indices"] = compact.pop("initial_state_indices")
    compact_kwargs = dict(kwargs, **compact)
    ref_out, ref_pool, ref_buf, ref_magnitude = gated_delta_rule_mtp_reference(
        **compact_inputs, **compact_kwargs, return_magnitude=True
    )
    written = sorted(written_slots(compact_inputs, compact_kwargs))  # positions in the compact pool
    checksums_before = slot_checksums(pool)

    out, returned = gated_delta_rule_mtp(**inputs, **kwargs)
    torch.cuda.synchronize(pool.device)
    assert returned is pool, "the returned state is not the pool that was passed in"
    assert output is None or out is output, "the returned output is not the one that was passed in"

    read = inputs["initial_state_indices"].long()
    valid = (read >= 0) & (read < pool_size)
    output_error = state_error = 0.0
    if valid.any():
        got, ref = out[valid], ref_out[valid]
        assert torch.isfinite(got).all(), "non-finite output in a valid row"
        output_error = rel_error(got, ref).item()
        assert output_error < OUTPUT_REL_TOL, f"output error {output_error:.3g}"
        row_error = (got.double() - ref).norm(dim=-1)
        allowed = output_row_allowed_error(ref, ref_magnitude[valid], got.dtype)
        assert (row_error <= allowed).all(), f"worst output row error {(row_error / ref.norm(dim=-1)).max():.3g}"
    padded = out[~valid]
    if output is None:
        assert (padded == 0).all(), "padded rows of an allocated output must be zero"
    else:
        assert torch.isnan(padded).all(), "padded output rows were written"

    after = gather(pool, slots)
    if written:
        got = after[written]
        assert torch.isfinite(got).all(), "non-finite state written"
        errors = rel_error(got, ref_pool[written], dims=(1, 2, 3))
        state_error = errors.max().item()
        worst = slots[written[errors.argmax().item()]]
        assert state_error < STATE_REL_TOL, f"state error {state_error:.3g} in pool slot {worst}"
    unwritten = sorted(set(range(len(slots))) - set(written))
    if unwritten:
        bits_after = after[unwritten].view(torch.int32)
        bits_before = compact_inputs["initial_state"][unwritten].view(torch.int32)
        differs = (bits_after != bits_before).flatten(1).any(1).nonzero().flatten().tolist()
        assert not differs, f"pool slots {[slots[unwritten[i]] for i in differs][:8]} must not be written"
    untouched = torch.ones(pool_size, dtype=torch.bool, device=pool.device)
    untouched[slots] = False
    changed = ((slot_checksums(pool) != checksums_before) & untouched).nonzero().flatten()
    assert not len(changed), f"pool slots {changed[:8].tolist()} are not named by the call but changed"

    if buffer is not None:
        rows = valid.nonzero().flatten()
        got, ref = buffer[rows, :T], ref_buf[rows, :T]
        assert torch.isfinite(got).all(), "non-finite state in the buffer"
        if len(rows):
            state_error = max(state_error, rel_error(got, ref, dims=(2, 3, 4)).max().item())
            assert state_error < STATE_REL_TOL, f"buffer state error {state_error:.3g}"
        # The valid rows' first T steps are finite, so this says every other element is still NaN.
        assert torch.isnan(buffer).sum().item() == buffer.numel() - got.numel(), "buffer written outside its rows"
    return output_error, state_error


class Bank:
    """Random tensors allocated once; every call takes views of them."""

    def __init__(self, generator: torch.Generator):
        def normal(shape, dtype=torch.float32, std=1.0):
            return torch.empty(shape, device="cuda").normal_(0, std, generator=generator).to(dtype)

        self.pools = {hv: normal((POOL_SLOTS, hv, V, K), std=0.1) for _, hv in HEADS}
        self.qk = {dtype: normal((BANK_ROWS, BANK_TOKENS, BANK_QK_HEADS, K), dtype) for dtype in INPUT_DTYPES}
        # Without l2norm, |k|^2 ~ 0.5 keeps (I - beta k k^T) a contraction, so the pools stay bounded.
        self.qk_small = {dtype: x / 16 for dtype, x in self.qk.items()}
        self.v = {dtype: normal((BANK_ROWS, BANK_TOKENS, BANK_V_HEADS, V), dtype) for dtype in INPUT_DTYPES}
        self.gates = {
            dtype: normal((BANK_ROWS, BANK_TOKENS, BANK_V_HEADS), dtype, std=2.0)
            for dtype in (*INPUT_DTYPES, torch.float32)
        }
        self.A_log = torch.log1p(15 * torch.rand(2 * BANK_V_HEADS, generator=generator, device="cuda"))
        self.dt_bias = {dtype: normal((2 * BANK_V_HEADS,), dtype) for dtype in DT_BIAS_DTYPES}
        self.out = {
            dtype: torch.zeros(B_MAX, T_MAX, HV_MAX, V + 2 * OUT_PAD, dtype=dtype, device="cuda")
            for dtype in INPUT_DTYPES
        }
        self.buffer = torch.empty(B_MAX * T_MAX * HV_MAX * V * K, device="cuda")
        # Rows of distinct slots: any window of a row can serve as read, write and scatter slots at
        # once. 3% padding (-1), 1% out of range (>= POOL_SLOTS, padding too); in the int64 rows,
        # 0.5% beyond 2^32 as well (a slot truncated to 32 bits would become a valid one).
        order = torch.rand(PERMUTATIONS, POOL_SLOTS, generator=generator, device="cuda").argsort(dim=1)
        draw = torch.rand(order.shape, generator=generator, device="cuda")
        order = torch.where(draw < 0.03, -1, order)
        order = torch.where((draw >= 0.03) & (draw < 0.04), POOL_SLOTS + order, order)
        self.slots = {
            torch.int32: order.to(torch.int32),
            torch.int64: torch.where(draw >= 0.995, (1 << 40) + order, order),
        }


def draw_call(rng: random.Random, bank: Bank, T: int | None = None, dtype=None, mode: str | None = None):
    """Random (inputs, kwargs) for one call, every tensor a view of the bank."""
    B = rng.choice((0, 1, 1, 1, 2)) if rng.random() < 0.15 else rng.randint(1, B_MAX)
    T = T or rng.choice(PREBUILT_TOKENS)
    dtype = dtype or rng.choice(INPUT_DTYPES)
    mode = mode or rng.choice(MODES)
    H, HV = rng.choice(HEADS)
    l2norm = rng.random() < 0.9
    qk = bank.qk[dtype] if l2norm else bank.qk_small[dtype]

    def window(x: torch.Tensor, heads: int) -> torch.Tensor:
        b0 = rng.randrange(BANK_ROWS - B + 1)
        t0 = rng.randrange(BANK_TOKENS - T + 1)
        h0 = rng.randrange(x.shape[2] - heads + 1)
        return x[b0 : b0 + B, t0 : t0 + T, h0 : h0 + heads]

    step = rng.choice((1, 1, 1, 2))  # A_log / dt_bias / read-slot views: sometimes strided
    h0 = rng.randrange(len(bank.A_log) - step * HV + 1)
    inputs = {
        "q": window(qk, H),
        "k": window(qk, H),
        "v": window(bank.v[dtype], HV),
        "initial_state": bank.pools[HV],
        "A_log": bank.A_log[h0 : h0 + step * HV : step],
        "a": window(bank.gates[rng.choice((dtype, torch.float32))], HV),
        "dt_bias": bank.dt_bias[rng.choice(DT_BIAS_DTYPES)][h0 : h0 + step * HV : step],
        "b": window(bank.gates[rng.choice((dtype, torch.float32))], HV),
    }
    row = rng.randrange(PERMUTATIONS)
    extra = B * T if mode == "scatter" else B if mode == "write_slots" else 0
    start = rng.randint(0, POOL_SLOTS - step * B - extra)
    rest = start + step * B  # slots after the read window: no row reads them
    inputs["initial_state_indices"] = bank.slots[rng.choice(INDEX_DTYPES)][row, start:rest:step]

    update = mode in ("update", "write_slots", "scatter") or (mode == "buffer" and rng.random() < 0.5)
    kwargs = {"disable_state_update": not update, "use_qk_l2norm": l2norm, "scale": rng.choice(SCALES)}
    if rng.random() < 0.5:
        kwargs["output"] = bank.out[dtype][:B, :T, :HV, OUT_PAD : OUT_PAD + V]
    if mode == "write_slots":
        kwargs["output_state_indices"] = bank.slots[rng.choice(INDEX_DTYPES)][row, rest : rest + B]
    elif mode == "scatter":
        scatter = bank.slots[rng.choice(INDEX_DTYPES)][row, rest : rest + B * T]
        kwargs["ssm_state_indices"] = scatter.view(B, T) if rng.random() < 0.7 else scatter.view(T, B).t()
    elif mode == "buffer":
        steps = rng.choice((T, T_MAX))  # a buffer with more steps than T is indexed with its real stride
        kwargs["intermediate_states_buffer"] = bank.buffer[: B * steps * HV * V * K].view(B, steps, HV, V, K)
    return inputs, kwargs


def describe(inputs: dict, kwargs: dict) -> str:
    def one(name, x):
        if isinstance(x, torch.Tensor):
            return f"{name}={list(x.shape)}:{str(x.dtype).removeprefix('torch.')}:strides{list(x.stride())}"
        return f"{name}={x!r}"

    return " ".join(one(name, x) for name, x in {**inputs, **kwargs}.items() if x is not None)


def memory_now() -> tuple[int, int, int]:
    """(bytes allocated by torch, bytes free on the device, host resident bytes) once all work is done
    and torch's cached blocks are given back, so that free memory counts only what is really held."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return torch.cuda.memory_allocated(), free, resident_pages * os.sysconf("SC_PAGE_SIZE")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=positive, default=100_000, help="random calls to make (default 100000)")
    parser.add_argument(
        "--check-every",
        type=positive,
        default=500,
        help="compare every N-th call with the float64 reference (default 500)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the calls and of the random banks")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("soak: needs a Hopper GPU (compute capability 9.0) and torch sees none")
        return 2

    rng = random.Random(args.seed)
    bank = Bank(torch.Generator(device="cuda").manual_seed(args.seed))
    worst_output = worst_state = 0.0
    checked = warm_up_checks = 0
    phase, inputs, kwargs = "warm-up", {}, {}
    try:
        # Warm-up: load every prebuilt cubin in every mode, and run the checks once per mode and
        # dtype (the reference initialises cuBLAS), so that what follows allocates nothing new.
        for T in PREBUILT_TOKENS:
            for dtype in INPUT_DTYPES:
                for mode in MODES:
                    inputs, kwargs = draw_call(rng, bank, T, dtype, mode)
                    gated_delta_rule_mtp(**inputs, **kwargs)
        for dtype in INPUT_DTYPES:
            for mode in MODES:
                inputs, kwargs = draw_call(rng, bank, dtype=dtype, mode=mode)
                output_error, state_error = checked_call(inputs, **kwargs)
                worst_output, worst_state = max(worst_output, output_error), max(worst_state, state_error)
                warm_up_checks += 1
        before = memory_now()

        start = time.perf_counter()
        for call in range(args.calls):
            phase = f"call {call}"
            inputs, kwargs = draw_call(rng, bank)
            if call % args.check_every == args.check_every - 1:
                output_error, state_error = checked_call(inputs, **kwargs)
                worst_output, worst_state = max(worst_output, output_error), max(worst_state, state_error)
                checked += 1
            else:
                gated_delta_rule_mtp(**inputs, **kwargs)
            if (call + 1) % SYNC_EVERY == 0:
                phase = f"the launches up to call {call}"
                torch.cuda.synchronize()
            if (call + 1) % max(1, args.calls // 10) == 0:
                print(
                    f"soak: {call + 1}/{args.calls} calls, {checked} checked, {time.perf_counter() - start:.1f} s",
                    flush=True,
                )
        phase = "the last launches"
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    except Exception as error:
        traceback.print_exc()
        print(f"soak: FAILED in {phase} ({describe(inputs, kwargs)}): {type(error).__name__}: {error}")
        return 1

    after = memory_now()
    problems = []
    if after[0] - before[0] > ALLOCATED_GROWTH_LIMIT:
        problems.append(f"torch.cuda.memory_allocated grew by {(after[0] - before[0]) / 2**20:.1f} MiB")
    if before[1] - after[1] > FREE_DROP_LIMIT:
        problems.append(f"free GPU memory shrank by {(before[1] - after[1]) / 2**20:.1f} MiB")
    if sys.modules.get("cuda.bindings.nvrtc") is not None:
        problems.append("NVRTC was loaded: a call compiled a kernel")
    verdict = "FAILED: " + "; ".join(problems) if problems else "OK"
    print(
        f"soak: {verdict}: {args.calls} calls, {checked} checked (+{warm_up_checks} in warm-up), max error "
        f"output {worst_output:.2e} (limit {OUTPUT_REL_TOL:g}) state {worst_state:.2e} (limit {STATE_REL_TOL:g}), "
        f"GPU allocated {before[0] / GIB:.3f} -> {after[0] / GIB:.3f} GiB, "
        f"GPU free {before[1] / GIB:.3f} -> {after[1] / GIB:.3f} GiB, "
        f"host RSS {before[2] / GIB:.2f} -> {after[2] / GIB:.2f} GiB, {seconds:.1f} s"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
