"""What the memory moves per second for a given read : write mix (a benchmarking aid, not part of the package).

bench_mtp's floor divides a call's bytes by the copy bandwidth: as many bytes read as written. A call with
per-token states is write-heavy: 1 state read for T written (buffer and scatter mode). This script times
`stream_mix.cu`, an ideal stream of such a mix (contiguous 4 KB chunks, the copies of 16 consecutive chunks
next to each other, no arithmetic), at several caps on the blocks per SM, and reports its bytes read plus
written per second over torch's copy of the same number of bytes within the same buffer (bench_mtp's
measurement: source and target COPY_GAP apart). A mix that moves slower than the copy has a floor it
cannot reach; NOTES v53: on an H200 a 1 : 8 mix moved at 0.91 of the copy with every block that fits
resident, and at 0.96 with 2 blocks per SM.

    python benchmarks/stream_mix.py --mixes 1:1 1:2 1:4 1:8 0:1 1:0 --caps 0 8 4 2 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mtp  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "stream_mix.cu"
KERNEL_NAME = "stream_mix"
THREADS = 256  # MIX_THREADS: a chunk is THREADS * 16 bytes
_PARAMS = struct.Struct("<QQqqii")  # stream_mix.cu's Params


def mix(text: str) -> tuple[int, int]:
    """'R:W' -> (R, W): R in (0, 1) chunks read, W >= 0 copies written, not both 0."""
    try:
        reads, writes = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a mix is READS:WRITES (1:8), got {text!r}") from None
    if reads not in (0, 1) or writes < 0 or reads + writes == 0:
        raise argparse.ArgumentTypeError(f"a mix reads 0 or 1 chunk and writes 0 or more copies, not both 0: {text!r}")
    return reads, writes


def compile_stream(threads: int = THREADS, streaming_hint: bool = False) -> bytes:
    """stream_mix.cu's cubin (NVRTC; no GPU needed)."""
    from gdn_nvrtc import compiler

    options = (f"-DMIX_THREADS={threads}", f"-DMIX_ST={int(streaming_hint)}")
    cubin, _ = compiler.compile_source(SOURCE.read_text(), SOURCE.name, options)
    return cubin


def target_chunk(c: int, w: int, writes: int, group: int) -> int:
    """The target chunk of copy w of source chunk c (stream_mix.cu's layout)."""
    return (c // group) * writes * group + w * group + c % group


class Stream:
    """stream_mix for one block size: bind(buffer, reads, writes, nbytes, group, cap) gives a call that moves up
    to nbytes (read plus written) within `buffer` on torch's current stream: the source at its start, the
    target COPY_GAP bytes after the source's end (or at its start when nothing is read)."""

    def __init__(self, threads: int = THREADS, streaming_hint: bool = False) -> None:
        from gdn_nvrtc import driver

        self.threads = threads
        self.chunk_bytes = threads * 16
        self.function = driver.load_kernel(compile_stream(threads, streaming_hint), KERNEL_NAME)

    def chunks(self, reads: int, writes: int, nbytes: int, group: int) -> int:
        chunks = nbytes // (reads + writes) // self.chunk_bytes
        return chunks - chunks % group

    def bind(self, buffer: torch.Tensor, reads: int, writes: int, nbytes: int, group: int, cap: int = 0):
        """(a call that moves the stream, the bytes it reads plus writes)."""
        from gdn_nvrtc import driver

        chunks = self.chunks(reads, writes, nbytes, group)
        if chunks < 1:
            raise ValueError(f"{nbytes} bytes do not hold one group of {group} chunks of this mix")
        source = buffer.data_ptr()
        target = source + (chunks * self.chunk_bytes + bench_mtp.COPY_GAP if reads else 0)
        end = target + (writes * chunks if writes else 1) * self.chunk_bytes
        if end > buffer.data_ptr() + buffer.numel() * buffer.element_size():
            raise ValueError("the buffer is too small for this stream")
        device = buffer.device.index
        shared = driver.shared_bytes_for_at_most(self.function, self.threads, device, cap) if cap else 0
        launch = driver.Launch(self.function, chunks, self.threads, device, _PARAMS, shared_bytes=shared)

        def call() -> None:
            launch(torch.cuda.current_stream(buffer.device).cuda_stream, source, target, chunks, group, reads, writes)

        return call, (reads + writes) * chunks * self.chunk_bytes


def median_bandwidth(call, nbytes: int, repeats: int) -> float:
    """Bytes per second: nbytes over the median of `repeats` timed calls (each alone between events)."""
    for _ in range(3):
        call()
    return nbytes / (statistics.median(bench_mtp._elapsed_ms(call, 1) for _ in range(repeats)) * 1e-3)


def copy_in(buffer: torch.Tensor, nbytes: int, repeats: int) -> float:
    """torch's copy of nbytes / 2 within `buffer` (bench_mtp.copy_medians' layout), bytes read plus written per s."""
    half = nbytes // 2 // 4
    source, target = buffer[:half], buffer[half + bench_mtp.COPY_GAP // 4 : 2 * half + bench_mtp.COPY_GAP // 4]
    return median_bandwidth(partial(target.copy_, source), 2 * half * 4, repeats)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stream_mix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixes", nargs="+", type=mix, default=[(1, 1), (1, 2), (1, 4), (1, 8), (0, 1), (1, 0)],
                        metavar="R:W", help="chunks read : copies written (0:1 writes only, 1:0 reads only)")
    parser.add_argument("--caps", nargs="+", type=int, default=[0, 8, 4, 2],
                        help="at most this many blocks per SM (0: as many as fit)")
    parser.add_argument("--threads", type=int, default=THREADS, help="threads per block (16 bytes each)")
    parser.add_argument("--group", type=int, default=16, help="consecutive chunks whose copies lie together")
    parser.add_argument("--streaming-hint", action="store_true", help="store with st.global.cs")
    parser.add_argument("--gb", type=float, default=4.0, help="bytes read plus written per call, in GB")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="fresh buffers, one after the other")
    args = parser.parse_args(argv)
    if any(cap < 0 for cap in args.caps):
        parser.error("--caps must be 0 or more")
    if args.threads not in (32, 64, 128, 256, 512, 1024) or args.group < 1 or args.repeats < 1 or args.rounds < 1:
        parser.error("--threads must be a power of two from 32 to 1024; --group, --repeats and --rounds at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not bench_mtp.hopper_visible("stream_mix"):
        return 2
    stream = Stream(args.threads, args.streaming_hint)
    nbytes = int(args.gb * 1e9) // 16 * 16
    print(f"{torch.cuda.get_device_name()}: {nbytes / 1e9:.2f} GB read plus written per call, "
          f"{stream.chunk_bytes} B chunks, groups of {args.group}, {'st.global.cs' if args.streaming_hint else 'plain'}"
          f" stores; GB/s (over torch's copy of as many bytes in the same buffer)")
    columns = [f"{reads}:{writes} cap {cap}" for (reads, writes) in args.mixes for cap in args.caps]
    print(f"{'round':>5} {'copy':>6} " + " ".join(f"{column:>17}" for column in columns))
    for round_ in range(args.rounds):
        buffer = torch.randn((nbytes + 2 * bench_mtp.COPY_GAP) // 4, device="cuda")
        copy = copy_in(buffer, nbytes, args.repeats)
        cells = []
        for (reads, writes) in args.mixes:
            for cap in args.caps:
                call, moved = stream.bind(buffer, reads, writes, nbytes, args.group, cap)
                bandwidth = median_bandwidth(call, moved, args.repeats)
                cells.append(f"{bandwidth / 1e9:7.0f} ({bandwidth / copy:.3f})")
        print(f"{round_:>5} {copy / 1e9:6.0f} " + " ".join(f"{cell:>17}" for cell in cells), flush=True)
        del buffer
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: this checkout
    sys.exit(main())
