"""benchmarks/ceiling.py: its mover compiles without a GPU, and on one it moves exactly the states a
buffer or scatter call writes (the ceiling it measures is only meaningful for the same traffic)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ceiling  # noqa: E402

from gdn_nvrtc.reference import make_inputs  # noqa: E402


@pytest.mark.parametrize(("T", "K", "V"), [(1, 128, 128), (2, 128, 128), (8, 64, 64), (16, 256, 256), (4, 128, 64)])
def test_mover_compiles(T, K, V):
    assert ceiling.compile_mover(T, K, V)[:4] == b"\x7fELF"


@pytest.mark.parametrize("variant", sorted(ceiling.MOVER_VARIANTS))
def test_mover_variants_compile(variant):
    assert ceiling.compile_mover(4, 128, 128, ceiling.MOVER_VARIANTS[variant])[:4] == b"\x7fELF"


def test_arguments():
    args = ceiling.parse_args(["--modes", "scatter", "--T", "2", "4", "--B", "256", "--heads", "4,8"])
    assert (args.modes, args.T, args.B, args.heads) == (["scatter"], [2, 4], [256], [(4, 8)])
    assert args.movers == ["plain"] and args.slots == "random"
    assert ceiling.parse_args(["--slots", "sequential"]).slots == "sequential"
    assert ceiling.parse_args(["--slots", "pages"]).slots == "pages"
    movers = ["plain", "st_bulk", "rows8+st_bulk", "copy"]
    assert ceiling.parse_args(["--movers", *movers]).movers == movers
    assert ceiling.mover_variant("rows8+st_bulk") == {"MOVE_ROWS": 8, "MOVE_ST": 4}
    with pytest.raises(SystemExit):
        ceiling.parse_args(["--modes", "gather"])
    with pytest.raises(SystemExit):
        ceiling.parse_args(["--movers", "fastest"])
    with pytest.raises(SystemExit):
        ceiling.parse_args(["--movers", "rows8+copy"])
    with pytest.raises(SystemExit):
        ceiling.parse_args(["--slots", "shuffled"])


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["plain", "nowait", "ld_nc", "st_cs", "ef", "st_bulk", "rows4+st_bulk", "rows64",
                                     "hold1us+occ4", "lpr4", "lpr16+st_bulk", "ahead512",
                                     {"MOVE_AHEAD": 3}, {"MOVE_AHEAD": 1, "MOVE_ST": 4}])  # ahead of blocks in the grid
@pytest.mark.parametrize("mode", ["buffer", "scatter"])  # update writes back what it read: no visible change
def test_mover_writes_the_states_of_each_mode(mode, variant):
    B, T, H, HV, K = 5, 3, 2, 4, 128
    generator = torch.Generator().manual_seed(7)
    pool_size = 4 * B * (T + 1)
    inputs = make_inputs(B, T, H, HV, pool_size=pool_size, generator=generator)
    pool = inputs["initial_state"]
    order = torch.randperm(pool_size, generator=generator).to(torch.int32).cuda()
    inputs["initial_state_indices"] = order[:B].clone()
    inputs["initial_state_indices"][1] = -1  # a padding row: moves nothing
    if mode == "buffer":
        inputs["intermediate_states_buffer"] = torch.full((B, T, HV, K, K), float("nan"), device="cuda")
    if mode == "scatter":
        inputs["ssm_state_indices"] = order[B : B * (T + 1)].reshape(B, T).clone()
        inputs["ssm_state_indices"][3, 1] = pool_size  # out of range: skipped
    before = pool.clone()

    macros = ceiling.mover_variant(variant) if isinstance(variant, str) else variant
    call = ceiling.Mover(T, K, K, macros).bind(inputs)
    call()
    torch.cuda.synchronize()

    expected = before.clone()
    reads = inputs["initial_state_indices"].tolist()
    for b, slot in enumerate(reads):
        if slot < 0:
            continue
        if mode == "scatter":
            for target in inputs["ssm_state_indices"][b].tolist():
                if 0 <= target < pool_size:
                    expected[target] = before[slot]
        elif mode == "buffer":
            assert torch.equal(inputs["intermediate_states_buffer"][b], before[slot].expand(T, -1, -1, -1))
    assert torch.equal(pool, expected)  # the scatter targets, and nothing else
    if mode == "buffer":
        assert inputs["intermediate_states_buffer"][1].isnan().all()  # the padding row's stay poisoned


@pytest.mark.gpu
def test_copy_moves_one_calls_slots():
    B, R = 3, 2
    generator = torch.Generator().manual_seed(3)
    inputs = make_inputs(B, 2, 2, 4, pool_size=R * B, generator=generator)
    target = torch.full_like(inputs["initial_state"], float("nan"))
    ceiling.bind_copy(inputs, 1, target)()
    torch.cuda.synchronize()
    assert torch.equal(target[B:], inputs["initial_state"][B:]) and target[:B].isnan().all()


def test_mover_refuses_arguments_it_cannot_move():
    class FakeMover(ceiling.Mover):
        def __init__(self) -> None:
            self.T, self.K, self.V = 2, 128, 128

    slots = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="compiled for T=2"):
        FakeMover().bind({"v": torch.empty(1, 3, 4, 128), "initial_state": torch.empty(1, 4, 128, 128),
                          "initial_state_indices": slots})
    with pytest.raises(ValueError, match="48 rows per block do not split 128 x 128 states"):
        ceiling.Mover(2, 128, 128, {"MOVE_ROWS": 48})
    with pytest.raises(ValueError, match="compiled for 128 x 128 states, the pool's are 64 x 64"):
        FakeMover().bind({"v": torch.empty(1, 2, 4, 64), "initial_state": torch.empty(1, 4, 64, 64),
                          "initial_state_indices": slots})


def test_without_a_hopper_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ceiling.main(["--T", "2"]) == 2
    assert "ceiling: needs a Hopper GPU" in capsys.readouterr().err
