"""Reliability on the GPU: pools beyond 2^31 elements, CUDA-graph replay while indices and inputs
change, launch order, several GPUs and threads at once. Calls are checked against the float64
reference; graph replays bit for bit against eager calls, a few of which are checked too."""

from __future__ import annotations

import math
import random
import sys
import threading
import traceback
from pathlib import Path

import pytest
import torch
from helpers import check_call, rel_error, same_bits

import gdn_nvrtc.mtp as mtp
from gdn_nvrtc import driver, gated_delta_rule_mtp
from gdn_nvrtc.reference import OUTPUT_REL_TOL, gated_delta_rule_mtp_reference, make_inputs
from gdn_nvrtc.specs import PREBUILT_TOKENS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from soak import checked_call, gather  # noqa: E402

pytestmark = pytest.mark.gpu

MODES = ("update", "write_slots", "buffer", "scatter", "no_update")
INPUT_DTYPES = (torch.bfloat16, torch.float16)


def random_slots(rng: random.Random, B: int, pool_size: int) -> tuple[list[int], list[int]]:
    """Distinct read slots for B rows, about one in five padding (-1 or out of range), and the slots
    that no row reads, in random order."""
    slots = rng.sample(range(pool_size), pool_size)
    read = [rng.choice((-1, pool_size + rng.randrange(9))) if rng.random() < 0.2 else s for s in slots[:B]]
    return read, slots[B:]


def write_and_scatter_slots(mode: str, B: int, T: int, free: list[int]) -> dict[str, list[int]]:
    """The values of the mode's write or scatter slots, taken from `free`; some skip their write (-1)."""
    if mode == "write_slots":
        write = free[:B]
        write[-1] = -1
        return {"output_state_indices": write}
    if mode == "scatter":
        scatter = free[: B * T]
        scatter[::5] = [-1] * len(scatter[::5])
        return {"ssm_state_indices": scatter}
    return {}


def mode_kwargs(mode: str, inputs: dict, free: list[int], index_dtype: torch.dtype = torch.int32) -> dict:
    """The arguments of one mode, on the inputs' device. The output and the buffer (one row and one
    step more than needed) are NaN, so what must be written and what must not are both visible."""
    B, T = inputs["q"].shape[:2]
    _, HV, V, K = inputs["initial_state"].shape
    device = inputs["q"].device
    kwargs = {
        "disable_state_update": mode == "no_update",
        "output": torch.full((B, T, HV, V), float("nan"), dtype=inputs["q"].dtype, device=device),
    }
    for name, values in write_and_scatter_slots(mode, B, T, free).items():
        shape = (B,) if name == "output_state_indices" else (B, T)
        kwargs[name] = torch.tensor(values, dtype=index_dtype, device=device).view(shape)
    if mode == "buffer":
        kwargs["intermediate_states_buffer"] = torch.full((B + 1, T + 1, HV, V, K), float("nan"), device=device)
    return kwargs


def need_hopper(index: int) -> None:
    if index >= torch.cuda.device_count():
        pytest.skip("needs two GPUs")
    if torch.cuda.get_device_capability(index) != (9, 0):
        pytest.skip(f"cuda:{index} is not a Hopper GPU")


# --- 64-bit offsets ---------------------------------------------------------------------------

BIG_POOL = (4200, 32, 128, 128)  # slots, HV, V, K: 2.2e9 fp32 elements, 8.8 GB
BIG_H = 16
SLOT_PAST_2_31 = 2**31 // math.prod(BIG_POOL[1:])  # the first slot that starts at element 2^31 (4096)


@pytest.fixture(scope="module")
def big_pool():
    numel = math.prod(BIG_POOL)
    assert numel > 2**31
    needed = numel * 4 + 3 * 2**30  # the pool, and room for the checks' temporaries
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"a pool of {numel} fp32 elements needs {needed / 2**30:.1f} GiB free, {free / 2**30:.1f} are")
    generator = torch.Generator(device="cuda").manual_seed(31)
    held = {"pool": torch.empty(BIG_POOL, device="cuda").normal_(0, 0.1, generator=generator)}
    yield held
    held.clear()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("index_dtype,T", [(torch.int32, 2), (torch.int64, 7)])
@pytest.mark.parametrize("mode", MODES)
def test_pool_beyond_2_31_elements(big_pool, mode, index_dtype, T):
    pool = big_pool["pool"]
    pool_size = pool.shape[0]
    # Out of range, so padding: pool_size, or (int64) a value that truncated to 32 bits is slot 4190.
    beyond = pool_size if index_dtype == torch.int32 else (1 << 32) + 4190
    # The last slot, slots whose element offset needs 32 bits, the slots either side of element 2^31,
    # one whose byte offset needs 33 bits but whose element offset does not, and padding.
    read = [pool_size - 1, 4190, beyond, SLOT_PAST_2_31 + 1, SLOT_PAST_2_31, SLOT_PAST_2_31 - 1, 3000, -1]
    free = [s for s in range(pool_size - 1, -1, -1) if s not in read]  # write and scatter slots from the end down
    inputs = make_inputs(
        len(read), T, BIG_H, BIG_POOL[1], pool_size=len(read), generator=torch.Generator().manual_seed(T)
    )
    inputs["initial_state"] = pool
    inputs["initial_state_indices"] = torch.tensor(read, dtype=index_dtype, device="cuda")
    kwargs = mode_kwargs(mode, inputs, free, index_dtype)

    named = {
        s for x in (read, *write_and_scatter_slots(mode, len(read), T, free).values()) for s in x if 0 <= s < pool_size
    }
    neighbours = sorted(s for s in {0, *(s + d for s in named for d in (-1, 1))} - named if 0 <= s < pool_size)
    neighbours_before = gather(pool, neighbours)
    # The reference runs on a compact copy of the named slots; every other slot keeps its checksum.
    checked_call(inputs, **kwargs)
    assert same_bits(gather(pool, neighbours), neighbours_before), "a neighbour of a named slot changed"


def test_buffer_beyond_2_31_elements():
    # A buffer with many spare steps per row, so rows from b = 14 on start past element 2^31. The
    # rows are checked bit for bit against the same call into a compact buffer, itself checked
    # against the reference; the spare steps stay NaN.
    B, T, H, HV, steps = 16, 3, 16, 32, 300
    shape = (B, steps, HV, 128, 128)
    numel = math.prod(shape)
    assert (B - 2) * math.prod(shape[1:]) > 2**31
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < numel * 4 + 2 * 2**30:
        pytest.skip(f"a buffer of {numel} fp32 elements needs {numel * 4 / 2**30 + 2:.1f} GiB free")
    inputs = make_inputs(B, T, H, HV, pool_size=B + 2, generator=torch.Generator().manual_seed(7))
    compact = torch.full((B, T, HV, 128, 128), float("nan"), device="cuda")
    check_call(inputs, disable_state_update=True, intermediate_states_buffer=compact)
    big = torch.full(shape, float("nan"), device="cuda")
    gated_delta_rule_mtp(**inputs, disable_state_update=True, intermediate_states_buffer=big)
    assert same_bits(big[:, :T], compact)
    assert all(bool(torch.isnan(big[b, T:]).all()) for b in range(B))
    del big
    torch.cuda.empty_cache()


# --- CUDA graphs ------------------------------------------------------------------------------

GRAPH_REPLAYS = 1000
CHECKED_REPLAYS = (0, 1, GRAPH_REPLAYS // 2, GRAPH_REPLAYS - 1)


@pytest.mark.parametrize("mode", ["write_slots", "scatter", "buffer", "update"])
def test_graph_replays_equal_eager_calls_while_indices_and_inputs_change(mode):
    B, T, H, HV = 6, 3, 4, 8
    pool_size = B * (T + 1) + 2
    rng = random.Random(mode)
    generator = torch.Generator(device="cuda").manual_seed(rng.randrange(2**31))
    inputs = make_inputs(B, T, H, HV, pool_size=pool_size, gate_dtype=torch.float32)
    read, free = random_slots(rng, B, pool_size)
    inputs["initial_state_indices"] = torch.tensor(read, dtype=torch.int64, device="cuda")  # write/scatter: int32
    kwargs = mode_kwargs(mode, inputs, free)
    output, buffer = kwargs["output"], kwargs.get("intermediate_states_buffer")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gated_delta_rule_mtp(**inputs, **kwargs)  # loads the kernel and caches the plan outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        gated_delta_rule_mtp(**inputs, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)

    nan = float("nan")
    for replay in range(GRAPH_REPLAYS):
        read, free = random_slots(rng, B, pool_size)
        inputs["initial_state_indices"].copy_(torch.tensor(read))
        for name, values in write_and_scatter_slots(mode, B, T, free).items():
            kwargs[name].copy_(torch.tensor(values).view(kwargs[name].shape))
        for name in ("q", "k", "v", "a", "b"):
            inputs[name].normal_(generator=generator)
        if replay % 100 == 0:
            inputs["A_log"].uniform_(0, 2.7, generator=generator)
            inputs["dt_bias"].normal_(generator=generator)
        eager_inputs = dict(inputs, initial_state=inputs["initial_state"].clone())
        eager_kwargs = dict(kwargs, output=torch.full_like(output, nan))
        output.fill_(nan)
        if buffer is not None:
            eager_kwargs["intermediate_states_buffer"] = torch.full_like(buffer, nan)
            buffer.fill_(nan)
        if replay in CHECKED_REPLAYS:
            check_call(eager_inputs, **eager_kwargs)  # the eager call against the float64 reference
        else:
            gated_delta_rule_mtp(**eager_inputs, **eager_kwargs)
        graph.replay()
        assert same_bits(output, eager_kwargs["output"]), f"replay {replay}: the output differs from the eager call's"
        assert same_bits(inputs["initial_state"], eager_inputs["initial_state"]), f"replay {replay}: the pool differs"
        if buffer is not None:
            assert same_bits(buffer, eager_kwargs["intermediate_states_buffer"]), f"replay {replay}: the buffer differs"


# --- several GPUs and threads -----------------------------------------------------------------

WORKERS = ((0, True), (0, False), (1, True), (1, False))  # (device, on a side stream rather than the default one)
CALLS_PER_WORKER = 50


def worker_call_shape(call: int) -> tuple[int, torch.dtype]:
    """T and dtype of a worker's call: the calls go through every prebuilt (T, dtype)."""
    return PREBUILT_TOKENS[call % len(PREBUILT_TOKENS)], INPUT_DTYPES[call // len(PREBUILT_TOKENS) % 2]


def forget_loaded_kernels() -> None:
    """The next call of every spec loads its cubin again, as in a fresh process."""
    driver._kernels.clear()
    mtp.forget_plans()


@pytest.mark.parametrize("B", [2, 40])  # 40: a grid of more than one wave, where the start delay is set
def test_first_call_in_a_thread_without_a_current_context(B):
    """The plan (its occupancy query included) and the launch of a new signature, made in a thread
    whose current CUDA context is none."""
    from cuda.bindings import driver as cu

    def in_fresh_thread(**kwargs):
        box = {}

        def run():
            try:
                (result,) = cu.cuCtxSetCurrent(cu.CUcontext(0))
                assert result == cu.CUresult.CUDA_SUCCESS
                box["returned"] = gated_delta_rule_mtp(**kwargs)
            except BaseException as error:  # re-raised in the test's thread
                box["error"] = error

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=300)
        assert not thread.is_alive(), "the call did not return in 5 minutes"
        if "error" in box:
            raise box["error"]
        return box["returned"]

    mtp.forget_plans()
    inputs = make_inputs(B, 8, 16, 32, pool_size=B + 3, generator=torch.Generator().manual_seed(B))
    output = torch.full((B, 8, 32, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    check_call(inputs, call=in_fresh_thread, disable_state_update=False, output=output)


def test_threads_on_two_gpus_race_the_first_loads():
    need_hopper(1)
    forget_loaded_kernels()
    libraries_before = len(driver._libraries)
    barrier = threading.Barrier(len(WORKERS))
    failures = []

    def work(worker: int, device: int, side_stream: bool) -> None:
        rng = random.Random(worker)
        generator = torch.Generator().manual_seed(worker)
        with torch.cuda.device(device):
            stream = torch.cuda.Stream() if side_stream else torch.cuda.default_stream()
            with torch.cuda.stream(stream):
                first = make_inputs(5, 1, 2, 4, device=f"cuda:{device}", pool_size=8, generator=generator)
                expected, _, _ = gated_delta_rule_mtp_reference(**first, disable_state_update=True)
                barrier.wait(timeout=120)
                out, _ = gated_delta_rule_mtp(**first, disable_state_update=True)  # all at once, one spec
                assert rel_error(out, expected) < OUTPUT_REL_TOL, "the first call is wrong"
                for call in range(CALLS_PER_WORKER):
                    T, dtype = worker_call_shape(call)
                    B = 5
                    pool_size = B * (T + 1) + 2
                    inputs = make_inputs(
                        B, T, 2, 4, dtype=dtype, device=f"cuda:{device}", pool_size=pool_size, generator=generator
                    )
                    read, free = random_slots(rng, B, pool_size)
                    inputs["initial_state_indices"] = torch.tensor(read, dtype=torch.int32, device=f"cuda:{device}")
                    check_call(inputs, **mode_kwargs(MODES[(worker + call) % len(MODES)], inputs, free))

    def run(worker: int, device: int, side_stream: bool) -> None:
        try:
            work(worker, device, side_stream)
        except BaseException:
            failures.append(f"worker {worker} on cuda:{device}:\n{traceback.format_exc()}")
            barrier.abort()

    threads = [threading.Thread(target=run, args=(worker, *where)) for worker, where in enumerate(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a worker did not finish in 10 minutes"
    assert not failures, "\n".join(failures)
    # One library per kernel the calls used (the modes pick different tilings at some T, so there can be
    # more kernels than (T, dtype) shapes), and every shape's kernel among them.
    loaded = len(driver._libraries) - libraries_before
    assert loaded == len(driver._kernels), f"{loaded} cubins loaded for {len(driver._kernels)} kernels"
    shapes = {(T, mtp.INPUT_DTYPES[dtype]) for T, dtype in map(worker_call_shape, range(CALLS_PER_WORKER))}
    assert shapes <= {(spec.num_tokens, spec.input_dtype) for spec in driver._kernels}


def test_threads_share_one_plan_on_one_gpu():
    """Several threads call one signature at once, each with its own tensors (its own pointers, which
    every call packs into the launch's parameter buffer for its thread while the other threads launch
    with the GIL released): every output of every call is the one of its thread's inputs."""
    threads_count, calls, B, T, H, HV = 4, 60, 3, 2, 4, 8
    mtp.forget_plans()
    work = []
    for worker in range(threads_count):
        inputs = make_inputs(B, T, H, HV, pool_size=B + 2, generator=torch.Generator().manual_seed(900 + worker))
        expected, _, _ = gated_delta_rule_mtp_reference(**inputs, disable_state_update=True)
        outputs = [torch.full((B, T, HV, 128), float("nan"), dtype=inputs["q"].dtype, device="cuda")
                   for _ in range(calls)]
        work.append((inputs, expected, outputs))
    gated_delta_rule_mtp(**work[0][0], disable_state_update=True, output=work[0][2][0])  # the shared plan
    torch.cuda.synchronize()
    start = threading.Barrier(threads_count)
    failures = []

    def run(inputs, outputs):
        try:
            start.wait()
            for output in outputs:
                gated_delta_rule_mtp(**inputs, disable_state_update=True, output=output)
        except BaseException:  # reported by the assert below
            failures.append(traceback.format_exc())

    threads = [threading.Thread(target=run, args=(inputs, outputs)) for inputs, _, outputs in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures[0]
    torch.cuda.synchronize()
    for worker, (_, expected, outputs) in enumerate(work):
        for number, output in enumerate(outputs):
            assert torch.isfinite(output).all(), f"thread {worker}, call {number}: output not written"
            assert rel_error(output, expected) < OUTPUT_REL_TOL, f"thread {worker}, call {number}"
    assert len(mtp._plans) == 1


def test_same_shapes_on_two_gpus_alternate():
    """Calls of one signature but for the device, alternating: each device's plan (its launch context)
    must be found, whichever way the cached plan is recognised."""
    need_hopper(1)
    inputs = [make_inputs(4, 3, 4, 8, device=f"cuda:{device}", pool_size=6,
                          generator=torch.Generator().manual_seed(device)) for device in (0, 1)]
    mtp.forget_plans()
    for device in (0, 1, 0, 1, 1, 0):
        out, _ = check_call(inputs[device], disable_state_update=False)
        assert out.device == torch.device(f"cuda:{device}")
    assert len(mtp._plans) == 2


@pytest.mark.parametrize("mode", MODES)
def test_tensors_on_cuda1_while_cuda0_is_current(mode):
    need_hopper(1)
    B, T = 6, 3
    pool_size = B * (T + 1) + 2
    rng = random.Random(mode)
    with torch.cuda.device(0):
        inputs = make_inputs(
            B, T, 4, 8, device="cuda:1", pool_size=pool_size, generator=torch.Generator().manual_seed(1)
        )
        read, free = random_slots(rng, B, pool_size)
        inputs["initial_state_indices"] = torch.tensor(read, dtype=torch.int64, device="cuda:1")
        kwargs = mode_kwargs(mode, inputs, free)
        allocated_on_cuda0 = torch.cuda.memory_allocated(0)
        out, _ = check_call(inputs, **kwargs)
        assert torch.cuda.current_device() == 0
        assert out.device == torch.device("cuda:1")
        assert torch.cuda.memory_allocated(0) == allocated_on_cuda0, "the call allocated on cuda:0"


SLEEP_CYCLES = 200_000_000  # about 0.1 s of GPU clock


@pytest.mark.parametrize("device", [0, 1])
def test_call_queues_behind_work_on_the_current_stream_of_its_device(device):
    """cuda:0 is current; the tensors' device has a side stream as its current stream, still busy
    writing q when the call is made: the kernel must run after that write, on that stream."""
    need_hopper(device)
    with torch.cuda.device(0):
        inputs = make_inputs(8, 4, 4, 8, device=f"cuda:{device}", pool_size=10)
        gated_delta_rule_mtp(**inputs, disable_state_update=True)  # plan and kernel ready: the launch is immediate
        new_q = torch.randn(inputs["q"].shape, device=f"cuda:{device}").to(inputs["q"].dtype)
        expected, _, _ = gated_delta_rule_mtp_reference(**dict(inputs, q=new_q), disable_state_update=True)
        stream = torch.cuda.Stream(device=device)
        with torch.cuda.device(device):
            previous = torch.cuda.current_stream()
            stream.wait_stream(previous)
            torch.cuda.set_stream(stream)
        try:
            with torch.cuda.device(device):
                torch.cuda._sleep(SLEEP_CYCLES)
                inputs["q"].copy_(new_q)  # queued behind the sleep
            assert torch.cuda.current_device() == 0
            out, _ = gated_delta_rule_mtp(**inputs, disable_state_update=True)
            result = out.double()  # on the same stream, after the kernel
            torch.cuda.synchronize(device)
        finally:
            with torch.cuda.device(device):
                torch.cuda.set_stream(previous)
        assert rel_error(result, expected) < OUTPUT_REL_TOL


def test_one_plan_on_alternating_streams_runs_on_each_calls_stream():
    """A plan keeps the launch configuration of the latest stream it ran on. Calls with one signature
    alternate between two side streams and the default stream, each stream busy writing q when the
    call is made: every kernel must queue behind its own stream's write."""
    need_hopper(0)
    inputs = make_inputs(8, 4, 4, 8, pool_size=10)
    gated_delta_rule_mtp(**inputs, disable_state_update=True)  # plan and kernel ready
    plan = mtp._last_plan[-1]
    streams = [torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.default_stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for step in range(6):
        stream = streams[step % 3]
        new_q = torch.randn(inputs["q"].shape, device="cuda").to(inputs["q"].dtype)
        torch.cuda.synchronize()
        expected, _, _ = gated_delta_rule_mtp_reference(**dict(inputs, q=new_q), disable_state_update=True)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(SLEEP_CYCLES // 4)
            inputs["q"].copy_(new_q)  # queued behind the sleep
            out, _ = gated_delta_rule_mtp(**inputs, disable_state_update=True)
            assert mtp._last_plan[-1] is plan
            if stream.cuda_stream:  # a side stream's configuration is kept (the NULL stream's is not)
                assert plan.launch._last[0] == stream.cuda_stream
            result = out.double()  # on the same stream, after the kernel
        torch.cuda.synchronize()
        assert rel_error(result, expected) < OUTPUT_REL_TOL, f"step {step}"
