"""gdn_nvrtc: prebuilt sm_90a kernels for the Gated DeltaNet multi-token verify step.

The public entry point is gated_delta_rule_mtp, a drop-in for FlashInfer's function of
the same name; see README.md.
"""

from .mtp import gated_delta_rule_mtp, index_checking, set_index_checking

__version__ = "0.1.0"
__all__ = ["gated_delta_rule_mtp", "index_checking", "set_index_checking", "__version__"]
