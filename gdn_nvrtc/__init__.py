"""gdn_nvrtc: prebuilt sm_90a kernels for the Gated DeltaNet multi-token verify step.

The public entry point is gated_delta_rule_mtp, a drop-in for FlashInfer's function of
the same name; see README.md.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["gated_delta_rule_mtp", "index_checking", "set_index_checking", "__version__"]

_PUBLIC_FROM_MTP = ("gated_delta_rule_mtp", "index_checking", "set_index_checking")


def __getattr__(name: str):
    # The build (build_cubins.py) imports gdn_nvrtc.compiler without torch, so torch and the
    # driver are imported only when the public function is first asked for.
    if name in _PUBLIC_FROM_MTP:
        from . import mtp

        return getattr(mtp, name)
    raise AttributeError(f"module 'gdn_nvrtc' has no attribute {name!r}")
