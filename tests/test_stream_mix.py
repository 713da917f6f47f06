"""benchmarks/stream_mix.py: its kernel compiles without a GPU, and on one each mix writes exactly the copies
it counts, where its layout says, and nothing else (a bandwidth is only meaningful for the bytes moved)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_mtp  # noqa: E402
import stream_mix  # noqa: E402


@pytest.mark.parametrize(("threads", "hint"), [(256, False), (256, True), (128, False), (1024, True)])
def test_stream_compiles(threads, hint):
    assert stream_mix.compile_stream(threads, hint)[:4] == b"\x7fELF"


def test_mix_and_arguments():
    assert stream_mix.mix("1:8") == (1, 8) and stream_mix.mix("0:1") == (0, 1) and stream_mix.mix("1:0") == (1, 0)
    for bad in ("0:0", "2:1", "1:-1", "1-8", "a:b", "1:2:3"):
        with pytest.raises(argparse.ArgumentTypeError):
            stream_mix.mix(bad)
    args = stream_mix.parse_args(["--mixes", "1:4", "0:1", "--caps", "0", "2", "--group", "4"])
    assert (args.mixes, args.caps, args.group, args.streaming_hint) == ([(1, 4), (0, 1)], [0, 2], 4, False)
    for bad in (["--caps", "-1"], ["--threads", "100"], ["--group", "0"], ["--mixes", "0:0"]):
        with pytest.raises(SystemExit):
            stream_mix.parse_args(bad)


def test_target_layout_covers_each_copy_once():
    """Copies of a group of chunks lie next to each other, group after group: a permutation of the target."""
    for writes, group, chunks in [(1, 16, 64), (8, 16, 64), (3, 1, 10), (2, 5, 20)]:
        targets = [stream_mix.target_chunk(c, w, writes, group) for c in range(chunks) for w in range(writes)]
        assert sorted(targets) == list(range(writes * chunks))
    assert stream_mix.target_chunk(17, 2, 8, 16) == 8 * 16 + 2 * 16 + 1  # the second group, its third copies


@pytest.mark.gpu
@pytest.mark.parametrize(("reads", "writes", "group", "cap", "hint"),
                         [(1, 1, 16, 0, False), (1, 8, 16, 2, True), (1, 3, 5, 4, False), (0, 2, 16, 0, False)])
def test_stream_writes_its_copies(reads, writes, group, cap, hint):
    stream = stream_mix.Stream(256, hint)
    nbytes = 6 << 20
    buffer = torch.randn((nbytes + 2 * bench_mtp.COPY_GAP) // 4, device="cuda",
                         generator=torch.Generator(device="cuda").manual_seed(reads + 10 * writes))
    chunks = stream.chunks(reads, writes, nbytes, group)
    chunk = stream.chunk_bytes // 4  # floats
    source = buffer[: chunks * chunk].clone()
    start = (chunks * stream.chunk_bytes + bench_mtp.COPY_GAP) // 4 if reads else 0
    before = buffer.clone()
    call, moved = stream.bind(buffer, reads, writes, nbytes, group, cap)
    assert moved == (reads + writes) * chunks * stream.chunk_bytes <= nbytes
    call()
    torch.cuda.synchronize()
    target = buffer[start : start + writes * chunks * chunk].view(writes * chunks, chunk)
    pairs = [(c, w) for c in range(chunks) for w in range(writes)]
    where = torch.tensor([stream_mix.target_chunk(c, w, writes, group) for c, w in pairs], device="cuda")
    if reads:
        expected = source.view(chunks, chunk)[torch.tensor([c for c, _ in pairs], device="cuda")]
    else:  # the pattern: thread t of block c writes (1 + t, 2, 3 + c, 4)
        t = torch.arange(256, device="cuda", dtype=torch.float32)
        expected = torch.stack([torch.stack([1 + t, torch.full_like(t, 2.0), torch.full_like(t, 3.0 + c),
                                             torch.full_like(t, 4.0)], dim=1).flatten() for c, _ in pairs])
    assert torch.equal(target[where], expected)
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[start : start + writes * chunks * chunk] = False
    assert torch.equal(buffer[outside], before[outside])  # the source and everything past the target untouched
