"""Compile every prebuilt spec with NVRTC and write the cubins and their manifest.

    python build_cubins.py [--out gdn_nvrtc/cubins] [--jobs N]

Needs no GPU. The wheel build (setup.py) runs it; run it by hand in a source checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gdn_nvrtc.compiler import (  # noqa: E402
    NVRTC_OPTIONS,
    CompiledKernel,
    compile_without_spills,
    nvrtc_version,
    sources_sha256,
)
from gdn_nvrtc.cubins import MANIFEST_NAME, PREBUILT_DIR  # noqa: E402
from gdn_nvrtc.specs import PREBUILT_SPECS  # noqa: E402


def build(out_dir: Path, jobs: int) -> dict:
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    kernels: dict[str, dict] = {}
    start = time.time()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(compile_without_spills, spec) for spec in PREBUILT_SPECS]
        for done, future in enumerate(as_completed(futures), 1):
            compiled: CompiledKernel
            compiled, compiles = future.result()
            name = compiled.spec.name
            (staging / f"{name}.cubin").write_bytes(compiled.cubin)
            kernels[name] = {"file": f"{name}.cubin", **compiled.manifest_entry()}
            bar = "#" * (30 * done // len(futures))
            again = f", {compiles} compiles (NVRTC's output varies; the earlier ones spilled)" if compiles > 1 else ""
            print(
                f"\r[{bar:<30}] {done}/{len(futures)} {name}: {compiled.registers} regs, "
                f"{compiled.spill_bytes} B spilled{again} ({time.time() - start:.0f} s)",
                end="\n" if done == len(futures) or again else "",
                flush=True,
            )
    manifest = {
        "nvrtc_version": nvrtc_version(),
        "nvrtc_options": list(NVRTC_OPTIONS),
        "sources_sha256": sources_sha256(),
        "kernels": dict(sorted(kernels.items())),
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PREBUILT_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args()
    manifest = build(args.out, args.jobs)
    spilled = [name for name, entry in manifest["kernels"].items() if entry["spill_bytes"] or entry["stack_bytes"]]
    if spilled:
        sys.exit(f"these kernels spill registers or use a stack frame: {spilled}")
    print(f"wrote {len(manifest['kernels'])} cubins and {MANIFEST_NAME} to {args.out}")


if __name__ == "__main__":
    main()
