"""Multi-adapter delta math: one dispatching place for the runtime (torch now, Triton on CUDA later)."""

from kernels.lora_ops import fold_delta, stacked_delta

__all__ = ["fold_delta", "stacked_delta"]
