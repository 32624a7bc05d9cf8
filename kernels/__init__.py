"""Multi-adapter delta math: one dispatching place for the runtime (Triton on CUDA, torch elsewhere).

``lora_composer.kernels.triton_lora`` is imported only when the Triton path is first taken, so ``TRITON_INTERPRET``
may still be set before that (the CPU test suite runs the kernels in Triton's interpreter).
"""

if __name__ == "kernels":  # top-level `kernels` from the repository root: not ours (see source_tree)
    from lora_composer.source_tree import defer_to_installed

    defer_to_installed(__name__, __file__)

from lora_composer.kernels.lora_ops import BACKEND_ENV, fold_delta, pick_backend, stacked_delta, stacked_delta_torch
from lora_composer.kernels.sparse_ops import sparse_delta, sparse_fold, sparse_restore

__all__ = [
    "BACKEND_ENV",
    "fold_delta",
    "pick_backend",
    "sparse_delta",
    "sparse_fold",
    "sparse_restore",
    "stacked_delta",
    "stacked_delta_torch",
]
