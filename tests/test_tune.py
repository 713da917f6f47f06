"""benchmarks/tune.py's variants (CPU only): every constant and tiling key a variant sets exists, so that a
variant does not silently time the shipped choice after a rename in gdn_nvrtc."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import tune  # noqa: E402

from gdn_nvrtc import specs  # noqa: E402

LAUNCH_KEYS = {"PDL", "CAP", "DELAY", "MMA_ONLY"}  # handled by tune.time_variant itself


def test_variant_constants_exist():
    missing = {(name, key) for name, fixed in tune.VARIANTS.items() for key in fixed or {} if "." in key
               and not hasattr(tune.CONSTANT_MODULES.get(key.split(".")[0]), key.split(".", 1)[1])}
    assert not missing


def test_variant_tiling_keys_are_known():
    known = {key for tiling in (*specs.FIXED_TILINGS.values(), *(t for _, t in specs.WIDE_TILINGS)) for key in tiling}
    known |= {"STORE_CS"} | LAUNCH_KEYS  # STORE_CS: set by specs.tiling_for
    unknown = {(name, key) for name, fixed in tune.VARIANTS.items() for key in fixed or {}
               if "." not in key and key not in known}
    assert not unknown
