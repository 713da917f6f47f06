"""Every prebuilt spec in every mode at a small shape, for compute-sanitizer (scripts/sanitize.sh).

Each call also runs against the float64 reference, so a sanitizer-clean run is also a correct one.
Each spec (its tiling included) is forced, whatever the dispatcher would pick for the small shape.

    python scripts/sanitize_cases.py [--tilings NAME ...] [--tokens T ...] [--dtypes bf16 fp16]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import check_call  # noqa: E402

from gdn_nvrtc import mtp  # noqa: E402
from gdn_nvrtc.reference import make_inputs  # noqa: E402
from gdn_nvrtc.specs import PREBUILT_SPECS, TILING_NAMES, KernelSpec, start_delay_applies  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("update", "no_update", "buffer", "scatter", "scatter_repeated", "write_slots", "delayed")


def run_case(spec: KernelSpec, mode: str) -> bool:
    """Run one case; False where the mode does not apply to the spec."""
    mtp.choose_spec = lambda *args, **kwargs: spec
    mtp.forget_plans()
    T, dtype = spec.num_tokens, DTYPES[spec.input_dtype]
    B, H, HV = 3, 2, 4
    if mode == "delayed":  # an update-mode grid of several waves: part of the first wave starts late
        if not start_delay_applies(spec, writes_states=False):
            return False
        B, H, HV = 40, 16, 32
    pool_size = B * (T + 2) + 2
    inputs = make_inputs(B, T, H, HV, dtype=dtype, pool_size=pool_size)
    inputs["initial_state_indices"][1] = -1  # a padded row in every case
    writes_pool = ("update", "scatter", "scatter_repeated", "write_slots", "delayed")
    kwargs: dict = {"disable_state_update": mode not in writes_pool}
    used = set(inputs["initial_state_indices"].tolist())
    free = [s for s in range(pool_size) if s not in used]  # slots no row reads
    if mode == "buffer":
        kwargs["intermediate_states_buffer"] = torch.full((B, T + 1, HV, 128, 128), float("nan"), device="cuda")
    elif mode == "scatter":
        kwargs["ssm_state_indices"] = torch.tensor(free[: B * T], dtype=torch.int32, device="cuda").view(B, T)
    elif mode == "scatter_repeated":  # every token of row 0 to one slot, row 2 into its own read slot
        if T == 1:
            return False
        slots = [[free[0]] * T, [free[1]] * T, [int(inputs["initial_state_indices"][2])] * T]
        kwargs["ssm_state_indices"] = torch.tensor(slots, dtype=torch.int32, device="cuda")
    elif mode == "write_slots":
        kwargs["output_state_indices"] = torch.tensor([free[0], free[1], pool_size + 5], device="cuda")
    check_call(inputs, **kwargs)
    if mode == "delayed":
        (plan,) = mtp._plans.values()
        assert plan.fixed_values()["stagger_blocks"] > 0, "the start delay was not in effect"
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tilings", nargs="+", choices=TILING_NAMES, default=list(TILING_NAMES))
    parser.add_argument("--tokens", nargs="+", type=int)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    args = parser.parse_args()
    chosen = [
        spec for spec in PREBUILT_SPECS
        if spec.tiling_name in args.tilings and spec.input_dtype in args.dtypes
        and (args.tokens is None or spec.num_tokens in args.tokens)
    ]
    count = 0
    for spec in chosen:
        for mode in MODES:
            if run_case(spec, mode):
                count += 1
                print(f"{spec.name} {mode}: matched", flush=True)  # a run cut short still says how far it got
    torch.cuda.synchronize()
    print(f"{count} cases ({len(chosen)} prebuilt specs, up to {len(MODES)} modes each) matched the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
